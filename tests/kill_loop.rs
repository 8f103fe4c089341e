//! Crashes under mixed load — calls that write, posts broadcast to every socket, schedules due a
//! moment later — and restarts on the same data dir:
//! - a kill loop: the serving process is killed with SIGKILL 20 times;
//! - power cuts: the serving process runs under a simulator (`common/powerloss.c`, preloaded)
//!   that journals what each write overwrites; at the cut the process is killed and every write
//!   that no fsync made durable is undone, as a machine losing power would lose it.
//!
//! Clients pause now and then, long enough for their agents to go quiet (checkpoint their WAL).
//!
//! Afterwards no acknowledged write is missing (under `Durability::Full`), every acknowledged
//! schedule has run — woken by the alarm index, with no call to the agent — and every database
//! passes `PRAGMA integrity_check`. Under `Durability::Normal` a power cut loses the last
//! commits, as documented: the test shows it (which also shows that the simulator bites).

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    ffi::OsStr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use agents::prelude::*;

/// Set (to the data dir) in the server processes the loop starts.
const CHILD: &str = "AGENTS_KILL_LOOP_DIR";
const KILLS: usize = 20;
const AGENTS: usize = 6;

/// The ticks this process ran (committed or not: what the files hold says that). Tick ids are
/// unique across this file's tests (their rounds are numbered apart), which share it.
static TICKED: std::sync::Mutex<BTreeSet<u64>> = std::sync::Mutex::new(BTreeSet::new());

/// Counts, keeps posts (and broadcasts them), and runs scheduled ticks.
#[derive(Default)]
pub struct Mixed;

impl Agent for Mixed {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.sql().execute_batch(
            "CREATE TABLE IF NOT EXISTS posts(id INTEGER PRIMARY KEY);
             CREATE TABLE IF NOT EXISTS ticks(id INTEGER PRIMARY KEY);",
        )?;
        Ok(())
    }
}

#[agent(event = "u64")]
impl Mixed {
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        let n = ctx.kv().get::<i64>("n")?.unwrap_or(0) + 1;
        ctx.kv().put("n", &n)?;
        Ok(n)
    }

    #[callable]
    pub async fn post(&mut self, ctx: &mut Ctx<Self>, id: u64) -> Result<(), AppError> {
        ctx.sql()
            .execute("INSERT INTO posts(id) VALUES (?1)", [id])?;
        ctx.broadcast(&id, &[])?;
        Ok(())
    }

    /// Schedules `tick(id)` 20 ms from now.
    #[callable]
    pub async fn later(&mut self, ctx: &mut Ctx<Self>, id: u64) -> Result<(), AppError> {
        ctx.schedule(
            When::after(Duration::from_millis(20)),
            Self::calls().tick(id),
        )?;
        Ok(())
    }

    #[callable(private)]
    pub async fn tick(&mut self, ctx: &mut Ctx<Self>, id: u64) -> Result<(), AppError> {
        TICKED.lock().unwrap().insert(id);
        ctx.sql()
            .execute("INSERT OR IGNORE INTO ticks(id) VALUES (?1)", [id])?;
        Ok(())
    }

    /// The count, the posts and the ticks that ran.
    #[callable]
    pub async fn seen(
        &mut self,
        ctx: &mut Ctx<Self>,
    ) -> Result<(i64, Vec<u64>, Vec<u64>), AppError> {
        let ids = |table: &str| -> Result<Vec<u64>, AppError> {
            let mut s = ctx.sql().prepare(&format!("SELECT id FROM {table}"))?;
            let ids = s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(ids)
        };
        let (posts, ticks) = (ids("posts")?, ids("ticks")?);
        Ok((ctx.kv().get::<i64>("n")?.unwrap_or(0), posts, ticks))
    }
}

/// Set in the server processes to the durability they run with: `normal`, or else `Full`.
const DURABILITY: &str = "AGENTS_KILL_LOOP_DURABILITY";

/// The server's side: a no-op unless a test started this process.
#[test]
fn kill_loop_server() {
    common::serve_in_child(
        CHILD,
        || {},
        || {
            let durability = match std::env::var(DURABILITY).as_deref() {
                Ok("normal") => Durability::Normal,
                _ => Durability::Full,
            };
            // Quiet after 5 ms: agents checkpoint (and give back their WAL index) between
            // their clients' bursts, so crashes and cuts find them in every state.
            Runtime::builder()
                .durability(durability)
                .quiet_after(Duration::from_millis(5))
                .agent::<Mixed>()
        },
    );
}

/// What the clients were told was done.
#[derive(Default)]
struct Acked {
    adds: HashMap<String, i64>,
    posts: HashMap<String, BTreeSet<u64>>,
    ticks: HashMap<String, BTreeSet<u64>>,
}

impl Acked {
    fn add(&mut self, round: Acked) {
        for (name, n) in round.adds {
            *self.adds.entry(name).or_default() += n;
        }
        for (name, ids) in round.posts {
            self.posts.entry(name).or_default().extend(ids);
        }
        for (name, ids) in round.ticks {
            self.ticks.entry(name).or_default().extend(ids);
        }
    }

    fn calls(&self) -> usize {
        self.adds.values().sum::<i64>() as usize
            + self.posts.values().map(BTreeSet::len).sum::<usize>()
            + self.ticks.values().map(BTreeSet::len).sum::<usize>()
    }
}

/// One client of agent `name`: add, post, schedule, in turn, until the connection breaks.
async fn client(addr: std::net::SocketAddr, name: String, first_id: u64) -> Acked {
    let mut acked = Acked::default();
    let Ok(mut ws) = common::ws_connect(
        addr,
        &format!("/agents/mixed/{name}"),
        Some("agents.v1.json"),
    )
    .await
    else {
        return acked;
    };
    use futures_util::{SinkExt, StreamExt};
    for n in 0u64.. {
        let id = first_id + n;
        let (method, args) = match n % 3 {
            0 => ("add", serde_json::json!([])),
            1 => ("post", serde_json::json!([id])),
            _ => ("later", serde_json::json!([id])),
        };
        let frame = serde_json::json!({"type": "call", "id": n, "method": method, "args": args});
        let sent = ws.send(tokio_tungstenite::tungstenite::Message::Text(
            frame.to_string().into(),
        ));
        if sent.await.is_err() {
            break;
        }
        // The reply, past the broadcasts; a broken connection ends the client.
        let reply = loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                    let frame: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if frame["type"] == "reply" && frame["id"] == n {
                        break Some(frame);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break None,
            }
        };
        let Some(reply) = reply else { break };
        assert!(reply.get("err").is_none(), "{name}: {reply}");
        if n % 16 == 15 {
            // A pause past the server's quiet period (see `kill_loop_server`).
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        match method {
            "add" => *acked.adds.entry(name.clone()).or_default() += 1,
            "post" => _ = acked.posts.entry(name.clone()).or_default().insert(id),
            _ => _ = acked.ticks.entry(name.clone()).or_default().insert(id),
        }
    }
    acked
}

/// One round: a server process on `dir` (with `env` besides), its clients, and a SIGKILL after
/// `load`. Returns what the clients were told was done.
async fn round(dir: &Path, number: usize, load: Duration, env: &[(&str, &OsStr)]) -> Acked {
    let (mut server, addr) = common::start_child_with("kill_loop_server", CHILD, dir, env).await;
    let clients: Vec<_> = (0..AGENTS)
        .map(|a| {
            let first_id = ((number * AGENTS + a) as u64) << 20;
            tokio::spawn(client(addr, format!("m{a}"), first_id))
        })
        .collect();
    tokio::time::sleep(load).await;
    server.start_kill().unwrap(); // SIGKILL
    server.wait().await.unwrap();
    let mut acked = Acked::default();
    for c in clients {
        acked.add(c.await.unwrap());
    }
    acked
}

/// What a runtime started on `dir` after the crashes holds of what was acknowledged, and what it
/// lacks: adds by how many, posts and ticks by id.
#[derive(Default)]
struct Missing {
    adds: i64,
    posts: Vec<u64>,
    ticks: Vec<u64>,
}

impl Missing {
    fn is_empty(&self) -> bool {
        self.adds == 0 && self.posts.is_empty() && self.ticks.is_empty()
    }
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = |ids: &[u64]| ids.iter().take(5).copied().collect::<Vec<_>>();
        write!(
            f,
            "{} adds, {} posts (first {:?}), {} schedules (first {:?})",
            self.adds,
            self.posts.len(),
            first(&self.posts),
            self.ticks.len(),
            first(&self.ticks)
        )
    }
}

/// The ticks that the agents' databases under `dir` record, by agent name. (A database that a
/// power cut emptied has no tables: it ran nothing.)
fn ticks_in(dir: &Path) -> HashMap<String, BTreeSet<u64>> {
    let mut ran = HashMap::new();
    for path in common::agent_databases(dir) {
        let db = rusqlite::Connection::open(path).unwrap();
        let name = "SELECT v FROM _agents_meta WHERE k = 'name'";
        let Ok(name) = db.query_row(name, [], |r| r.get::<_, String>(0)) else {
            continue;
        };
        let Ok(mut ticks) = db.prepare("SELECT id FROM ticks") else {
            continue;
        };
        let ids = ticks.query_map([], |r| r.get(0)).unwrap();
        ran.insert(name, ids.map(Result::unwrap).collect());
    }
    ran
}

/// Starts a runtime on `dir`, lets the alarm index wake the agents whose schedules are due (no
/// call reaches them meanwhile), and then compares what the databases hold with `acked`.
/// Checks every database with `PRAGMA integrity_check` first.
async fn missing(dir: &Path, acked: &Acked) -> Missing {
    let databases = common::agent_databases(dir);
    databases.iter().for_each(|path| common::assert_whole(path));
    common::assert_whole(&dir.join("alarms.sqlite"));
    assert!(databases.len() <= AGENTS, "one database per agent");

    let runtime = || {
        Runtime::builder()
            .data_dir(dir)
            .agent::<Mixed>()
            .build()
            .unwrap()
    };
    // The due schedules run, woken by the index alone (no call reaches the agents meanwhile):
    // those acknowledged and not run before the crashes.
    let acked_ticks: BTreeSet<u64> = acked.ticks.values().flatten().copied().collect();
    let ran_before: BTreeSet<u64> = ticks_in(dir).into_values().flatten().collect();
    let due: BTreeSet<u64> = acked_ticks.difference(&ran_before).copied().collect();
    let woken = runtime();
    for _ in 0..500 {
        if due.is_subset(&TICKED.lock().unwrap()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    woken.shutdown().await;
    let mut ran = ticks_in(dir);

    let runtime = runtime();
    let mut missing = Missing::default();
    for a in 0..AGENTS {
        let name = format!("m{a}");
        let (count, posts, _) = runtime.agent::<Mixed>(&name).seen().await.unwrap();
        let adds = acked.adds.get(&name).copied().unwrap_or(0);
        missing.adds += (adds - count).max(0);
        let posts: BTreeSet<u64> = posts.into_iter().collect();
        let acked_posts = acked.posts.get(&name).into_iter().flatten();
        missing
            .posts
            .extend(acked_posts.filter(|id| !posts.contains(id)));
        let ran = ran.remove(&name).unwrap_or_default();
        let acked_ticks = acked.ticks.get(&name).into_iter().flatten();
        missing
            .ticks
            .extend(acked_ticks.filter(|id| !ran.contains(id)));
    }
    runtime.shutdown().await;
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_under_mixed_load_lose_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Acked::default();
    for kill in 0..KILLS {
        // Killed mid-load, at a moment that moves from one round to the next.
        let load = Duration::from_millis(150 + 20 * kill as u64);
        acked.add(round(dir.path(), kill, load, &[]).await);
    }
    let calls = acked.calls();
    assert!(
        calls > KILLS * AGENTS,
        "the load ran ({calls} acknowledged calls)"
    );
    let missing = missing(dir.path(), &acked).await;
    assert!(missing.is_empty(), "acknowledged but lost: {missing}");
    eprintln!("kill loop: {KILLS} SIGKILLs, {calls} acknowledged calls, none lost");
}

/// The power-loss simulator, built for this run (`common/powerloss.c` as a shared library), and
/// the journal it keeps; both go when it is dropped.
struct Simulator {
    library: PathBuf,
    journal: PathBuf,
    _dir: tempfile::TempDir,
}

impl Simulator {
    fn build() -> Self {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/powerloss.c");
        let dir = tempfile::Builder::new()
            .prefix("powerloss")
            .tempdir()
            .unwrap();
        let library = dir.path().join("libpowerloss.so");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let built = std::process::Command::new(&cc)
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&library)
            .arg(&source)
            .arg("-ldl")
            .status()
            .unwrap_or_else(|e| panic!("{cc} builds the power-loss simulator: {e}"));
        assert!(built.success(), "{cc} failed on {}", source.display());
        Simulator {
            journal: dir.path().join("journal"),
            library,
            _dir: dir,
        }
    }

    /// The environment of a server process that runs under it on the data dir `root`, with
    /// `durability` (`full` or `normal`).
    fn env<'a>(&'a self, root: &'a Path, durability: &'a str) -> [(&'static str, &'a OsStr); 4] {
        [
            ("LD_PRELOAD", self.library.as_os_str()),
            ("POWERLOSS_ROOT", root.as_os_str()),
            ("POWERLOSS_JOURNAL", self.journal.as_os_str()),
            (DURABILITY, OsStr::new(durability)),
        ]
    }
}

/// One record of the simulator's journal (see `struct rec` in `common/powerloss.c`).
struct Record {
    kind: u32,
    file: (u64, u64),
    offset: u64,
    old_size: u64,
    old: Vec<u8>,
}

const UNDO: u32 = 1;
const SYNC: u32 = 2;
const NEW: u32 = 3;
const SYNC_ALL: u32 = 4;

fn records(journal: &[u8]) -> Vec<Record> {
    let mut records = Vec::new();
    let mut at = 0;
    let word = |at: usize| u64::from_ne_bytes(journal[at..at + 8].try_into().unwrap());
    // A record cut short by the kill is one whose write never happened: it is left out.
    while at + 48 <= journal.len() {
        let magic = u32::from_ne_bytes(journal[at..at + 4].try_into().unwrap());
        assert_eq!(magic, 0x504c_4f53, "a journal record at byte {at}");
        let len = word(at + 40) as usize;
        if at + 48 + len > journal.len() {
            break;
        }
        records.push(Record {
            kind: u32::from_ne_bytes(journal[at + 4..at + 8].try_into().unwrap()),
            file: (word(at + 8), word(at + 16)),
            offset: word(at + 24),
            old_size: word(at + 32),
            old: journal[at + 48..at + 48 + len].to_vec(),
        });
        at += 48 + len;
    }
    records
}

/// The power cut, after the process was killed: undoes, newest first, every write to a file
/// under `root` that the journal recorded after the file's last sync, and empties the journal.
/// Returns how many writes it undid.
fn power_cut(journal: &Path, root: &Path) -> usize {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let mut unsynced: HashMap<(u64, u64), Vec<Record>> = HashMap::new();
    for record in records(&std::fs::read(journal).unwrap()) {
        match record.kind {
            SYNC => _ = unsynced.remove(&record.file),
            SYNC_ALL => unsynced.clear(),
            // A new file under an inode number that may have been another's.
            NEW => _ = unsynced.insert(record.file, vec![record]),
            _ => unsynced.entry(record.file).or_default().push(record),
        }
    }
    // Files by device and inode, wherever renames took them.
    let mut paths = HashMap::new();
    let mut folders = vec![root.to_owned()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                folders.push(path);
            } else if meta.is_file() {
                paths.insert((meta.dev(), meta.ino()), path);
            }
        }
    }
    let mut undone = 0;
    for (file, records) in unsynced {
        let Some(path) = paths.get(&file) else {
            continue; // removed since
        };
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        for record in records.iter().rev() {
            f.write_all_at(&record.old, record.offset).unwrap();
            f.set_len(record.old_size).unwrap();
            undone += usize::from(record.kind == UNDO);
        }
    }
    std::fs::write(journal, b"").unwrap();
    undone
}

/// Rounds numbered `rounds` under `durability`, each ended by a power cut: what was acknowledged, what a
/// runtime finds missing afterwards, and how many writes the cuts undid.
async fn power_cuts(durability: &str, rounds: Range<usize>) -> (Acked, Missing, usize) {
    let dir = tempfile::tempdir().unwrap();
    let simulator = Simulator::build();
    let env = simulator.env(dir.path(), durability);
    let mut acked = Acked::default();
    let mut undone = 0;
    for (cut, number) in rounds.enumerate() {
        let load = Duration::from_millis(300 + 50 * cut as u64);
        acked.add(round(dir.path(), number, load, &env).await);
        undone += power_cut(&simulator.journal, dir.path());
    }
    let missing = missing(dir.path(), &acked).await;
    (acked, missing, undone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_no_acknowledged_write_under_full_durability() {
    const CUTS: usize = 5;
    let (acked, missing, undone) = power_cuts("full", 100..100 + CUTS).await;
    let calls = acked.calls();
    assert!(
        calls > CUTS * AGENTS,
        "the load ran ({calls} acknowledged calls)"
    );
    assert!(missing.is_empty(), "acknowledged but lost: {missing}");
    eprintln!("power cuts, Full: {CUTS} cuts undid {undone} unsynced writes; {calls} acknowledged calls, none lost");
}

/// The negative control: under `Durability::Normal` replies do not wait for an fsync, and a power
/// cut takes the writes they acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_normal_durability_lose_the_last_commits() {
    let (acked, missing, undone) = power_cuts("normal", 200..201).await;
    let calls = acked.calls();
    assert!(calls > AGENTS, "the load ran ({calls} acknowledged calls)");
    assert!(undone > 0, "the cut undid unsynced writes");
    assert!(
        !missing.is_empty(),
        "Normal acknowledged {calls} calls without a sync, and a power cut lost none of them"
    );
    eprintln!("power cut, Normal: {calls} acknowledged calls; lost {missing}");
}

/// Under `Durability::Full` every frame of a WAL is synced before its reply, so a checkpoint
/// syncs only the database's file: the simulator's journal holds one sync of the WAL (the call's
/// commit) and two of the database (its copy from the template, the checkpoint's copy of the
/// WAL into it) for one call to a new agent that then goes quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_does_not_sync_a_wal_that_is_durable_already() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let simulator = Simulator::build();
    let env = simulator.env(dir.path(), "full");
    let (mut server, addr) =
        common::start_child_with("kill_loop_server", CHILD, dir.path(), &env).await;
    let (status, total) =
        common::http_request(addr, "POST", "/agents/mixed/solo/call/add", "[]").await;
    assert_eq!((status, total), (200, serde_json::json!(1)));
    let db = common::agent_databases(dir.path())
        .pop()
        .expect("its database");
    let wal = db.with_extension("sqlite-wal");
    // Quiet after 5 ms (see `kill_loop_server`): checkpointed, and its WAL emptied.
    let started = std::time::Instant::now();
    while std::fs::metadata(&wal).unwrap().len() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the agent went quiet"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.start_kill().unwrap();
    server.wait().await.unwrap();
    let id = |path: &Path| {
        let meta = std::fs::metadata(path).unwrap();
        (meta.dev(), meta.ino())
    };
    let records = records(&std::fs::read(&simulator.journal).unwrap());
    // Syncs of `file` since it was made (its inode number may have been another file's before).
    let syncs = |file| {
        let made = records
            .iter()
            .rposition(|r| r.kind == NEW && r.file == file);
        let since = &records[made.map_or(0, |at| at + 1)..];
        since
            .iter()
            .filter(|r| r.kind == SYNC && r.file == file)
            .count()
    };
    assert_eq!(
        (syncs(id(&wal)), syncs(id(&db))),
        (1, 2),
        "syncs of the WAL, of the database"
    );
}
