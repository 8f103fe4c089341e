//! Cluster mode's benchmarks (feature `cluster`), printed as JSON lines next to single-node
//! `Durability::Full` measured in the same run: durable calls to one agent and to 1,000, how many
//! PostgreSQL transactions a call costs under load, how long a takeover takes, and what a
//! call through a node that forwards it costs.
//!
//! `cargo bench -p agents --features cluster --bench cluster` (add `-- --quick` for a smoke
//! run, `-- routing` for the calls through another node alone). It makes a PostgreSQL
//! database of its own and drops it (`testing::TestDatabase`: the server `AGENTS_TEST_PG`
//! names, by default the one on 127.0.0.1:5432).

use std::time::{Duration, Instant};

mod common;

use agents::{
    prelude::*,
    testing::{TestDatabase, TestRuntime},
    ClusterOptions,
};
use common::Counter;

/// Transactions committed in `url`'s database so far (PostgreSQL's statistics, which a backend
/// that went idle reports within 10 s).
async fn transactions(db: &TestDatabase) -> i64 {
    tokio::time::sleep(Duration::from_secs(11)).await;
    let row = db
        .client()
        .await
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    row.get(0)
}

fn full() -> TestRuntime {
    TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap()
}

fn node(url: &str, advertise: &str) -> TestRuntime {
    let options = ClusterOptions::new(url, advertise);
    TestRuntime::start(Runtime::builder().cluster(options).agent::<Counter>()).unwrap()
}

/// A node serving HTTP on a port of 127.0.0.1, which it advertises.
async fn serving(url: &str) -> (TestRuntime, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rt = node(url, &addr.to_string());
    let runtime = rt.runtime().clone();
    tokio::spawn(async move { runtime.serve_on(listener).await });
    (rt, addr)
}

fn percentile(sorted: &[Duration], p: f64) -> u128 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_micros()
}

/// `calls` sequential calls to one agent: calls/s, p50 and p99 in µs.
async fn sequential(
    agent: <Counter as agents::AgentClass>::Client,
    calls: usize,
) -> (f64, u128, u128) {
    agent.add(1).await.unwrap();
    let mut took = Vec::with_capacity(calls);
    let start = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        agent.add(1).await.unwrap();
        took.push(t.elapsed());
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    took.sort();
    (rate, percentile(&took, 0.5), percentile(&took, 0.99))
}

/// `agents` agents, each called `rounds` times by 32 concurrent callers; the first round
/// (which creates each agent) is timed apart. Returns (first round calls/s, later calls/s).
async fn many(rt: &TestRuntime, agents: usize, rounds: usize) -> (f64, f64) {
    let runtime = rt.runtime().clone();
    let round = |runtime: Runtime| async move {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for caller in 0..32 {
            let runtime = runtime.clone();
            tasks.push(tokio::spawn(async move {
                for i in (caller..agents).step_by(32) {
                    runtime
                        .agent::<Counter>(&format!("a{i}"))
                        .add(1)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        agents as f64 / start.elapsed().as_secs_f64()
    };
    let first = round(runtime.clone()).await;
    let start = Instant::now();
    for _ in 1..rounds {
        round(runtime.clone()).await;
    }
    let later = (agents * (rounds - 1)) as f64 / start.elapsed().as_secs_f64();
    (first, later)
}

fn line(fields: serde_json::Value) {
    println!("{fields}");
}

/// Durable calls to one agent and to many, PostgreSQL transactions per call, takeovers.
async fn durability(
    url: &str,
    db: &TestDatabase,
    calls: usize,
    agents: usize,
    rounds: usize,
    moves: usize,
) {
    // One agent, sequential calls.
    let baseline = full();
    let (full_rate, full_p50, full_p99) = sequential(baseline.agent::<Counter>("seq"), calls).await;
    let (base_first, base_later) = many(&baseline, agents, rounds).await;
    drop(baseline);
    let mut one = node(url, "127.0.0.1:1");
    let before = transactions(db).await;
    let (rate, p50, p99) = sequential(one.agent::<Counter>("seq"), calls).await;
    let sequential_tx = transactions(db).await - before;
    line(serde_json::json!({
        "bench": "cluster_sequential_one_agent", "calls": calls,
        "calls_per_sec": rate.round(), "p50_us": p50, "p99_us": p99,
        "baseline": "single_node_full", "baseline_per_sec": full_rate.round(),
        "baseline_p50_us": full_p50, "baseline_p99_us": full_p99,
        "ratio": (rate / full_rate * 1000.0).round() / 1000.0,
        "pg_transactions_per_call": sequential_tx as f64 / (calls + 1) as f64,
    }));

    // Many agents, 32 callers.
    let before = transactions(db).await;
    let (first, later) = many(&one, agents, rounds).await;
    let many_tx = transactions(db).await - before;
    line(serde_json::json!({
        "bench": "cluster_many_agents", "agents": agents, "callers": 32,
        "first_calls_per_sec": first.round(), "calls_per_sec": later.round(),
        "baseline": "single_node_full", "baseline_first_calls_per_sec": base_first.round(),
        "baseline_per_sec": base_later.round(),
        "ratio": (later / base_later * 1000.0).round() / 1000.0,
        "pg_transactions_per_call": many_tx as f64 / (agents * rounds) as f64,
    }));

    // Takeover: the owner stops, the other node's first call takes and restores the agent.
    let mut two = node(url, "127.0.0.1:2");
    let mut took = Vec::new();
    for i in 0..moves {
        let (from, to) = if i % 2 == 0 {
            (&mut one, &mut two)
        } else {
            (&mut two, &mut one)
        };
        from.agent::<Counter>("seq").add(1).await.unwrap();
        from.stop().await;
        let t = Instant::now();
        to.agent::<Counter>("seq").add(1).await.unwrap();
        took.push(t.elapsed());
        from.restart().await.unwrap();
    }
    took.sort();
    line(serde_json::json!({
        "bench": "cluster_takeover", "moves": moves,
        "p50_us": percentile(&took, 0.5), "max_us": took.last().unwrap().as_micros(),
        "note": "first call on the new owner after the old one stopped (take, restore from snapshot + log, call)",
    }));
    drop((one, two));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `-- routing`: only the calls through another node.
    let routing_only = args.iter().any(|a| a == "routing");
    let (calls, agents, rounds, moves) = if quick {
        (200, 100, 2, 3)
    } else {
        (2000, 1000, 4, 15)
    };
    let tokio = tokio::runtime::Runtime::new().unwrap();
    tokio.block_on(async {
        let db = TestDatabase::new().await;
        let url = db.url.clone();

        if !routing_only {
            durability(&url, &db, calls, agents, rounds, moves).await;
        }

        // Routing: HTTP calls to an agent of node A's, straight to A and through node B (which
        // forwards them), sequential and from 8 keep-alive clients.
        let (a, a_addr) = serving(&url).await;
        let (b, b_addr) = serving(&url).await;
        let path = "/agents/counter/routed/call/add";
        common::http_load(a_addr, path, "[1]", 1, 1).await; // A takes it
        let n = calls / 2;
        let direct = common::http_load(a_addr, path, "[1]", 1, n).await;
        let forwarded = common::http_load(b_addr, path, "[1]", 1, n).await;
        let direct_8 = common::http_load(a_addr, path, "[1]", 8, n / 8).await;
        let forwarded_8 = common::http_load(b_addr, path, "[1]", 8, n / 8).await;
        line(serde_json::json!({
            "bench": "cluster_forwarded_http", "calls": n,
            "calls_per_sec": forwarded.round(), "clients_8_calls_per_sec": forwarded_8.round(),
            "baseline": "straight_to_the_owner", "baseline_per_sec": direct.round(),
            "baseline_clients_8_per_sec": direct_8.round(),
            "ratio": (forwarded / direct * 1000.0).round() / 1000.0,
            "ratio_clients_8": (forwarded_8 / direct_8 * 1000.0).round() / 1000.0,
            "note": "through another node: one more HTTP hop (over an idle connection when there is one)",
        }));
        // Typed calls from node B's runtime to an agent of node A's (sent to A), next to the
        // same calls from A's own runtime.
        let (from_b, ..) = sequential(b.agent::<Counter>("routed"), n).await;
        let (from_a, ..) = sequential(a.agent::<Counter>("routed"), n).await;
        line(serde_json::json!({
            "bench": "cluster_typed_calls_to_another_node", "calls": n,
            "calls_per_sec": from_b.round(),
            "baseline": "from_the_owner_itself", "baseline_per_sec": from_a.round(),
            "ratio": (from_b / from_a * 1000.0).round() / 1000.0,
        }));
        drop((a, b, db));
    });
}
