//! Schedules due while the server is down (killed with SIGKILL) fire promptly after it
//! restarts, exactly once each.

mod common;

use std::{collections::HashMap, time::Duration};

use tokio::{io::AsyncWriteExt, time::Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shots_due_during_downtime_fire_within_two_seconds_of_restart_exactly_once() {
    let exe = common::example_binary("reminders");
    let dir = tempfile::tempdir().unwrap();
    const NAMES: usize = 10;
    const PER_NAME: usize = 3;

    let (mut child, mut stdin, mut lines) = common::start_server(&exe, dir.path(), &[]).await;
    for n in 0..NAMES {
        for r in 0..PER_NAME {
            stdin
                .write_all(format!("remind user{n} 1500 r{r}\n").as_bytes())
                .await
                .unwrap();
        }
    }
    for _ in 0..NAMES * PER_NAME {
        let line = lines.next_line().await.unwrap().unwrap();
        assert!(line.starts_with("ok "), "{line}");
    }
    child.start_kill().unwrap(); // SIGKILL, before anything is due
    child.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await; // everything is overdue now

    let (mut child, mut stdin, mut lines) = common::start_server(&exe, dir.path(), &[]).await;
    let restarted = Instant::now();
    let mut fired: HashMap<String, usize> = HashMap::new();
    while fired.values().sum::<usize>() < NAMES * PER_NAME {
        let line = tokio::time::timeout_at(restarted + Duration::from_secs(2), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("only {fired:?} fired within 2 s of the restart"))
            .unwrap()
            .unwrap();
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[0], "fired", "{line}");
        *fired
            .entry(format!("{} {}", words[1], words[2]))
            .or_default() += 1;
    }
    let took = restarted.elapsed();
    assert!(fired.values().all(|&n| n == 1), "{fired:?}");

    // Exactly once in storage too, and nothing fires again later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in 0..NAMES {
        stdin
            .write_all(format!("count user{n}\n").as_bytes())
            .await
            .unwrap();
        let line = lines.next_line().await.unwrap().unwrap();
        assert_eq!(line, format!("count user{n} {PER_NAME}"));
    }
    eprintln!(
        "{} overdue reminders fired {took:?} after the restart",
        NAMES * PER_NAME
    );
    drop(stdin);
    let _ = child.wait().await;
}
