//! The workload whose system calls `scripts/syscalls` counts (with `strace -c`): `N` sequential
//! durable calls to one agent (`ours`), or the same `N` UPSERTs on raw rusqlite, each its own
//! transaction with `synchronous=FULL` (`raw`), or `N` calls each to a new agent (`new`), or `N`
//! calls to one agent, hibernated after each (`wake`). Run twice with different `N`, the
//! difference divided by the difference in `N` is the count per call, start-up excluded.
//!
//! `cargo bench -p agents --bench syscalls -- ours 2000` runs it without counting.

mod common;

use agents::{prelude::*, testing::TestRuntime};
use common::{Counter, UPSERT};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.iter().skip(1).find(|a| !a.starts_with("--")).cloned();
    let n: i64 = args
        .iter()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(2_000);
    match mode.as_deref() {
        Some("raw") => {
            let dir = tempfile::tempdir().unwrap();
            let conn = common::raw_open(&dir.path().join("raw.sqlite"), "FULL");
            for i in 0..n {
                let _: i64 = conn
                    .prepare_cached(UPSERT)
                    .unwrap()
                    .query_row([i], |r| r.get(0))
                    .unwrap();
            }
        }
        // Each call to an agent not seen before.
        Some("new") => calls(n, false, |i| format!("a{i}")),
        // Each call to an agent hibernated after the call before.
        Some("wake") => calls(n, true, |_| "one".to_owned()),
        _ => calls(n, false, |_| "one".to_owned()),
    }
}

/// `n` sequential durable calls, call `i` to the agent named `name(i)`, each agent hibernated
/// after its call if `hibernate`.
fn calls(n: i64, hibernate: bool, name: impl Fn(i64) -> String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let rt = TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap();
        for i in 0..n {
            rt.agent::<Counter>(&name(i)).add(i).await.unwrap();
            if hibernate {
                rt.hibernate::<Counter>(&name(i)).await.unwrap();
            }
        }
    });
}
