//! Memory is a cache, SQLite is the truth: restarts, hibernation, kv, identity.

mod common;

use std::time::Duration;

use agents::{prelude::*, testing::TestRuntime};
use common::Counter;

#[tokio::test]
async fn storage_survives_restart_and_hibernation_but_memory_does_not() {
    let mut rt = TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap();
    let c = rt.agent::<Counter>("bob");
    c.add(5).await.unwrap();
    assert_eq!(c.bump_memory_slowly().await.unwrap(), 1);
    assert_eq!(c.bump_memory_slowly().await.unwrap(), 2);

    assert!(rt.hibernate::<Counter>("bob").await.unwrap());
    assert!(!rt.is_live::<Counter>("bob"));
    assert_eq!(c.get().await.unwrap(), 5, "storage kept");
    assert_eq!(c.bump_memory_slowly().await.unwrap(), 1, "memory reset");
    assert_eq!(
        c.starts().await.unwrap(),
        1,
        "on_start ran again on the new instance"
    );

    rt.restart().await.unwrap();
    let c = rt.agent::<Counter>("bob");
    assert!(!rt.is_live::<Counter>("bob"));
    assert_eq!(c.add(1).await.unwrap(), 6);
    assert_eq!(c.bump_memory_slowly().await.unwrap(), 1);
}

#[cfg(unix)]
#[tokio::test]
async fn a_hibernation_keeps_the_wal_file_emptied_and_the_wake_uses_it_again() {
    use std::os::unix::fs::MetadataExt;
    let rt = TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap();
    let c = rt.agent::<Counter>("kept");
    c.add(2).await.unwrap();
    let wal = rt
        .database_path::<Counter>("kept")
        .unwrap()
        .with_extension("sqlite-wal");
    let made = std::fs::metadata(&wal).unwrap();
    assert!(made.len() > 0);
    for round in 1..=3 {
        assert!(rt.hibernate::<Counter>("kept").await.unwrap());
        let kept = std::fs::metadata(&wal).expect("the WAL stays");
        assert_eq!(kept.len(), 0, "checkpointed into the database and emptied");
        assert_eq!(c.add(1).await.unwrap(), 2 + round);
        let woken = std::fs::metadata(&wal).unwrap();
        assert_eq!(woken.ino(), made.ino(), "the same file, not a new one");
        assert!(woken.len() > 0);
    }
}

#[tokio::test]
async fn idle_agents_hibernate_by_themselves_and_wake_on_the_next_call() {
    let rt = TestRuntime::start(
        Runtime::builder()
            .agent::<Counter>()
            .idle_timeout(Duration::from_millis(100)),
    )
    .unwrap();
    let c = rt.agent::<Counter>("sleepy");
    c.add(3).await.unwrap();
    assert!(rt.is_live::<Counter>("sleepy"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!rt.is_live::<Counter>("sleepy"));
    assert_eq!(rt.live_count(), 0);
    assert_eq!(c.get().await.unwrap(), 3);
}

/// The WAL files under the runtime's data dir, with their sizes.
fn wal_sizes(dir: &std::path::Path) -> Vec<u64> {
    let mut sizes = Vec::new();
    for sub in std::fs::read_dir(dir.join("agents")).unwrap() {
        let sub = sub.unwrap().path();
        if !sub.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(sub).unwrap() {
            let file = file.unwrap();
            if file.path().to_string_lossy().ends_with("-wal") {
                sizes.push(file.metadata().unwrap().len());
            }
        }
    }
    sizes
}

#[tokio::test]
async fn quiet_agents_give_back_memory_and_stay_live_with_all_they_wrote() {
    let mut rt = TestRuntime::start(
        Runtime::builder()
            .agent::<Counter>()
            .quiet_after(Duration::from_millis(20)),
    )
    .unwrap();
    let c = rt.agent::<Counter>("quiet");
    for round in 1..=5 {
        c.add(round).await.unwrap();
        let sizes = wal_sizes(rt.dir());
        assert!(sizes.len() == 1 && sizes[0] > 0, "written: {sizes:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Quiet: its WAL is checkpointed into the database (and its index given back), and it
        // is still live, with its memory.
        assert_eq!(wal_sizes(rt.dir()), [0], "checkpointed");
        assert!(rt.is_live::<Counter>("quiet"));
        assert_eq!(c.bump_memory_slowly().await.unwrap(), round);
    }
    assert_eq!(c.get().await.unwrap(), 15);
    assert_eq!(c.starts().await.unwrap(), 1, "one activation throughout");
    rt.restart().await.unwrap();
    assert_eq!(rt.agent::<Counter>("quiet").get().await.unwrap(), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_racing_a_hibernation_are_neither_lost_nor_run_twice() {
    let rt = TestRuntime::start(
        Runtime::builder()
            .agent::<Counter>()
            .idle_timeout(Duration::from_millis(1)),
    )
    .unwrap();
    let c = rt.agent::<Counter>("flaky");
    let mut total = 0;
    for round in 0..200u64 {
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.add(1).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        total += 3;
        if round % 7 == 0 {
            rt.hibernate::<Counter>("flaky").await.unwrap();
        } else {
            tokio::time::sleep(Duration::from_micros(round * 10 % 1500)).await;
        }
    }
    assert_eq!(c.get().await.unwrap(), total);
}

#[tokio::test]
async fn identity_is_known_in_every_handler() {
    let rt = TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap();
    let (class, name, id) = rt.agent::<Counter>("zoë/1").whoami().await.unwrap();
    assert_eq!((class.as_str(), name.as_str()), ("counter", "zoë/1"));
    assert_eq!(id, agents::AgentKey::new("counter", "zoë/1").unwrap().id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_agent_cap_evicts_the_least_recently_used_and_loses_nothing() {
    let rt = TestRuntime::start(Runtime::builder().agent::<Counter>().max_live_agents(4)).unwrap();
    for round in 1..=3 {
        for i in 0..40 {
            assert_eq!(
                rt.agent::<Counter>(&format!("n{i}")).add(1).await.unwrap(),
                round
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rt.live_count() <= 5, "live {}", rt.live_count());
    }
    // The most recently used agent is still live; the first ones were evicted.
    assert!(rt.is_live::<Counter>("n39"));
    assert!(!rt.is_live::<Counter>("n0"));
}

/// New agents' files are spares made ahead of time (from the first new agent on), replaced as
/// they are taken; an agent made from one keeps its writes across a restart, which keeps the
/// spares left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_agents_take_spare_files_that_the_runtime_makes_again() {
    let ready = async |rt: &TestRuntime, n: usize| {
        let started = std::time::Instant::now();
        while rt.runtime().spare_files_ready() != n {
            assert!(started.elapsed() < Duration::from_secs(10), "no {n} spares");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let mut rt = TestRuntime::start(Runtime::builder().spare_files(3).agent::<Counter>()).unwrap();
    assert_eq!(
        rt.runtime().spare_files_ready(),
        0,
        "none before a new agent"
    );
    assert_eq!(rt.agent::<Counter>("first").add(1).await.unwrap(), 1);
    ready(&rt, 3).await;
    let spare = |n: u64| rt.dir().join("spare").join(format!("{n}.sqlite"));
    assert!(spare(2).exists());
    // Taken: the newest spare becomes the agent's file.
    assert_eq!(rt.agent::<Counter>("second").add(2).await.unwrap(), 2);
    assert!(!spare(2).exists(), "taken by `second`");
    ready(&rt, 3).await;
    assert!(spare(3).exists(), "made again, under a new number");
    rt.restart().await.unwrap();
    assert_eq!(rt.runtime().spare_files_ready(), 3, "kept by the restart");
    assert_eq!(rt.agent::<Counter>("second").get().await.unwrap(), 2);
    assert_eq!(rt.agent::<Counter>("first").get().await.unwrap(), 1);
}
