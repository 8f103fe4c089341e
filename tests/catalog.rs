//! The catalog: every agent that exists is listed, with its figures, across restarts, a
//! SIGKILL and hibernations; destroyed agents and junk requests are not; a class no registered
//! type has is reported.

mod common;

use std::{collections::BTreeMap, time::Duration};

use agents::{prelude::*, AgentInfo, AgentKey};

/// Set (to the data dir) in the server process the test starts and kills.
const CHILD: &str = "AGENTS_CATALOG_DIR";

/// Keeps blobs of a given size, and schedules a call an hour ahead if asked.
#[derive(Default)]
pub struct Notes;

impl Agent for Notes {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.sql()
            .execute_batch("CREATE TABLE IF NOT EXISTS notes(body BLOB NOT NULL)")?;
        Ok(())
    }
}

#[agent]
impl Notes {
    /// Keeps `bytes` bytes; with `later`, also schedules `nothing` an hour ahead.
    #[callable]
    pub async fn keep(
        &mut self,
        ctx: &mut Ctx<Self>,
        bytes: usize,
        later: bool,
    ) -> Result<(), AppError> {
        ctx.sql()
            .execute("INSERT INTO notes(body) VALUES (zeroblob(?1))", [bytes])?;
        if later {
            ctx.schedule(
                When::after(Duration::from_secs(3600)),
                Self::calls().nothing(),
            )?;
        }
        Ok(())
    }

    #[callable(private)]
    pub async fn nothing(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        Ok(())
    }
}

/// The server a round of the test kills: a no-op unless the test started this process.
#[test]
fn catalog_server() {
    common::serve_in_child(CHILD, || {}, || Runtime::builder().agent::<Notes>());
}

fn runtime(dir: &std::path::Path) -> Runtime {
    Runtime::builder()
        .data_dir(dir)
        .agent::<Notes>()
        .build()
        .unwrap()
}

/// Agent `i`'s name, and what it keeps: its size and whether it schedules.
fn agent(i: usize) -> (String, usize, bool) {
    (format!("n{i:04}"), 100 * (i % 50), i.is_multiple_of(7))
}

/// Every agent the catalog lists for `Notes`, read in pages of 100.
async fn listed(runtime: &Runtime) -> Vec<AgentInfo> {
    let mut all: Vec<AgentInfo> = Vec::new();
    loop {
        let after = all.last().map(|a| a.name.clone());
        let page = runtime
            .agents::<Notes>(after.as_deref(), 100)
            .await
            .unwrap();
        assert!(page.len() <= 100);
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

#[tokio::test]
async fn an_agent_whose_file_a_stopped_activation_made_is_listed_while_live() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    rt.agent::<Notes>("first").keep(1, false).await.unwrap();
    // An activation makes the file (a copy of the template) before it opens it: one stopped
    // in between (a shutdown) leaves the copy, which the next activation opens.
    let template = std::fs::read_dir(dir.path().join("agents"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".template-")
        })
        .expect("the first agent's file was made from the template");
    let left = rt.database_path::<Notes>("left").unwrap();
    std::fs::copy(template, left).unwrap();
    rt.agent::<Notes>("left").keep(1, false).await.unwrap();
    assert!(rt.is_live::<Notes>("left"));
    let names: Vec<String> = listed(&rt).await.into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["first", "left"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_is_listed_across_restarts_a_sigkill_and_hibernations() {
    let dir = tempfile::tempdir().unwrap();

    // 400 agents, half of them hibernated, then a clean shutdown.
    let first = runtime(dir.path());
    for i in 0..400 {
        let (name, bytes, later) = agent(i);
        first
            .agent::<Notes>(&name)
            .keep(bytes, later)
            .await
            .unwrap();
        if i % 2 == 0 {
            assert!(first.hibernate::<Notes>(&name).await.unwrap());
        }
    }
    first.shutdown().await;

    // 300 more in a server process killed with SIGKILL while they are live: the catalog's
    // last notes may be lost with it.
    let (mut server, addr) = common::start_child("catalog_server", CHILD, dir.path()).await;
    for i in 400..700 {
        let (name, bytes, later) = agent(i);
        let path = format!("/agents/notes/{name}/call/keep");
        let (status, body) =
            common::http_request(addr, "POST", &path, &format!("[{bytes}, {later}]")).await;
        assert_eq!(status, 200, "{body}");
    }
    server.start_kill().unwrap();
    server.wait().await.unwrap();

    // 300 more, live while listed; one destroyed; junk on new names creates nothing.
    let third = runtime(dir.path());
    for i in 700..1000 {
        let (name, bytes, later) = agent(i);
        third
            .agent::<Notes>(&name)
            .keep(bytes, later)
            .await
            .unwrap();
    }
    third.agent::<Notes>("gone").keep(1, false).await.unwrap();
    third.destroy::<Notes>("gone").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = third.clone();
    tokio::spawn(async move { serving.serve_on(listener).await });
    for i in 0..5 {
        let path = format!("/agents/notes/junk{i}/call/keep");
        let (status, _) = common::http_request(addr, "POST", &path, "[\"not a number\", 1]").await;
        assert_eq!(status, 400);
    }
    let all = listed(&third).await;
    let names: Vec<&str> = all.iter().map(|a| a.name.as_str()).collect();
    let expected: Vec<String> = (0..1000).map(|i| agent(i).0).collect();
    let extra: Vec<_> = names
        .iter()
        .filter(|n| !expected.contains(&n.to_string()))
        .collect();
    assert!(extra.is_empty(), "listed, but no such agent: {extra:?}");
    assert_eq!(names, expected, "every agent once, by name");
    assert!(
        all[700..].iter().all(|a| a.live),
        "the third runtime's are live"
    );
    assert!(all[..700].iter().all(|a| !a.live));
    for a in &all {
        assert_eq!(a.class, "notes");
        assert_eq!(a.id, AgentKey::new("notes", &a.name).unwrap().id());
        assert!(a.created <= a.last_active);
    }
    third.shutdown().await;

    // After a clean shutdown every agent's figures are those of its files; and the same once
    // the catalog is lost (or the data dir is older than it), from the files alone.
    check_figures(dir.path()).await;
    for file in ["catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"] {
        let _ = std::fs::remove_file(dir.path().join(file));
    }
    check_figures(dir.path()).await;
}

/// Checks that the catalog of a runtime started on `dir` lists the 1,000 agents with the
/// figures of their files.
async fn check_figures(dir: &std::path::Path) {
    let runtime = runtime(dir);
    assert!(runtime.unregistered_classes().is_empty());
    let all = listed(&runtime).await;
    assert_eq!(all.len(), 1000);
    let files: BTreeMap<String, u64> = common::agent_databases(dir)
        .into_iter()
        .map(|path| {
            let id = path.file_stem().unwrap().to_string_lossy().into_owned();
            let wal = path.with_extension("sqlite-wal");
            let size = std::fs::metadata(&path).unwrap().len()
                + std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            (id, size)
        })
        .collect();
    assert_eq!(files.len(), 1000, "one file per agent");
    for (i, a) in all.iter().enumerate() {
        let (_, bytes, later) = agent(i);
        assert_eq!(a.size, files[&a.id], "{}: size", a.name);
        assert!(a.size >= bytes as u64, "{}: {} bytes kept", a.name, bytes);
        assert_eq!(a.schedules, u64::from(later), "{}: schedules", a.name);
        assert_eq!(a.dead_letters, 0);
    }
    runtime.shutdown().await;
}

/// The same agents under a class that no registered type has any more.
#[derive(Default)]
pub struct Renamed;

impl Agent for Renamed {}

#[agent(class = "old-notes")]
impl Renamed {
    #[callable]
    pub async fn touch(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.kv().put("touched", &true)?;
        Ok(())
    }
}

#[tokio::test]
async fn a_class_that_no_registered_type_has_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let before = Runtime::builder()
        .data_dir(dir.path())
        .agent::<Renamed>()
        .build()
        .unwrap();
    for name in ["a", "b", "c"] {
        before.agent::<Renamed>(name).touch().await.unwrap();
    }
    before.shutdown().await;

    // The type is gone (renamed, say): its agents are reported, and still listed.
    let after = runtime(dir.path());
    assert_eq!(
        after.unregistered_classes(),
        [("old-notes".to_owned(), 3)].as_slice()
    );
    after.shutdown().await;
}
