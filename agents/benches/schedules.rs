//! Scheduling benchmarks in real time, printed as JSON lines.
//!
//! `cargo bench -p agents --bench schedules` (add `-- --quick` for a smoke run, a word of a
//! bench's name to run only that one).
//!
//! - `fire_lateness`: 10,000 one-shot schedules over 1,000 agents, all due within a 5 s
//!   window; every agent is hibernated (idle timeout 2 s) when the window opens and is woken by
//!   its first due row. Reports how
//!   many fired and how late (p50 / p99 / max), next to raw tokio timers (`sleep_until`) for the
//!   same due times in the same run.
//! - `schedule_rows`: the cost of creating rows (durable, 10 per call).
//! - `idle_100k`: RSS and CPU of a runtime holding 100,000 future schedules while nothing is due.
//! - `agents_100k`: 100,000 agents, each with a schedule an hour ahead, created and hibernated;
//!   then a new runtime on that data dir: its start-up time and RSS at rest, the wake latency of
//!   random hibernated agents (a call each; p50 / p99) next to opening one of their databases
//!   with raw rusqlite and reading a row, and how late a schedule fires among them.

use std::{
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agents::{prelude::*, testing::TestRuntime};

static LATENESS_US: Mutex<Vec<i64>> = Mutex::new(Vec::new());

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

#[derive(Default)]
struct Planner;
impl Agent for Planner {}

#[agent]
impl Planner {
    /// Schedules one `fire` at each of `due_ms` (milliseconds since the epoch).
    #[callable]
    async fn plan(&mut self, ctx: &mut Ctx<Self>, due_ms: Vec<u64>) -> Result<(), AppError> {
        for due in due_ms {
            let at = UNIX_EPOCH + Duration::from_millis(due);
            ctx.schedule(When::at(at), Planner::calls().fire(due))?;
        }
        Ok(())
    }

    /// Reads the agent's next schedule (a call that wakes it and reads its database).
    #[callable]
    async fn next_due(&mut self, ctx: &mut Ctx<Self>) -> Result<Option<u64>, AppError> {
        Ok(ctx.schedules()?.first().map(|s| s.id as u64))
    }

    #[callable]
    async fn fire(&mut self, _ctx: &mut Ctx<Self>, due_ms: u64) {
        LATENESS_US
            .lock()
            .unwrap()
            .push(now_us() - due_ms as i64 * 1000);
    }
}

fn percentiles(mut v: Vec<i64>) -> (f64, f64, f64) {
    v.sort();
    let p =
        |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0;
    (p(0.5), p(0.99), *v.last().unwrap() as f64 / 1000.0)
}

/// Due times: `per_agent` for each of `agents`, spread over `window` starting at `start`.
fn due_times(agents: usize, per_agent: usize, start: u64, window_ms: u64) -> Vec<Vec<u64>> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    (0..agents)
        .map(|_| {
            (0..per_agent)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    start + seed % window_ms
                })
                .collect()
        })
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn plan_all(rt: &Runtime, plans: Vec<Vec<u64>>) -> f64 {
    let rows: usize = plans.iter().map(Vec::len).sum();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, due) in plans.into_iter().enumerate() {
        let client = rt.agent::<Planner>(&format!("agent-{i}"));
        tasks.spawn(async move { client.plan(due).await.unwrap() });
        while tasks.len() >= 32 {
            tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
    rows as f64 / started.elapsed().as_secs_f64()
}

async fn fire_lateness(agents: usize, per_agent: usize) {
    let rt = TestRuntime::start(
        Runtime::builder()
            .idle_timeout(Duration::from_secs(2))
            .agent::<Planner>(),
    )
    .unwrap();
    let total = agents * per_agent;
    let start = now_ms() + 10_000; // planning takes a few seconds, then everyone hibernates
    let plans = due_times(agents, per_agent, start, 5_000);
    let all_due: Vec<u64> = plans.iter().flatten().copied().collect();
    let rows_per_sec = plan_all(rt.runtime(), plans).await;

    // The baseline: a raw tokio timer per due time, in the same process at the same time.
    let raw: Vec<_> = all_due
        .iter()
        .map(|&due| {
            tokio::spawn(async move {
                let wait = Duration::from_millis(due.saturating_sub(now_ms()));
                tokio::time::sleep(wait).await;
                now_us() - due as i64 * 1000
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(start.saturating_sub(now_ms() + 50))).await;
    let live_before = rt.live_count();
    let deadline = Instant::now() + Duration::from_secs(20);
    while LATENESS_US.lock().unwrap().len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fired = std::mem::take(&mut *LATENESS_US.lock().unwrap());
    let mut raw_late = Vec::new();
    for t in raw {
        raw_late.push(t.await.unwrap());
    }
    let (p50, p99, max) = percentiles(fired.clone());
    let (r50, r99, rmax) = percentiles(raw_late);
    println!(
        "{{\"bench\":\"fire_lateness\",\"schedules\":{total},\"agents\":{agents},\"fired\":{},\"live_before_due\":{live_before},\"p50_ms\":{p50:.2},\"p99_ms\":{p99:.2},\"max_ms\":{max:.2},\"baseline\":\"tokio_sleep_until\",\"baseline_p50_ms\":{r50:.2},\"baseline_p99_ms\":{r99:.2},\"baseline_max_ms\":{rmax:.2}}}",
        fired.len()
    );
    println!("{{\"bench\":\"schedule_rows\",\"rows\":{total},\"rows_per_call\":{per_agent},\"rows_per_sec\":{rows_per_sec:.0}}}");
}

/// (resident KiB, user+system CPU seconds) of this process, from /proc.
fn rss_and_cpu() -> (u64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (rss, ticks / 100.0)
}

async fn idle(agents: usize, per_agent: usize) {
    let (rss_start, _) = rss_and_cpu();
    let rt = TestRuntime::start(
        Runtime::builder()
            .idle_timeout(Duration::from_millis(100))
            .agent::<Planner>(),
    )
    .unwrap();
    let plans = due_times(agents, per_agent, now_ms() + 3_600_000, 3_600_000);
    let rows_per_sec = plan_all(rt.runtime(), plans).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // everyone hibernates
    let (rss, cpu_before) = rss_and_cpu();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, cpu_after) = rss_and_cpu();
    println!(
        "{{\"bench\":\"idle_100k\",\"schedules\":{},\"agents\":{agents},\"live\":{},\"pending_alarms\":{},\"rows_per_sec\":{rows_per_sec:.0},\"rss_kib\":{rss},\"rss_growth_kib\":{},\"idle_cpu_percent\":{:.2}}}",
        agents * per_agent,
        rt.live_count(),
        rt.pending_alarms(),
        rss.saturating_sub(rss_start),
        (cpu_after - cpu_before) / 5.0 * 100.0
    );
}

async fn agents_at_scale(agents: usize) {
    let dir = tempfile::tempdir().unwrap();
    let builder = || {
        Runtime::builder()
            .data_dir(dir.path())
            .durability(Durability::Normal) // creating them is not what is measured
            .idle_timeout(Duration::from_millis(200))
            .agent::<Planner>()
    };
    let rt = builder().build().unwrap();
    let plans = due_times(agents, 1, now_ms() + 3_600_000, 3_600_000);
    let created = Instant::now();
    plan_all(&rt, plans).await;
    let create_secs = created.elapsed().as_secs_f64();
    rt.shutdown().await;

    let (rss_before, _) = rss_and_cpu();
    let started = Instant::now();
    let rt = builder().durability(Durability::Full).build().unwrap();
    let start_ms = started.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_at_rest, _) = rss_and_cpu();
    let pending = rt.pending_alarms();

    // Wake random hibernated agents, one at a time.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut pick = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as usize % agents
    };
    let sample = 1_000.min(agents / 2);
    let mut wakes = Vec::with_capacity(sample);
    for _ in 0..sample {
        let client = rt.agent::<Planner>(&format!("agent-{}", pick()));
        let t = Instant::now();
        client.next_due().await.unwrap();
        wakes.push(t.elapsed().as_micros() as i64);
    }
    // Raw: open one of those databases (hibernated) and read a row, as the wake must at least.
    let mut opens = Vec::with_capacity(sample);
    for _ in 0..sample {
        let name = format!("agent-{}", pick());
        if rt.is_live::<Planner>(&name) {
            continue;
        }
        let path = rt.database_path::<Planner>(&name).unwrap();
        let t = Instant::now();
        let db = rusqlite::Connection::open(&path).unwrap();
        let _: i64 = db
            .query_row("SELECT count(*) FROM _agents_schedules", [], |r| r.get(0))
            .unwrap_or(0);
        drop(db);
        opens.push(t.elapsed().as_micros() as i64);
    }

    // A schedule due in 2 s among them all.
    LATENESS_US.lock().unwrap().clear();
    let due = now_ms() + 2_000;
    rt.agent::<Planner>("agent-0")
        .plan(vec![due])
        .await
        .unwrap();
    let waited = Instant::now();
    while LATENESS_US.lock().unwrap().is_empty() && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let late_ms = LATENESS_US
        .lock()
        .unwrap()
        .first()
        .map_or(f64::NAN, |us| *us as f64 / 1000.0);
    let (wake_p50, wake_p99, _) = percentiles(wakes);
    let (open_p50, open_p99, _) = percentiles(opens);
    println!(
        "{{\"bench\":\"agents_100k\",\"agents\":{agents},\"create_secs\":{create_secs:.1},\"start_ms\":{start_ms:.1},\"pending_alarms\":{pending},\"rss_at_rest_kib\":{rss_at_rest},\"rss_growth_kib\":{},\"wake_p50_ms\":{wake_p50:.3},\"wake_p99_ms\":{wake_p99:.3},\"baseline\":\"raw_open_and_read\",\"baseline_p50_ms\":{open_p50:.3},\"baseline_p99_ms\":{open_p99:.3},\"wake_over_open_p50_ms\":{:.3},\"schedule_late_ms\":{late_ms:.1}}}",
        rss_at_rest.saturating_sub(rss_before),
        wake_p50 - open_p50
    );
    rt.shutdown().await;
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let filter = args.iter().skip(1).find(|a| !a.starts_with("--")).cloned();
    let run = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let scale = if quick { 10 } else { 1 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if run("fire_lateness") {
            fire_lateness(1_000 / scale, 10).await;
        }
        if run("idle_100k") {
            idle(1_000 / scale, 100).await;
        }
        if run("agents_100k") {
            agents_at_scale(100_000 / scale).await;
        }
    });
}
