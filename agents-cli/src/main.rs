//! `agents`: inspect and mend a data dir, and call a running server.
//!
//! ```text
//! agents ls DIR [CLASS] [--json]                 classes, and the agents of each
//! agents show DIR CLASS/NAME [--json]            an agent's kv, state, schedules, dead letters,
//!                                                connections, tables
//! agents sql DIR CLASS/NAME "SELECT .." [--json] one read-only statement
//! agents retry DIR CLASS/NAME ID                 put a dead letter back on the schedule
//! agents discard DIR CLASS/NAME ID               delete a dead letter
//! agents rm DIR CLASS/NAME                       remove an agent
//! agents backup DIR DEST                         back the data dir up into DEST
//! agents backup URL DEST                         a running server backs itself up into DEST
//!                                                (a directory on its machine)
//! agents restore BACKUP DIR                      restore a backup into a new data dir
//! agents call URL CLASS/NAME METHOD [ARGS]       call a method on a running server (ARGS: a
//!                                                JSON array)
//! agents tail URL CLASS/NAME                     print an agent's events as they come
//! ```
//!
//! Reading is safe while a runtime serves the data dir (a live agent's database is refused
//! until it hibernates); changing it (`retry`, `discard`, `rm`) is refused while a runtime
//! serves it: stop the runtime first. So is `backup DIR`: a runtime backs itself up while it
//! serves (`Runtime::backup`, `agents backup URL`, through its admin routes). See
//! `agents::inspect`. The commands on a server send `AGENTS_TOKEN`, if set, as a bearer token.

mod local;
mod remote;

use std::process::ExitCode;

const USAGE: &str = "usage:
  agents ls DIR [CLASS] [--json]
  agents show DIR CLASS/NAME [--json]
  agents sql DIR CLASS/NAME \"SELECT ..\" [--json]
  agents retry DIR CLASS/NAME DEAD_LETTER_ID
  agents discard DIR CLASS/NAME DEAD_LETTER_ID
  agents rm DIR CLASS/NAME
  agents backup DIR DEST
  agents backup URL DEST
  agents restore BACKUP DIR
  agents call URL CLASS/NAME METHOD [ARGS_AS_A_JSON_ARRAY]
  agents tail URL CLASS/NAME";

/// What went wrong, as the user is told.
type Failed = String;

/// The command line, without the program's name: its words, and whether `--json` was given.
struct Args {
    words: Vec<String>,
    json: bool,
}

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> Self {
        let (flags, words): (Vec<String>, Vec<String>) = args.partition(|a| a == "--json");
        Args {
            words,
            json: !flags.is_empty(),
        }
    }
}

/// An agent's address as the command line gives it: `CLASS/NAME`.
fn address(word: &str) -> Result<(&str, &str), Failed> {
    word.split_once('/')
        .filter(|(class, name)| !class.is_empty() && !name.is_empty())
        .ok_or_else(|| {
            format!("`{word}` is not an agent's address: CLASS/NAME, as in counter/alice")
        })
}

fn run(args: Args) -> Result<(), Failed> {
    let words: Vec<&str> = args.words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["ls", dir] => local::ls(dir, None, args.json),
        ["ls", dir, class] => local::ls(dir, Some(class), args.json),
        ["show", dir, agent] => local::show(dir, address(agent)?, args.json),
        ["sql", dir, agent, sql] => local::sql(dir, address(agent)?, sql, args.json),
        ["retry", dir, agent, id] => local::retry(dir, address(agent)?, id),
        ["discard", dir, agent, id] => local::discard(dir, address(agent)?, id),
        ["rm", dir, agent] => local::rm(dir, address(agent)?),
        ["backup", url, dest] if url.contains("://") => remote::backup(url, dest),
        ["backup", dir, dest] => local::backup(dir, dest),
        ["restore", backup, dir] => local::restore(backup, dir),
        ["call", url, agent, method] => remote::call(url, address(agent)?, method, "[]"),
        ["call", url, agent, method, args] => remote::call(url, address(agent)?, method, args),
        ["tail", url, agent] => remote::tail(url, address(agent)?),
        _ => Err(USAGE.to_owned()),
    }
}

fn main() -> ExitCode {
    match run(Args::parse(std::env::args().skip(1))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e == USAGE => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("agents: {e}");
            ExitCode::FAILURE
        }
    }
}
