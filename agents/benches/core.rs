//! Runtime-core benchmarks, printed as JSON lines, each next to a raw rusqlite baseline doing
//! the same durable writes in the same run.
//!
//! `cargo bench -p agents --bench core` (add `-- --quick` for a smoke run, `-- sequential` to run
//! only the benches whose name has that word).
//!
//! Every call does one durable SQLite write (an UPSERT on the agent's counter row), but in
//! `sequential_reads_one_agent`, whose calls only read it. Baselines:
//! - `raw_commit_each`: one transaction per write (what a sequential caller can get at best);
//! - `raw_read_each`: one read transaction per `SELECT`;
//! - `raw_batch_16`: 16 writes per commit (the best any system can batch with 16 callers that
//!   each wait for their reply);
//! - `raw_files`: open a new database, create the table, write, close (activation cost);
//! - `raw_open_write_close`: open an existing database, write, close (a wake after a
//!   hibernation, and the hibernation);
//! - `raw_connections`: open databases kept open, each with the table and one row, in a child
//!   process (what a live agent's database costs in memory at least);
//! - `same_agent_before_the_burst`: an awake agent's sequential calls with nothing else
//!   running, against the same calls while 1,000 new agents are called at once.

use std::time::{Duration, Instant};

mod common;

use agents::{prelude::*, testing::TestRuntime};
use common::{Counter, UPSERT};

/// The spare files each bench's runtime keeps (the default).
const SPARES: usize = 64;

fn runtime(durability: Durability) -> TestRuntime {
    let builder = Runtime::builder()
        .durability(durability)
        .spare_files(SPARES);
    TestRuntime::start(builder.agent::<Counter>()).unwrap()
}

/// Waits until the spare files that a runtime's first new agent set off are made: start-up
/// work (a sync each), not the calls a line times.
async fn settled(rt: &TestRuntime) {
    while rt.runtime().spare_files_ready() < SPARES {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn pragma(d: Durability) -> &'static str {
    match d {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    }
}

fn label(d: Durability) -> &'static str {
    match d {
        Durability::Full => "full",
        Durability::Normal => "normal",
    }
}

/// Raw rusqlite: `writes` UPSERTs, committing every `batch`. Returns writes per second.
fn raw_batched(d: Durability, writes: usize, batch: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let conn = common::raw_open(&dir.path().join("raw.sqlite"), pragma(d));
    let start = Instant::now();
    let mut done = 0;
    while done < writes {
        conn.execute_batch("BEGIN").unwrap();
        for _ in 0..batch.min(writes - done) {
            let _: i64 = conn
                .prepare_cached(UPSERT)
                .unwrap()
                .query_row([1], |r| r.get(0))
                .unwrap();
            done += 1;
        }
        conn.execute_batch("COMMIT").unwrap();
    }
    writes as f64 / start.elapsed().as_secs_f64()
}

/// Raw rusqlite: `reads` read transactions of one `SELECT` each, on a database with a row.
fn raw_reads(d: Durability, reads: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let conn = common::raw_open(&dir.path().join("raw.sqlite"), pragma(d));
    let _: i64 = conn.query_row(UPSERT, [1], |r| r.get(0)).unwrap();
    let start = Instant::now();
    for _ in 0..reads {
        conn.execute_batch("BEGIN").unwrap();
        let _: i64 = conn
            .prepare_cached(common::SELECT)
            .unwrap()
            .query_row([], |r| r.get(0))
            .unwrap();
        conn.execute_batch("COMMIT").unwrap();
    }
    reads as f64 / start.elapsed().as_secs_f64()
}

/// Raw rusqlite: `files` new databases, each created, written once and closed.
fn raw_files(d: Durability, files: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    for i in 0..files {
        let sub = dir.path().join(format!("{:02x}", i % 256));
        std::fs::create_dir_all(&sub).unwrap();
        open_write_close(&sub.join(format!("{i}.sqlite")), d);
    }
    files as f64 / start.elapsed().as_secs_f64()
}

/// Raw rusqlite: opens the database at `path` (making it if it is not there), writes once, and
/// closes it (the close checkpoints).
fn open_write_close(path: &std::path::Path, d: Durability) {
    let conn = common::raw_open(path, pragma(d));
    let _: i64 = conn
        .prepare_cached(UPSERT)
        .unwrap()
        .query_row([1], |r| r.get(0))
        .unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e6
}

#[allow(clippy::too_many_arguments)]
fn report(
    bench: &str,
    d: Durability,
    calls: usize,
    secs: f64,
    baseline: &str,
    baseline_rate: f64,
    extra: &str,
) {
    let rate = calls as f64 / secs;
    println!(
        "{{\"bench\":\"{bench}\",\"durability\":\"{}\",\"calls\":{calls},\"secs\":{secs:.3},\"calls_per_sec\":{rate:.0},\"baseline\":\"{baseline}\",\"baseline_per_sec\":{baseline_rate:.0},\"ratio\":{:.3}{extra}}}",
        label(d),
        rate / baseline_rate
    );
}

/// `calls` sequential calls to one agent: `add(1)`, each a durable write, or (`reads`) `get()`,
/// which only reads: nothing to sync, so its reply leaves once every write before it is durable.
/// Made by a task, as a server's handlers make theirs: from the thread of `block_on` (outside
/// the runtime's workers) each call would also wake a worker and be woken back.
async fn sequential(d: Durability, calls: usize, reads: bool) {
    let rt = runtime(d);
    let c = rt.agent::<Counter>(if reads { "reads" } else { "seq" });
    c.add(0).await.unwrap(); // activation is measured elsewhere
    settled(&rt).await;
    let caller = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(calls);
        let start = Instant::now();
        for _ in 0..calls {
            let t = Instant::now();
            if reads {
                c.get().await.unwrap();
            } else {
                c.add(1).await.unwrap();
            }
            lat.push(t.elapsed());
        }
        (start.elapsed().as_secs_f64(), lat)
    });
    let (secs, mut lat) = caller.await.unwrap();
    lat.sort();
    let (bench, baseline, base) = if reads {
        (
            "sequential_reads_one_agent",
            "raw_read_each",
            raw_reads(d, calls),
        )
    } else {
        (
            "sequential_one_agent",
            "raw_commit_each",
            raw_batched(d, calls, 1),
        )
    };
    let extra = format!(
        ",\"p50_us\":{:.0},\"p99_us\":{:.0}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    report(bench, d, calls, secs, baseline, base, &extra);
}

async fn concurrent(d: Durability, callers: usize, calls: usize) {
    let rt = runtime(d);
    let c = rt.agent::<Counter>("hot");
    c.add(0).await.unwrap();
    settled(&rt).await;
    let per = calls / callers;
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    c.add(1).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(c.add(0).await.unwrap(), (per * callers) as i64);
    let base = raw_batched(d, per * callers, callers);
    let base_256 = raw_batched(d, per * callers, 256);
    let extra = format!(",\"raw_batch_256_per_sec\":{base_256:.0}");
    report(
        &format!("concurrent_{callers}_one_agent"),
        d,
        per * callers,
        secs,
        &format!("raw_batch_{callers}"),
        base,
        &extra,
    );
}

async fn spread(d: Durability, agents: usize, callers: usize) {
    let rt = runtime(d);
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|w| {
            let rt = rt.runtime().clone();
            tokio::spawn(async move {
                for i in (w..agents).step_by(callers) {
                    rt.agent::<Counter>(&format!("agent-{i}"))
                        .add(1)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let live = rt.live_count();
    let base = raw_files(d, agents);
    let extra = format!(",\"agents\":{agents},\"live_after\":{live}");
    report(
        "spread_activation",
        d,
        agents,
        secs,
        "raw_files",
        base,
        &extra,
    );
}

/// One agent's sequential calls (their latencies, sorted) while `burst` new agents are called
/// all at once, until they all answered; with no burst, `calls` calls.
async fn hot_during_burst(
    rt: &TestRuntime,
    burst: usize,
    tag: &str,
    calls: usize,
) -> Vec<Duration> {
    let hot = rt.agent::<Counter>("hot");
    hot.add(0).await.unwrap();
    settled(rt).await;
    let tasks: Vec<_> = (0..burst)
        .map(|i| {
            let rt = rt.runtime().clone();
            let name = format!("burst-{tag}-{i}");
            tokio::spawn(async move { rt.agent::<Counter>(&name).add(1).await.unwrap() })
        })
        .collect();
    let mut lat = Vec::new();
    let going = |lat: &Vec<Duration>| match burst {
        0 => lat.len() < calls,
        _ => tasks.iter().any(|t| !t.is_finished()),
    };
    while going(&lat) {
        let t = Instant::now();
        hot.add(1).await.unwrap();
        lat.push(t.elapsed());
    }
    for t in tasks {
        t.await.unwrap();
    }
    lat.sort();
    lat
}

/// What a burst of `n` new agents (a careless or hostile client's new names) does to an agent
/// already awake: its sequential calls' latencies during the burst, against the same calls
/// before it, in the same runtime.
async fn burst(n: usize) {
    let rt = runtime(Durability::Full);
    let quiet = hot_during_burst(&rt, 0, "none", 500).await;
    let during = hot_during_burst(&rt, n, "new", 0).await;
    println!(
        "{{\"bench\":\"hot_agent_during_burst\",\"durability\":\"full\",\"burst\":{n},\"calls_during\":{},\"p50_us\":{:.0},\"p99_us\":{:.0},\"max_us\":{:.0},\"baseline\":\"same_agent_before_the_burst\",\"baseline_p50_us\":{:.0},\"baseline_p99_us\":{:.0},\"p50_ratio\":{:.2}}}",
        during.len(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        percentile(&during, 1.0),
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        percentile(&during, 0.5) / percentile(&quiet, 0.5),
    );
}

/// `cycles` times: hibernate one agent, then call it (the call wakes it: opens its database,
/// writes, commits). Against raw rusqlite opening the same kind of file, writing once and
/// closing it (the close checkpoints, as a hibernation does).
async fn wake(d: Durability, cycles: usize) {
    let rt = runtime(d);
    let c = rt.agent::<Counter>("sleeper");
    c.add(0).await.unwrap();
    settled(&rt).await;
    let mut lat = Vec::with_capacity(cycles);
    let start = Instant::now();
    for _ in 0..cycles {
        rt.hibernate::<Counter>("sleeper").await.unwrap();
        let t = Instant::now();
        c.add(1).await.unwrap();
        lat.push(t.elapsed());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.sqlite");
    drop(common::raw_open(&path, pragma(d)));
    let raw_start = Instant::now();
    for _ in 0..cycles {
        open_write_close(&path, d);
    }
    let base = cycles as f64 / raw_start.elapsed().as_secs_f64();
    let extra = format!(",\"wake_p50_us\":{:.0}", percentile(&lat, 0.5));
    report(
        "wake_after_hibernation",
        d,
        cycles,
        secs,
        "raw_open_write_close",
        base,
        &extra,
    );
}

/// This process's resident set, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    kib * 1024
}

/// This process's resident set once the allocator has returned the memory it holds free to the
/// system (glibc's `malloc_trim`): what is in use, with its fragmentation.
fn rss_in_use() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
    rss_bytes()
}

/// The child process of `rss_per_live_agent`: opens `n` databases (the table and one row each),
/// keeps them open, and prints its RSS growth per database, right away and in use (see
/// [`rss_in_use`]).
fn raw_connections(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (before, before_in_use) = (rss_bytes(), rss_in_use());
    let conns: Vec<_> = (0..n)
        .map(|i| {
            let conn = common::raw_open(&dir.path().join(format!("{i}.sqlite")), "FULL");
            let _: i64 = conn
                .prepare_cached(UPSERT)
                .unwrap()
                .query_row([1], |r| r.get(0))
                .unwrap();
            conn
        })
        .collect();
    let per = (rss_bytes().saturating_sub(before)) as f64 / n as f64;
    let in_use = (rss_in_use().saturating_sub(before_in_use)) as f64 / n as f64;
    println!("{per:.0} {in_use:.0}");
    drop(conns);
}

/// The child process of `rss_per_live_agent` that measures ours, on a fresh heap whatever ran
/// before: `n` agents, each woken by one durable write (its table and one row), all kept live;
/// prints the RSS growth per agent right after the calls, and in use (see [`rss_in_use`]) once
/// every agent has been quiet long enough to drop SQLite's caches.
fn live_agents(n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let per = rt.block_on(async {
        let rt = TestRuntime::start(
            Runtime::builder()
                .max_live_agents(n + 16)
                .idle_timeout(Duration::from_secs(3600))
                .quiet_after(Duration::from_secs(1))
                .agent::<Counter>(),
        )
        .unwrap();
        // Warm up what every runtime has once (threads, the first database's code paths).
        rt.agent::<Counter>("warm").add(1).await.unwrap();
        let (before, before_in_use) = (rss_bytes(), rss_in_use());
        for i in 0..n {
            rt.agent::<Counter>(&format!("a{i}")).add(1).await.unwrap();
        }
        let per = (rss_bytes().saturating_sub(before)) as f64 / n as f64;
        tokio::time::sleep(Duration::from_secs(2)).await; // quiet, as set above
        assert_eq!(rt.runtime().live_count(), n + 1, "every agent stays live");
        let in_use = (rss_in_use().saturating_sub(before_in_use)) as f64 / n as f64;
        (per, in_use)
    });
    println!("{:.0} {:.0}", per.0, per.1);
}

/// RSS per live agent next to open raw connections, each measured in a child process.
fn rss_per_live_agent(n: usize) {
    let child = |flag: &str| -> (f64, f64) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([flag, &n.to_string()])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        let mut figures = out
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(f64::NAN));
        let mut next = || figures.next().unwrap_or(f64::NAN);
        (next(), next())
    };
    let (ours, raw) = (child("--live-agents"), child("--raw-connections"));
    println!(
        "{{\"bench\":\"rss_per_live_agent\",\"agents\":{n},\"bytes_per_agent\":{:.0},\"baseline\":\"raw_connections\",\"baseline_bytes_per_connection\":{:.0},\"ratio\":{:.3},\"in_use_bytes_per_quiet_agent\":{:.0},\"baseline_in_use_bytes_per_connection\":{:.0},\"in_use_ratio\":{:.3}}}",
        ours.0,
        raw.0,
        ours.0 / raw.0,
        ours.1,
        raw.1,
        ours.1 / raw.1
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--raw-connections") {
        return raw_connections(args[i + 1].parse().unwrap());
    }
    if let Some(i) = args.iter().position(|a| a == "--live-agents") {
        return live_agents(args[i + 1].parse().unwrap());
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `-- sequential` (any word of a bench's name) runs only the benches whose name has it.
    let filter = args.iter().skip(1).find(|a| !a.starts_with("--")).cloned();
    let run = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let scale = if quick { 10 } else { 1 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for d in [Durability::Full, Durability::Normal] {
            if run("sequential_one_agent") {
                sequential(d, 2_000 / scale, false).await;
            }
            if run("sequential_reads_one_agent") {
                // More calls than the writes line: 2,000 reads take ~0.1 s, mostly spent
                // waking the runtime's threads (p50 27-74 us, against 10-12 us over 200,000).
                sequential(d, 20_000 / scale, true).await;
            }
            if run("concurrent_16_one_agent") {
                concurrent(d, 16, 32_000 / scale).await;
            }
            if run("wake_after_hibernation") {
                wake(d, 2_000 / scale).await;
            }
            if run("spread_activation") {
                spread(d, 10_000 / scale, 16).await;
            }
        }
        if run("rss_per_live_agent") {
            rss_per_live_agent(2_000 / scale);
        }
        if run("hot_agent_during_burst") {
            burst(1_000 / scale).await;
        }
    });
}
