//! A kill loop: a serving process is killed with SIGKILL 20 times under mixed load — calls that
//! write, posts broadcast to every socket, schedules due a moment later — and restarted on the
//! same data dir. Afterwards no acknowledged write is missing, every acknowledged schedule has
//! run, and every database passes `PRAGMA integrity_check`.

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use agents::prelude::*;

/// Set (to the data dir) in the server processes the loop starts.
const CHILD: &str = "AGENTS_KILL_LOOP_DIR";
const KILLS: usize = 20;
const AGENTS: usize = 6;

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

/// The server's side: a no-op unless the loop started this process.
#[test]
fn kill_loop_server() {
    common::serve_in_child(CHILD, || {}, || Runtime::builder().agent::<Mixed>());
}

/// What the clients were told was done.
#[derive(Default)]
struct Acked {
    adds: HashMap<String, i64>,
    posts: HashMap<String, BTreeSet<u64>>,
    ticks: HashMap<String, BTreeSet<u64>>,
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
        match method {
            "add" => *acked.adds.entry(name.clone()).or_default() += 1,
            "post" => _ = acked.posts.entry(name.clone()).or_default().insert(id),
            _ => _ = acked.ticks.entry(name.clone()).or_default().insert(id),
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_under_mixed_load_lose_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Acked::default();
    for kill in 0..KILLS {
        let (mut server, addr) = common::start_child("kill_loop_server", CHILD, dir.path()).await;
        let clients: Vec<_> = (0..AGENTS)
            .map(|a| {
                let first_id = ((kill * AGENTS + a) as u64) << 20;
                tokio::spawn(client(addr, format!("m{a}"), first_id))
            })
            .collect();
        // Kill it mid-load, at a moment that moves from one round to the next.
        tokio::time::sleep(Duration::from_millis(150 + 20 * kill as u64)).await;
        server.start_kill().unwrap(); // SIGKILL
        server.wait().await.unwrap();
        for c in clients {
            let round = c.await.unwrap();
            for (name, n) in round.adds {
                *acked.adds.entry(name).or_default() += n;
            }
            for (name, ids) in round.posts {
                acked.posts.entry(name).or_default().extend(ids);
            }
            for (name, ids) in round.ticks {
                acked.ticks.entry(name).or_default().extend(ids);
            }
        }
    }
    let calls: usize = acked.adds.values().sum::<i64>() as usize
        + acked.posts.values().map(BTreeSet::len).sum::<usize>()
        + acked.ticks.values().map(BTreeSet::len).sum::<usize>();
    assert!(
        calls > KILLS * AGENTS,
        "the load ran ({calls} acknowledged calls)"
    );

    // A last runtime on the data dir: schedules acknowledged before a kill run now.
    let runtime = Runtime::builder()
        .data_dir(dir.path())
        .agent::<Mixed>()
        .build()
        .unwrap();
    for a in 0..AGENTS {
        let name = format!("m{a}");
        let agent = runtime.agent::<Mixed>(&name);
        let expected_ticks = acked.ticks.get(&name).cloned().unwrap_or_default();
        let mut seen = agent.seen().await.unwrap();
        for _ in 0..300 {
            let ran: BTreeSet<u64> = seen.2.iter().copied().collect();
            if expected_ticks.is_subset(&ran) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            seen = agent.seen().await.unwrap();
        }
        let (count, posts, ticks) = seen;
        let adds = acked.adds.get(&name).copied().unwrap_or(0);
        assert!(
            count >= adds,
            "{name}: {adds} adds acknowledged, {count} kept"
        );
        let posts: BTreeSet<u64> = posts.into_iter().collect();
        let missing: Vec<_> = acked
            .posts
            .get(&name)
            .into_iter()
            .flatten()
            .filter(|id| !posts.contains(id))
            .collect();
        assert!(
            missing.is_empty(),
            "{name}: acknowledged posts lost: {missing:?}"
        );
        let ticks: BTreeSet<u64> = ticks.into_iter().collect();
        let missing: Vec<_> = expected_ticks.difference(&ticks).collect();
        assert!(
            missing.is_empty(),
            "{name}: acknowledged schedules that never ran: {missing:?}"
        );
    }
    runtime.shutdown().await;
    eprintln!("kill loop: {KILLS} SIGKILLs, {calls} acknowledged calls, none lost");

    // Every database whole, the alarm index too.
    let databases = common::agent_databases(dir.path());
    databases.iter().for_each(|path| common::assert_whole(path));
    common::assert_whole(&dir.path().join("alarms.sqlite"));
    let checked = databases.len();
    assert_eq!(checked, AGENTS, "one database per agent");
}
