//! Backups under load: `Runtime::backup` while calls run restores to a data dir that holds
//! every call acknowledged before the backup started, whose alarm index matches its agents, and
//! whose every database passes `PRAGMA integrity_check`.

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use agents::prelude::*;

const AGENTS: u64 = 40;
const CLIENTS: u64 = 8;

/// Keeps the ids it is given.
#[derive(Default)]
pub struct Ledger;

impl Agent for Ledger {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.sql()
            .execute_batch("CREATE TABLE IF NOT EXISTS entries(id INTEGER PRIMARY KEY)")?;
        Ok(())
    }
}

#[agent]
impl Ledger {
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>, id: u64) -> Result<(), AppError> {
        ctx.sql()
            .execute("INSERT INTO entries(id) VALUES (?1)", [id])?;
        Ok(())
    }

    /// Schedules `nothing` a day ahead.
    #[callable]
    pub async fn plan(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.schedule(
            When::after(Duration::from_secs(86_400)),
            Self::calls().nothing(),
        )?;
        Ok(())
    }

    #[callable(private)]
    pub async fn nothing(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        Ok(())
    }

    #[callable]
    pub async fn ids(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<u64>, AppError> {
        let mut stmt = ctx.sql().prepare("SELECT id FROM entries")?;
        let ids = stmt.query_map([], |r| r.get(0))?;
        Ok(ids.collect::<Result<_, _>>()?)
    }
}

fn builder() -> agents::Builder {
    // Fewer live agents than agents: some are hibernated whenever the backup reaches them.
    Runtime::builder().max_live_agents(16).agent::<Ledger>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_call_acknowledged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = builder().data_dir(dir.path()).build().unwrap();
    for a in (0..AGENTS).step_by(5) {
        runtime
            .agent::<Ledger>(&format!("l{a}"))
            .plan()
            .await
            .unwrap();
    }

    // Clients add ids to agents in turn until told to stop, noting when each was acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (runtime, stop) = (runtime.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let agent = format!("l{}", (c + n * CLIENTS) % AGENTS);
                    let id = c << 32 | n;
                    runtime.agent::<Ledger>(&agent).add(id).await.unwrap();
                    acked.push((agent, id, Instant::now()));
                }
                acked
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let dest = tempfile::tempdir().unwrap();
    let backup = dest.path().join("backup");
    let started = Instant::now();
    let report = runtime.backup(&backup).await.unwrap();
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let mut before: HashMap<String, BTreeSet<u64>> = HashMap::new();
    let (mut acked, mut during) = (0, 0);
    for client in clients {
        for (agent, id, at) in client.await.unwrap() {
            acked += 1;
            if at < started {
                before.entry(agent).or_default().insert(id);
            } else {
                during += 1;
            }
        }
    }
    runtime.shutdown().await;
    assert_eq!(report.agents, AGENTS, "{report:?}");
    let before_count: usize = before.values().map(BTreeSet::len).sum();
    assert!(
        before_count > 0 && during > 0,
        "the load ran before and during the backup"
    );

    // Restored into a new data dir: every database whole, every call acknowledged before the
    // backup there, the alarms of the agents that have schedules in the index.
    let restored = dest.path().join("restored");
    let restored_report = agents::inspect::restore(&backup, &restored).unwrap();
    assert_eq!(restored_report.agents, AGENTS);
    let databases = common::agent_databases(&restored);
    assert_eq!(databases.len(), AGENTS as usize);
    databases.iter().for_each(|path| common::assert_whole(path));
    common::assert_whole(&restored.join("alarms.sqlite"));
    common::assert_whole(&restored.join("catalog.sqlite"));

    let runtime = builder().data_dir(&restored).build().unwrap();
    assert_eq!(runtime.pending_alarms(), (AGENTS as usize).div_ceil(5));
    assert_eq!(
        runtime.agents::<Ledger>(None, 100).await.unwrap().len(),
        AGENTS as usize
    );
    let mut missing = Vec::new();
    for (agent, ids) in &before {
        let kept: BTreeSet<u64> = runtime
            .agent::<Ledger>(agent)
            .ids()
            .await
            .unwrap()
            .into_iter()
            .collect();
        missing.extend(ids.difference(&kept).map(|id| (agent.clone(), *id)));
    }
    assert!(
        missing.is_empty(),
        "acknowledged before the backup, not in it: {missing:?}"
    );
    runtime.shutdown().await;
    eprintln!(
        "backup under load: {} agents, {} bytes in {took:?}; {acked} calls acknowledged, {before_count} before it (all restored), {during} during or after",
        report.agents, report.bytes
    );

    // A backup goes to a new directory, and a restore into one without a data dir.
    let again = runtime_on(dir.path());
    let refused = again.backup(&backup).await.unwrap_err().to_string();
    assert!(refused.contains("is not empty"), "{refused}");
    again.shutdown().await;
    let refused = agents::inspect::restore(&backup, &restored)
        .unwrap_err()
        .to_string();
    assert!(refused.contains("already holds a data dir"), "{refused}");
}

fn runtime_on(dir: &std::path::Path) -> Runtime {
    builder().data_dir(dir).build().unwrap()
}
