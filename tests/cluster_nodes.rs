//! Cluster mode with three node processes on one real PostgreSQL database (each its own data
//! dir and port; requests reach any of them and are forwarded to the agent's node):
//! - an owner SIGKILLed under load: every acknowledged write is there afterwards, its agents
//!   answer again within the lease + 2 s, and every database passes `integrity_check`;
//! - an owner SIGSTOPped past its lease while a write of its is pending: another node takes the
//!   agent and writes; woken with SIGCONT, the old owner's write is refused, its reply is not a
//!   success, and the data holds only the new owner's history; a read it had pending is
//!   refused too (it may be stale);
//! - the alarms of a killed node's agents fire on another node, no later than the lease + 2 s
//!   after they were due, with nothing else to wake them;
//! - an agent's typed calls reach the node that has the callee (an internal class too), in
//!   the caller's trace, and a cycle of calls across nodes is told as one in a process is;
//! - a WebSocket forwarded to an owner that is killed is closed with 1012; the client connects
//!   again (through another node) and goes on where it was.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use agents::{prelude::*, testing::TestDatabase, ClusterOptions};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Each node's lease: a node that stops renewing is dead to the others after this long.
const LEASE: Duration = Duration::from_secs(2);

/// The tests run one at a time: three nodes each on two cores are load enough (a node too
/// starved to renew its lease in time would lose its agents, as it should, but not on cue).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default)]
pub struct Tally;

impl Agent for Tally {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&[
            "CREATE TABLE adds(id INTEGER PRIMARY KEY, amount INTEGER NOT NULL)",
            "CREATE TABLE rings(due_ms INTEGER NOT NULL, rung_ms INTEGER NOT NULL)",
        ])?;
        Ok(())
    }
}

#[agent]
impl Tally {
    /// Records `amount`; returns how many adds there are.
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>, amount: i64) -> Result<i64, AppError> {
        ctx.sql()
            .execute("INSERT INTO adds(amount) VALUES (?1)", [amount])?;
        self.count(ctx).await
    }

    /// `add`, after waiting `ms` first (a write still pending when its node is paused).
    #[callable]
    pub async fn slow_add(
        &mut self,
        ctx: &mut Ctx<Self>,
        amount: i64,
        ms: u64,
    ) -> Result<i64, AppError> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.add(ctx, amount).await
    }

    /// Schedules `ring` `ms` from now; returns when it is due (ms since the epoch).
    #[callable]
    pub async fn remind(&mut self, ctx: &mut Ctx<Self>, ms: u64) -> Result<u64, AppError> {
        let due = now_ms() + ms;
        let when = When::after(Duration::from_millis(ms));
        ctx.schedule(when, Self::calls().ring(due))?;
        Ok(due)
    }

    #[callable(private)]
    pub async fn ring(&mut self, ctx: &mut Ctx<Self>, due: u64) -> Result<(), AppError> {
        let rung = now_ms();
        ctx.sql().execute(
            "INSERT INTO rings(due_ms, rung_ms) VALUES (?1, ?2)",
            [due as i64, rung as i64],
        )?;
        Ok(())
    }

    /// `(due, rung)` of every ring, in ms since the epoch.
    #[callable]
    pub async fn rings(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<(u64, u64)>, AppError> {
        let sql = ctx.sql();
        let mut query = sql.prepare("SELECT due_ms, rung_ms FROM rings")?;
        let rows = query.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deposits `amount` in the (internal) vault `vault`: its balance.
    #[callable]
    pub async fn relay(
        &mut self,
        ctx: &mut Ctx<Self>,
        vault: String,
        amount: i64,
    ) -> Result<i64, AppError> {
        Ok(ctx.agent::<Vault>(&vault).deposit(amount).await?)
    }

    /// The trace this call runs in, and the one the vault's call made from it runs in.
    #[callable]
    pub async fn traces(
        &mut self,
        ctx: &mut Ctx<Self>,
        vault: String,
    ) -> Result<(String, String), AppError> {
        let theirs = ctx.agent::<Vault>(&vault).trace_id().await?;
        Ok((trace_id(), theirs))
    }

    /// Asks the tally `other` to ask this one how many adds it has: a cycle.
    #[callable]
    pub async fn bounce(&mut self, ctx: &mut Ctx<Self>, other: String) -> Result<i64, AppError> {
        let me = ctx.name().to_owned();
        Ok(ctx.agent::<Tally>(&other).bounce_back(me).await?)
    }

    #[callable]
    pub async fn bounce_back(
        &mut self,
        ctx: &mut Ctx<Self>,
        other: String,
    ) -> Result<i64, AppError> {
        Ok(ctx.agent::<Tally>(&other).count().await?)
    }

    #[callable]
    pub async fn count(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT count(*) FROM adds", [], |r| r.get(0))?)
    }

    /// `sum`, after waiting `ms` first (a read still pending when its node is paused).
    #[callable]
    pub async fn slow_sum(&mut self, ctx: &mut Ctx<Self>, ms: u64) -> Result<i64, AppError> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.sum(ctx).await
    }

    #[callable]
    pub async fn sum(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT coalesce(sum(amount), 0) FROM adds", [], |r| {
                r.get(0)
            })?)
    }
}

/// Reached only by other agents (never by the network).
#[derive(Default)]
pub struct Vault {
    balance: i64,
}

impl Agent for Vault {}

#[agent(internal)]
impl Vault {
    #[callable]
    pub async fn deposit(&mut self, _ctx: &mut Ctx<Self>, amount: i64) -> i64 {
        self.balance += amount;
        self.balance
    }

    /// The trace this call runs in.
    #[callable]
    pub async fn trace_id(&mut self, _ctx: &mut Ctx<Self>) -> String {
        trace_id()
    }
}

/// The trace id of the event running on this task.
fn trace_id() -> String {
    let current = agents::client::trace::current();
    current
        .map(|t| t.trace_id().to_string())
        .unwrap_or_default()
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.unwrap().as_millis() as u64
}

/// A node, in a process of its own: started by [`Node::start`] as this test binary running only
/// this test, with `AGENTS_NODE_DIR` (its data dir) and `AGENTS_NODE_PG` (the database) set.
#[test]
fn node_process() {
    common::serve_in_child_at(
        "AGENTS_NODE_DIR",
        || {},
        |addr| {
            let postgres = std::env::var("AGENTS_NODE_PG").unwrap();
            let options = ClusterOptions::new(postgres, addr.to_string()).lease(LEASE);
            Runtime::builder()
                .cluster(options)
                .agent::<Tally>()
                .agent::<Vault>()
        },
    );
}

/// A node process, its data dir and its address.
struct Node {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Node {
    async fn start(db: &TestDatabase) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let url = std::ffi::OsStr::new(&db.url);
        let more = [("AGENTS_NODE_PG", url)];
        let (child, addr) =
            common::start_child_with("node_process", "AGENTS_NODE_DIR", dir.path(), &more).await;
        Node { child, dir, addr }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGKILL, and waits until it is gone.
    async fn kill(&mut self) {
        self.signal("-KILL");
        self.child.wait().await.unwrap();
    }
}

/// Three node processes on a database of their own (one test's at a time).
struct Cluster {
    nodes: [Node; 3],
    // Dropped after the nodes: the database, then the turn.
    _db: TestDatabase,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    async fn start() -> Cluster {
        let turn = ONE_AT_A_TIME.lock().await;
        let db = TestDatabase::new().await;
        let nodes = [
            Node::start(&db).await,
            Node::start(&db).await,
            Node::start(&db).await,
        ];
        Cluster {
            nodes,
            _db: db,
            _turn: turn,
        }
    }
}

/// `POST /agents/tally/{name}/call/{method}` with `args` to the node at `addr`: the status and
/// the body, or `None` if the node could not be reached or did not answer.
async fn call(addr: SocketAddr, name: &str, method: &str, args: Value) -> Option<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = args.to_string();
    let request = format!(
        "POST /agents/tally/{name}/call/{method} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8(response).ok()?;
        let status = response.get(9..12)?.parse().ok()?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .ok()
        .flatten()
}

/// `call`, answered 200: its result.
async fn ok(addr: SocketAddr, name: &str, method: &str, args: Value) -> Value {
    match call(addr, name, method, args).await {
        Some((200, value)) => value,
        other => panic!("{name}.{method} through {addr}: {other:?}"),
    }
}

/// `call` until it is answered 200 (or `within` passed): its result and when it came.
async fn ok_within(
    addr: SocketAddr,
    name: &str,
    method: &str,
    args: Value,
    within: Duration,
) -> (Value, Instant) {
    let deadline = Instant::now() + within;
    loop {
        match call(addr, name, method, args.clone()).await {
            Some((200, value)) => return (value, Instant::now()),
            other if Instant::now() > deadline => {
                panic!("{name}.{method} through {addr}, still: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Every agent database of the three nodes' data dirs passes `integrity_check` (the nodes are
/// killed first: each holds its open databases' locks).
async fn all_whole(nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        if node.child.try_wait().unwrap().is_none() {
            node.kill().await;
        }
    }
    for node in nodes.iter() {
        for db in common::agent_databases(node.dir.path()) {
            common::assert_whole(&db);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_outlives_its_node() {
    let mut cluster = Cluster::start().await;
    let nodes = &mut cluster.nodes;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    // Six tallies, each first reached through a node of its own: t0 and t3 are node 0's.
    const AGENTS: usize = 6;
    for i in 0..AGENTS {
        assert_eq!(
            ok(addrs[i % 3], &format!("t{i}"), "add", json!([1])).await,
            1
        );
    }

    // Load through all three nodes: each tally's adds, acknowledged and sent.
    let stop = Arc::new(AtomicBool::new(false));
    let down = Arc::new(AtomicBool::new(false)); // node 0 is gone
    let mut load = Vec::new();
    for i in 0..AGENTS {
        let (stop, down, addrs) = (stop.clone(), down.clone(), addrs.clone());
        load.push(tokio::spawn(async move {
            let (name, mut acked, mut sent) = (format!("t{i}"), 1u64, 1u64);
            let mut recovered = None;
            for n in i.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let through = n % 3;
                if through == 0 && down.load(Ordering::Relaxed) {
                    continue;
                }
                sent += 1;
                match call(addrs[through], &name, "add", json!([1])).await {
                    Some((200, _)) => {
                        acked += 1;
                        if down.load(Ordering::Relaxed) && recovered.is_none() {
                            recovered = Some(Instant::now());
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            (name, acked, sent, recovered)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes[0].kill().await;
    down.store(true, Ordering::Relaxed);
    let killed = Instant::now();
    tokio::time::sleep(LEASE + Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);

    for task in load {
        let (name, acked, sent, recovered) = task.await.unwrap();
        let count = ok(addrs[1], &name, "count", json!([])).await;
        let count = count.as_u64().unwrap();
        assert!(
            acked <= count && count <= sent,
            "{name}: {acked} acknowledged, {sent} sent, {count} kept"
        );
        let recovered = recovered.unwrap_or_else(|| panic!("{name} never answered again"));
        let after = recovered - killed;
        assert!(
            after <= LEASE + Duration::from_secs(2),
            "{name} answered again after {after:?}"
        );
        // (t0 and t3 moved; the others did not wait on anything.)
        println!("{name}: {acked} acknowledged of {sent}, {count} kept; answering {after:?} after the kill");
    }
    all_whole(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_can_never_commit_for_an_agent_that_moved() {
    let mut cluster = Cluster::start().await;
    let nodes = &mut cluster.nodes;
    let (old, new) = (nodes[0].addr, nodes[1].addr);
    assert_eq!(ok(old, "f", "add", json!([1])).await, 1);

    assert_eq!(ok(old, "g", "add", json!([1])).await, 1);

    // A write of node 0's is pending (its handler waits) when node 0 is paused past its lease;
    // so is a read, of another agent.
    let pending = tokio::spawn(call(old, "f", "slow_add", json!([1000, 400])));
    let reading = tokio::spawn(call(old, "g", "slow_sum", json!([400])));
    tokio::time::sleep(Duration::from_millis(100)).await;
    nodes[0].signal("-STOP");
    tokio::time::sleep(LEASE + Duration::from_millis(500)).await;

    // Node 1 takes the agents and writes.
    let (count, _) = ok_within(new, "f", "add", json!([7]), Duration::from_secs(5)).await;
    assert_eq!(count, 2);
    assert_eq!(ok(new, "g", "add", json!([5])).await, 2);

    // Node 0 wakes: its write is refused, and its reply is no success.
    nodes[0].signal("-CONT");
    let answer = pending.await.unwrap();
    let (status, body) = answer.expect("node 0 answers once awake");
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("moved"),
        "{body}"
    );
    // Nor does the read: what it read is no longer the agent's.
    let (status, body) = reading.await.unwrap().expect("node 0 answers once awake");
    assert_eq!(status, 503, "a stale read: {body}");

    // The data holds only the new owner's history, through any node (node 0 forwards now; an
    // instance it had from before its lapse may answer 503 once, as it leaves).
    let within = Duration::from_secs(5);
    for node in nodes.iter() {
        for (name, sum) in [("f", 8), ("g", 6)] {
            let (value, _) = ok_within(node.addr, name, "sum", json!([]), within).await;
            assert_eq!(value, sum, "{name}");
        }
    }
    let (count, _) = ok_within(old, "f", "add", json!([1]), within).await;
    assert_eq!(count, 3);
    all_whole(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_to_a_lost_node_is_closed_with_1012_and_goes_on_elsewhere() {
    let mut cluster = Cluster::start().await;
    let nodes = &mut cluster.nodes;
    assert_eq!(ok(nodes[0].addr, "w", "add", json!([1])).await, 1);

    // A socket through node 1, to the agent node 0 has.
    let path = "/agents/tally/w";
    let json_protocol = Some("agents.v1.json");
    let mut socket = common::ws_connect(nodes[1].addr, path, json_protocol)
        .await
        .unwrap();
    assert_eq!(common::next_json(&mut socket).await["type"], "identity");
    assert_eq!(
        common::call(&mut socket, 1, "add", json!([1])).await["ok"],
        2
    );

    nodes[0].kill().await;
    let closed = common::next_close(&mut socket)
        .await
        .expect("a close frame");
    assert_eq!(u16::from(closed.code), 1012, "{closed:?}");

    // It connects again, through node 2, and goes on where it was.
    let ids = AtomicU64::new(2);
    let deadline = Instant::now() + LEASE + Duration::from_secs(2);
    let reply = loop {
        let mut socket = common::ws_connect(nodes[2].addr, path, json_protocol)
            .await
            .unwrap();
        // The identity frame first; refused or closed while the lease runs (the agent cannot
        // be taken yet).
        let id = ids.fetch_add(1, Ordering::Relaxed);
        match add_over(&mut socket, id).await {
            Ok(reply) if reply.get("ok").is_some() => break reply,
            outcome => assert!(
                Instant::now() < deadline,
                "w did not answer again: {outcome:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply["ok"], 3, "{reply}");
    all_whole(nodes).await;
}

/// Sends `add(1)` as call `id` over `socket`: its reply, or the frame that closed the socket.
async fn add_over(socket: &mut common::Socket, id: u64) -> Result<Value, Message> {
    common::send_json(
        socket,
        json!({"type": "call", "id": id, "method": "add", "args": [1]}),
    )
    .await;
    loop {
        match common::next_frame(socket).await {
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "reply" && frame["id"] == id {
                    return Ok(frame);
                }
            }
            other => return Err(other),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_alarms_fire_on_another_node() {
    let mut cluster = Cluster::start().await;
    let nodes = &mut cluster.nodes;
    // Four agents of node 0's, each with a reminder 3 s ahead; then node 0 dies.
    let names = ["r0", "r1", "r2", "r3"];
    for name in names {
        ok(nodes[0].addr, name, "remind", json!([3000])).await;
    }
    nodes[0].kill().await;

    // Nothing asks for them until well past the bound: only the alarm index can wake them.
    let bound = LEASE + Duration::from_secs(2);
    tokio::time::sleep(Duration::from_secs(3) + bound + Duration::from_millis(500)).await;
    for name in names {
        let rings = ok(nodes[1].addr, name, "rings", json!([])).await;
        let rings: Vec<(u64, u64)> = serde_json::from_value(rings).unwrap();
        let [(due, rung)] = rings[..] else {
            panic!("{name} rang {rings:?}")
        };
        let late = Duration::from_millis(rung.saturating_sub(due));
        assert!(late <= bound, "{name} rang {late:?} after it was due");
        println!("{name}: rang {late:?} after it was due");
    }
    all_whole(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_calls_reach_the_node_that_has_the_agent() {
    let mut cluster = Cluster::start().await;
    let nodes = &mut cluster.nodes;
    let [a0, a1, a2] = [nodes[0].addr, nodes[1].addr, nodes[2].addr];
    // The vault is taken by node 2, through a tally of node 2's.
    assert_eq!(ok(a2, "t2", "relay", json!(["v", 5])).await, 5);
    // Node 0's tally calls it (not live on node 0: forwarded to node 2, internal as it is).
    assert_eq!(ok(a0, "t0", "relay", json!(["v", 7])).await, 12);
    assert_eq!(ok(a1, "t1", "relay", json!(["v", 1])).await, 13);
    // One trace across the two nodes: the vault's call on node 2 joins t0's on node 0.
    let traces: (String, String) =
        serde_json::from_value(ok(a0, "t0", "traces", json!(["v"])).await).unwrap();
    assert!(!traces.0.is_empty() && traces.0 == traces.1, "{traces:?}");
    // The network still cannot reach it.
    assert_eq!(call(a0, "v", "deposit", json!([1])).await.unwrap().0, 404);

    // A cycle across nodes: a (node 0) -> b (node 1) -> a, told at once, not a deadlock.
    assert_eq!(ok(a0, "a", "add", json!([1])).await, 1);
    assert_eq!(ok(a1, "b", "add", json!([1])).await, 1);
    let started = Instant::now();
    let (status, body) = call(a0, "a", "bounce", json!(["b"])).await.unwrap();
    assert_eq!((status, &body["kind"]), (500, &json!("cycle")), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Without the cycle, the same calls are answered: b -> a.
    assert_eq!(ok(a1, "b", "bounce_back", json!(["a"])).await, 1);

    // The vault's node dies (node 0 keeps an idle connection to it): once its lease lapses,
    // node 0's calls reach the vault again, taken by another node (its balance is memory only:
    // it starts again).
    nodes[2].kill().await;
    let within = LEASE + Duration::from_secs(2);
    let (balance, _) = ok_within(a0, "t0", "relay", json!(["v", 2]), within).await;
    assert_eq!(balance, 2);
    all_whole(nodes).await;
}
