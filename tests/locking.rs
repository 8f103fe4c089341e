//! One data dir serves one runtime at a time, and a live agent's database is the runtime's
//! alone (SQLite's exclusive locking mode) unless `readable_while_live` says otherwise.

mod common;

use std::{process::Stdio, time::Duration};

use agents::{Error, Runtime};
use common::Counter;

fn on(dir: &std::path::Path) -> agents::Builder {
    Runtime::builder().data_dir(dir).agent::<Counter>()
}

#[tokio::test]
async fn a_second_runtime_on_the_same_data_dir_is_refused_until_the_first_stops() {
    let dir = tempfile::tempdir().unwrap();
    let first = on(dir.path()).build().unwrap();
    assert_eq!(first.agent::<Counter>("a").add(1).await.unwrap(), 1);

    let refused = on(dir.path()).build().unwrap_err();
    assert!(matches!(refused, Error::DataDirInUse { .. }), "{refused:?}");
    let said = refused.to_string();
    assert!(said.contains("in use by another runtime"), "{said}");
    assert!(
        said.contains(&format!("pid {}", std::process::id())),
        "{said}"
    );

    // Once the first has shut down (every database closed), the dir is free.
    first.shutdown().await;
    let second = on(dir.path()).build().unwrap();
    assert_eq!(second.agent::<Counter>("a").add(1).await.unwrap(), 2);
}

/// Not a test on its own: the child process of the next test (it holds a runtime on the dir
/// named by `AGENTS_LOCK_CHILD` until it is killed).
#[tokio::test]
async fn child_holding_a_data_dir() {
    let Ok(dir) = std::env::var("AGENTS_LOCK_CHILD") else {
        return;
    };
    let runtime = on(dir.as_ref()).build().unwrap();
    runtime.agent::<Counter>("held").add(1).await.unwrap();
    println!("holding");
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test]
async fn another_process_is_refused_and_a_killed_one_leaves_no_stale_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holding_a_data_dir", "--nocapture"])
        .env("AGENTS_LOCK_CHILD", dir.path())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    while let Some(line) = out.next_line().await.unwrap() {
        if line.contains("holding") {
            break;
        }
    }
    let refused = on(dir.path()).build().unwrap_err();
    let said = refused.to_string();
    assert!(
        said.contains(&format!("pid {}", child.id().unwrap())),
        "{said}"
    );

    // SIGKILL: the operating system drops the lock with the process.
    child.kill().await.unwrap();
    let runtime = on(dir.path()).build().unwrap();
    assert_eq!(runtime.agent::<Counter>("held").add(1).await.unwrap(), 2);
}

/// Reads the counter row of `path` from a connection of its own.
fn read_counter(path: &std::path::Path) -> rusqlite::Result<i64> {
    let db = rusqlite::Connection::open(path)?;
    db.busy_timeout(Duration::ZERO)?;
    db.query_row("SELECT n FROM counter", [], |r| r.get(0))
}

/// Not a test on its own: the child process of the next test (it reads the counter of the
/// database named by `AGENTS_READ_CHILD` and prints what it got).
#[test]
fn child_reading_a_database() {
    let Ok(path) = std::env::var("AGENTS_READ_CHILD") else {
        return;
    };
    match read_counter(path.as_ref()) {
        Ok(n) => println!("read {n}"),
        Err(e) => println!("refused {e}"),
    }
}

/// What another process gets when it reads the counter of `path`.
fn read_from_another_process(path: &std::path::Path) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_reading_a_database", "--nocapture"])
        .env("AGENTS_READ_CHILD", path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let said = out
        .lines()
        .find(|l| l.starts_with("read ") || l.starts_with("refused "));
    said.unwrap_or(&out).to_owned()
}

#[tokio::test]
async fn a_live_agents_database_is_read_by_others_only_once_it_hibernates() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = on(dir.path()).build().unwrap();
    let path = runtime.database_path::<Counter>("x").unwrap();
    runtime.agent::<Counter>("x").add(7).await.unwrap();
    let e = read_counter(&path).unwrap_err();
    assert!(e.to_string().contains("locked"), "{e}");
    // Another process's SQLite is refused too.
    let other = read_from_another_process(&path);
    assert!(
        other.starts_with("refused") && other.contains("locked"),
        "{other}"
    );
    assert!(runtime.hibernate::<Counter>("x").await.unwrap());
    assert_eq!(read_counter(&path).unwrap(), 7);
    assert_eq!(read_from_another_process(&path), "read 7");
    runtime.shutdown().await;

    // Unless the runtime is told to let them.
    let runtime = on(dir.path()).readable_while_live(true).build().unwrap();
    runtime.agent::<Counter>("x").add(1).await.unwrap();
    assert_eq!(read_counter(&path).unwrap(), 8);
}

/// Not a test on its own: the child process of the next test (it opens the database named by
/// `AGENTS_HOLD_CHILD` in a read transaction, says `holding`, and keeps it until stdin closes).
#[test]
fn child_holding_a_database() {
    let Ok(path) = std::env::var("AGENTS_HOLD_CHILD") else {
        return;
    };
    let db = rusqlite::Connection::open(path).unwrap();
    db.execute_batch("BEGIN").unwrap();
    let n: i64 = db
        .query_row("SELECT n FROM counter", [], |r| r.get(0))
        .unwrap();
    println!("holding {n}");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// A database that another process keeps open in a transaction (a `sqlite3` shell, say) is
/// waited for without holding up other agents: they open and answer meanwhile; the waiting one
/// answers once the other process lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_locked_by_another_process_holds_up_only_its_own_agent() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let runtime = on(dir.path()).build().unwrap();
    let path = runtime.database_path::<Counter>("held").unwrap();
    runtime.agent::<Counter>("held").add(1).await.unwrap();
    assert!(runtime.hibernate::<Counter>("held").await.unwrap());
    let mut shell = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holding_a_database", "--nocapture"])
        .env("AGENTS_HOLD_CHILD", &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(shell.stdout.take().unwrap()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.contains("holding 1") {
            break;
        }
    }

    let held = tokio::spawn({
        let agent = runtime.agent::<Counter>("held");
        async move { agent.add(1).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await; // it is waiting for the lock
    for i in 0..5 {
        let other = runtime.agent::<Counter>(&format!("other{i}"));
        assert_eq!(other.add(1).await.unwrap(), 1);
    }
    assert!(
        !held.is_finished(),
        "the held agent still waits while the others were served"
    );
    drop(shell.stdin.take()); // the other process lets go
    shell.wait().await.unwrap();
    assert_eq!(held.await.unwrap().unwrap(), 2);
}
