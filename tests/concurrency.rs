//! One writer: concurrent calls never interleave, and call cycles fail fast.

mod common;

use std::time::{Duration, Instant};

use agents::{prelude::*, testing::TestRuntime};
use common::Counter;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_no_memory_statistics_behind_its_process_wide_lock() {
    // Turned off as the runtime starts, before SQLite does (every test of this file starts a
    // runtime before it touches SQLite): with them on, every allocation of every agent's
    // connection takes one lock and counts into this figure.
    let rt = TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap();
    rt.agent::<Counter>("stats").add(1).await.unwrap();
    // SAFETY: reads one of SQLite's counters; no argument, no state.
    let used = unsafe { rusqlite::ffi::sqlite3_memory_used() };
    assert_eq!(
        used, 0,
        "SQLite counted {used} bytes in use: its statistics are on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_increments_end_at_ten_thousand() {
    let rt = TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap();
    let c = rt.agent::<Counter>("hot");
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                for _ in 0..100 {
                    c.add(1).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(c.get().await.unwrap(), 10_000);
    rt.runtime().clone().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_do_not_interleave_across_awaits() {
    let rt = TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap();
    let c = rt.agent::<Counter>("rmw");
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.bump_memory_slowly().await.unwrap() })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    seen.sort();
    assert_eq!(
        seen,
        (1..=500).collect::<Vec<_>>(),
        "every read-modify-write saw the previous one"
    );
}

/// Calls the agent named by its argument, which may call back.
#[derive(Default)]
pub struct Relay;
impl Agent for Relay {}

#[agent]
impl Relay {
    /// Forwards along `path` (names of relays); the last one answers its own name.
    #[callable]
    pub async fn forward(
        &mut self,
        ctx: &mut Ctx<Self>,
        path: Vec<String>,
    ) -> Result<String, AppError> {
        match path.split_first() {
            None => Ok(ctx.name().to_owned()),
            Some((next, rest)) => Ok(ctx.agent::<Relay>(next).forward(rest.to_vec()).await?),
        }
    }
}

fn path(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn call_chains_work_and_cycles_fail_fast() {
    let rt = TestRuntime::start(Runtime::builder().agent::<Relay>()).unwrap();
    let a = rt.agent::<Relay>("a");
    assert_eq!(a.forward(path(&["b", "c", "d"])).await.unwrap(), "d");
    for cycle in [vec!["a"], vec!["b", "a"], vec!["b", "c", "d", "b"]] {
        let started = Instant::now();
        let err = a
            .clone()
            .with_timeout(Duration::from_secs(20))
            .forward(path(&cycle))
            .await
            .unwrap_err();
        // The inner cycle passed through each relay's `?` and kept its kind.
        assert!(matches!(err, RpcError::Cycle(_)), "{cycle:?}: {err:?}");
        let message = err.to_string();
        assert!(message.contains("call cycle"), "{cycle:?}: {message}");
        assert!(message.contains("relay/a"), "{message}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{cycle:?} took {:?}",
            started.elapsed()
        );
    }
    // Nothing is stuck afterwards.
    assert_eq!(
        rt.agent::<Relay>("b").forward(path(&["a"])).await.unwrap(),
        "a"
    );
}
