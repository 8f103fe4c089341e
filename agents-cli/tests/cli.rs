//! The `agents` command on a real data dir, with and without a runtime serving it, and against
//! a real server.

use std::{
    process::{Command, Output},
    time::{Duration, SystemTime},
};

use agents::{prelude::*, testing::TestRuntime, Clock};
use serde_json::Value;

/// A shop: items in a table of its own, a count in kv, the count as shared state, a restock an
/// hour ahead, and a job that always fails (a dead letter, once its retries are spent).
#[derive(Default)]
pub struct Shop;

impl Agent for Shop {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.sql()
            .execute_batch("CREATE TABLE IF NOT EXISTS items(name TEXT NOT NULL)")?;
        Ok(())
    }
}

#[agent(state = "u64", event = "String")]
impl Shop {
    #[callable]
    pub async fn stock(&mut self, ctx: &mut Ctx<Self>, item: String) -> Result<u64, AppError> {
        ctx.sql()
            .execute("INSERT INTO items(name) VALUES (?1)", [&item])?;
        let count = ctx.kv().get::<u64>("count")?.unwrap_or(0) + 1;
        ctx.kv().put("count", &count)?;
        ctx.set_state(&count)?;
        ctx.broadcast(&item, &[])?;
        Ok(count)
    }

    #[callable]
    pub async fn plan(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.schedule(
            When::after(Duration::from_secs(3600)),
            Self::calls().restock(),
        )?;
        ctx.schedule(When::after(Duration::ZERO), Self::calls().fail())?;
        Ok(())
    }

    #[callable(private)]
    pub async fn restock(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        Ok(())
    }

    #[callable(private)]
    pub async fn fail(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        Err(AppError::msg("the supplier is closed"))
    }
}

/// Runs `agents` with `args`.
fn agents(args: &[&str]) -> Output {
    agents_with(None, args)
}

/// Runs `agents` with `args`, and `token` in `AGENTS_TOKEN`.
fn agents_with(token: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agents"));
    command.args(args).env_remove("AGENTS_TOKEN");
    if let Some(token) = token {
        command.env("AGENTS_TOKEN", token);
    }
    command.output().unwrap()
}

/// Runs `agents` with `args`, which must succeed; returns its standard output.
fn ok(args: &[&str]) -> String {
    let out = agents(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "agents {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `agents` with `args`, which must fail with exit code 1; returns what it said.
fn fails(args: &[&str]) -> String {
    let out = agents(args);
    assert_eq!(out.status.code(), Some(1), "agents {args:?}: {out:?}");
    String::from_utf8(out.stderr).unwrap()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn builder() -> agents::Builder {
    Runtime::builder()
        .clock(Clock::manual(SystemTime::now()))
        .agent::<Shop>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspects_and_mends_a_data_dir_with_and_without_a_runtime() {
    let mut rt = TestRuntime::start(builder()).unwrap();
    let data_dir = rt.dir().to_owned();
    let dir = data_dir.to_str().unwrap();
    let a = rt.agent::<Shop>("a");
    a.stock("apple".into()).await.unwrap();
    a.stock("pear".into()).await.unwrap();
    a.plan().await.unwrap();
    // `fail` runs now and 6 more times, 2 s to 64 s apart: then it is a dead letter.
    for _ in 0..130 {
        rt.advance(Duration::from_secs(1)).await;
    }
    rt.agent::<Shop>("b").stock("fig".into()).await.unwrap();

    // While the runtime serves the data dir: the catalog is read, a live agent is not. (The
    // catalog's file runs a moment behind the runtime: listing through it waits for its writes.)
    assert_eq!(rt.agents::<Shop>(None, 10).await.unwrap().len(), 2);
    let listed = json(&ok(&["ls", dir, "--json"]));
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert!(ok(&["ls", dir]).contains("shop: 2 agents"));
    let refused = fails(&["show", dir, "shop/a"]);
    assert!(
        refused.contains("shop/a is live") && refused.contains("once it hibernates"),
        "{refused}"
    );

    // Hibernated, it is read while the runtime runs.
    assert!(rt.hibernate::<Shop>("a").await.unwrap());
    let shown = json(&ok(&["show", dir, "shop/a", "--json"]));
    assert_eq!(shown["agent"]["name"], "a");
    assert_eq!(shown["kv"]["count"], 2);
    assert_eq!(shown["state"], 2);
    let schedules = shown["schedules"].as_array().unwrap();
    assert_eq!(schedules.len(), 1, "{shown}");
    assert_eq!(schedules[0]["method"], "restock");
    let dead = shown["dead_letters"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{shown}");
    assert_eq!(dead[0]["method"], "fail");
    assert_eq!(dead[0]["attempts"], 7);
    assert!(dead[0]["error"]
        .as_str()
        .unwrap()
        .contains("the supplier is closed"));
    assert_eq!(shown["tables"]["items"], 2);
    assert_eq!(shown["tables"]["_agents_kv"], 1);
    let text = ok(&["show", dir, "shop/a"]);
    assert!(
        text.contains("count = 2") && text.contains("dead letters (1)"),
        "{text}"
    );

    let rows = json(&ok(&[
        "sql",
        dir,
        "shop/a",
        "SELECT name FROM items ORDER BY name",
        "--json",
    ]));
    assert_eq!(
        rows,
        serde_json::json!([{"name": "apple"}, {"name": "pear"}])
    );
    assert_eq!(
        ok(&["sql", dir, "shop/a", "SELECT count(*) AS n FROM items"]),
        "n\n2\n"
    );
    let write = fails(&["sql", dir, "shop/a", "DELETE FROM items"]);
    assert!(write.contains("only statements that read"), "{write}");

    // Changes are refused while the runtime serves the data dir.
    let id = dead[0]["id"].to_string();
    let refused = fails(&["retry", dir, "shop/a", &id]);
    assert!(
        refused.contains("in use by another runtime") && refused.contains("stop it first"),
        "{refused}"
    );
    assert!(fails(&["rm", dir, "shop/b"]).contains("in use"));
    let backups = tempfile::tempdir().unwrap();
    let backup = backups.path().join("backup");
    let backup = backup.to_str().unwrap();
    assert!(fails(&["backup", dir, backup]).contains("backs it up itself"));
    rt.stop().await;

    // A backup of the stopped data dir restores to the same agents.
    assert!(ok(&["backup", dir, backup]).contains("backed up 2 agents"));
    let restored = backups.path().join("restored");
    let restored = restored.to_str().unwrap();
    assert!(ok(&["restore", backup, restored]).contains("restored 2 agents"));
    assert_eq!(
        json(&ok(&["ls", restored, "--json"]))
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let shown = json(&ok(&["show", restored, "shop/a", "--json"]));
    assert_eq!(shown["tables"]["items"], 2);
    assert!(fails(&["restore", backup, restored]).contains("already holds a data dir"));
    assert!(fails(&["backup", dir, backup]).contains("is not empty"));

    // Without a runtime: retry, discard, remove.
    let said = ok(&["retry", dir, "shop/a", &id]);
    assert!(said.contains("due now"), "{said}");
    let shown = json(&ok(&["show", dir, "shop/a", "--json"]));
    assert_eq!(shown["dead_letters"], serde_json::json!([]));
    let schedules = shown["schedules"].as_array().unwrap();
    assert!(schedules
        .iter()
        .any(|s| s["method"] == "fail" && s["attempts"] == 0));
    // The alarm index wakes the agent for it once a runtime runs.
    let index = rusqlite::Connection::open(data_dir.join("alarms.sqlite")).unwrap();
    let at: i64 = index
        .query_row(
            "SELECT at_ms FROM alarms WHERE class = 'shop' AND name = 'a'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(at <= now, "the alarm is due now: {at} > {now}");
    assert!(fails(&["discard", dir, "shop/a", "99"]).contains("shop/a has no dead letter #99"));
    assert!(fails(&["retry", dir, "shop/a", "x"]).contains("not a dead letter's id"));

    ok(&["rm", dir, "shop/b"]);
    let listed = json(&ok(&["ls", dir, "--json"]));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(fails(&["show", dir, "shop/b"]).contains("no agent shop/b"));
    assert!(fails(&["rm", dir, "shop/b"]).contains("no agent shop/b"));

    // Bad input gets a clear word.
    assert!(fails(&["show", dir, "nope"]).contains("CLASS/NAME"));
    assert!(fails(&["ls", "/nonexistent/dir"]).contains("is not a data dir"));
    assert_eq!(agents(&[]).status.code(), Some(2));
    assert_eq!(agents(&["frobnicate", dir]).status.code(), Some(2));

    // The runtime starts on the mended data dir.
    rt.restart().await.unwrap();
    assert_eq!(rt.agents::<Shop>(None, 10).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_tails_a_running_server() {
    use tokio::io::AsyncBufReadExt;
    let rt = TestRuntime::start(builder()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let serving = rt.runtime().clone();
    tokio::spawn(async move { serving.serve_on(listener).await });

    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_agents"))
        .args(["tail", &url, "shop/a"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Once it listens, it says so.
    let mut said = tokio::io::BufReader::new(tail.stderr.take().unwrap()).lines();
    let first = said.next_line().await.unwrap().unwrap();
    assert!(first.contains("listening to shop/a"), "{first}");

    let call = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            agents(&args)
        })
    };
    let args = |more: &[&str]| {
        let mut all = vec!["call".to_owned(), url.clone(), "shop/a".to_owned()];
        all.extend(more.iter().map(|s| s.to_string()));
        all
    };
    let out = call(args(&["stock", "[\"kiwi\"]"])).await.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "1\n");
    let mut events = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    let event = tokio::time::timeout(Duration::from_secs(10), events.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.as_deref(), Some("\"kiwi\""));

    let bad = call(args(&["stock", "[1, 2]"])).await.unwrap();
    let stderr = String::from_utf8(bad.stderr).unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr.contains("bad arguments") || stderr.contains("bad_args"),
        "{stderr}"
    );
    let unknown = call(args(&["steal", "[]"])).await.unwrap();
    let stderr = String::from_utf8(unknown.stderr).unwrap();
    assert!(stderr.contains("steal"), "{stderr}");
    let private = call(args(&["fail", "[]"])).await.unwrap();
    assert_eq!(
        private.status.code(),
        Some(1),
        "a private callable is not reachable"
    );
    let not_json = call(args(&["stock", "kiwi"])).await.unwrap();
    assert!(String::from_utf8(not_json.stderr)
        .unwrap()
        .contains("JSON array"));

    tail.start_kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backs_up_a_running_server_through_its_admin_routes() {
    let admin = builder().admin(|request| {
        match request
            .headers
            .get("authorization")
            .and_then(|t| t.to_str().ok())
        {
            Some("Bearer s3cret") => Ok(None),
            _ => Err(agents::refuse(401, "who are you?")),
        }
    });
    let rt = TestRuntime::start(admin).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let serving = rt.runtime().clone();
    tokio::spawn(async move { serving.serve_on(listener).await });
    for (shop, item) in [("a", "apple"), ("a", "pear"), ("b", "fig")] {
        rt.agent::<Shop>(shop).stock(item.into()).await.unwrap();
    }

    let backups = tempfile::tempdir().unwrap();
    let dest = backups.path().join("backup");
    let dest = dest.to_str().unwrap().to_owned();
    let run = |token: Option<&'static str>, args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            agents_with(token, &args)
        })
    };
    let backup = |dest: &str| vec!["backup".to_owned(), url.clone(), dest.to_owned()];
    let stderr = |out: Output| {
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };

    // Behind the admin hook, and only into an absolute path.
    let refused = stderr(run(None, backup(&dest)).await.unwrap());
    assert!(
        refused.contains("401") && refused.contains("who are you?"),
        "{refused}"
    );
    let relative = stderr(run(Some("s3cret"), backup("backup")).await.unwrap());
    assert!(relative.contains("absolute path"), "{relative}");

    // While it serves: every agent, read back after a restore.
    let out = run(Some("s3cret"), backup(&dest)).await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let report = json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(report["agents"], 2, "{report}");
    assert_eq!(report["dest"], dest.as_str());
    assert_eq!(rt.agent::<Shop>("b").stock("kiwi".into()).await.unwrap(), 2);
    let restored = backups.path().join("restored");
    let restored = restored.to_str().unwrap();
    assert!(ok(&["restore", &dest, restored]).contains("restored 2 agents"));
    let shown = json(&ok(&["show", restored, "shop/a", "--json"]));
    assert_eq!(shown["tables"]["items"], 2);
    let shown = json(&ok(&["show", restored, "shop/b", "--json"]));
    assert_eq!(
        shown["tables"]["items"], 1,
        "what came after the backup is not in it"
    );

    // A second backup into the same directory is refused; so is a server without admin routes.
    let again = stderr(run(Some("s3cret"), backup(&dest)).await.unwrap());
    assert!(again.contains("not empty"), "{again}");
    let plain = TestRuntime::start(builder()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_url = format!("http://{}", listener.local_addr().unwrap());
    let serving = plain.runtime().clone();
    tokio::spawn(async move { serving.serve_on(listener).await });
    let other = backups.path().join("other");
    let args = vec![
        "backup".to_owned(),
        plain_url,
        other.to_str().unwrap().to_owned(),
    ];
    let off = stderr(run(Some("s3cret"), args).await.unwrap());
    assert!(off.contains("has no admin routes"), "{off}");
}
