//! Kill a real server process with SIGKILL mid-load: every acknowledged increment is there after
//! the restart, with Durability::Full (the default) and with Durability::Normal, whose promise
//! is exactly this: surviving a crash of the process.

mod common;

use std::collections::HashMap;

use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_increment_survives_sigkill_with_full_durability() {
    sigkill_mid_load(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_increment_survives_sigkill_with_normal_durability() {
    sigkill_mid_load(&["normal"]).await;
}

/// The next line of the server, `ack TAG TOTAL`: the tag and the total.
async fn next_ack(lines: &mut common::Lines) -> (usize, i64) {
    let line = lines
        .next_line()
        .await
        .unwrap()
        .expect("the server answers");
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(words[0], "ack", "{line}");
    (words[1].parse().unwrap(), words[2].parse().unwrap())
}

/// Writes `line(0)`, `line(1)`, … to the server as fast as it reads them until it is killed
/// (the pipe breaks), and returns how many lines went into the pipe. The server is never idle
/// and never done, so a kill always lands mid-load, however fast the server has become.
fn write_until_killed(
    mut stdin: tokio::process::ChildStdin,
    line: impl Fn(usize) -> String + Send + 'static,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut sent = 0;
        while stdin.write_all(line(sent).as_bytes()).await.is_ok() {
            sent += 1;
        }
        sent
    })
}

async fn sigkill_mid_load(durability: &[&str]) {
    let exe = common::example_binary("counter");
    let dir = tempfile::tempdir().unwrap();
    const NAMES: usize = 4;

    let (mut child, stdin, mut lines) = common::start_server(&exe, dir.path(), durability).await;
    let writer = write_until_killed(stdin, |i| format!("add k{} 1 {i}\n", i % NAMES));

    // Per name: how many adds were acknowledged, and the highest total acknowledged.
    let mut acked: HashMap<String, (i64, i64)> = HashMap::new();
    let mut total_acked = 0;
    while total_acked < 3_000 {
        let (tag, total) = next_ack(&mut lines).await;
        let entry = acked.entry(format!("k{}", tag % NAMES)).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(total);
        total_acked += 1;
    }
    child.start_kill().unwrap(); // SIGKILL
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "the server was killed, not stopped");
    let sent = writer.await.unwrap();

    let (mut child, mut stdin, mut lines) =
        common::start_server(&exe, dir.path(), durability).await;
    for k in 0..NAMES {
        stdin
            .write_all(format!("get k{k} {k}\n").as_bytes())
            .await
            .unwrap();
    }
    let mut found = HashMap::new();
    for _ in 0..NAMES {
        let line = lines.next_line().await.unwrap().unwrap();
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[0], "val", "{line}");
        found.insert(format!("k{}", words[1]), words[2].parse::<i64>().unwrap());
    }
    for (name, (count, max_total)) in &acked {
        let now = found[name];
        assert!(
            now >= *max_total,
            "{name}: acknowledged total {max_total}, found {now} after SIGKILL"
        );
        assert!(
            now >= *count,
            "{name}: {count} adds acknowledged, found {now}"
        );
        assert!(
            now <= sent.div_ceil(NAMES) as i64,
            "{name}: {now} is more than was sent"
        );
    }
    let survived: i64 = found.values().sum();
    assert!(
        survived < sent as i64,
        "the kill landed mid-load (all {sent} adds had already run)"
    );
    eprintln!("{durability:?}: acknowledged {total_acked} of {sent} before SIGKILL; found {found:?} after restart");
    drop(stdin);
    let _ = child.wait().await;
}

/// New agents are made from spares or a template copy (renamed into place): a SIGKILL while
/// hundreds are being created (and spares made) leaves every acknowledged one with its write,
/// and every file whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_created_when_the_process_is_killed_are_whole() {
    let exe = common::example_binary("counter");
    let dir = tempfile::tempdir().unwrap();
    let (mut child, stdin, mut lines) = common::start_server(&exe, dir.path(), &[]).await;
    // Every line a new agent.
    let writer = write_until_killed(stdin, |i| format!("add new{i} 1 {i}\n"));
    let mut acked = Vec::new();
    while acked.len() < 300 {
        acked.push(next_ack(&mut lines).await.0);
    }
    child.start_kill().unwrap(); // SIGKILL, mid-creation
    child.wait().await.unwrap();
    let sent = writer.await.unwrap();

    let (mut child, mut stdin, mut lines) = common::start_server(&exe, dir.path(), &[]).await;
    for &i in &acked {
        stdin
            .write_all(format!("get new{i} {i}\n").as_bytes())
            .await
            .unwrap();
    }
    for _ in &acked {
        let line = lines.next_line().await.unwrap().unwrap();
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[0], "val", "{line}");
        assert_eq!(
            words[2], "1",
            "new{}: its acknowledged add is gone",
            words[1]
        );
    }
    drop(stdin);
    let _ = child.wait().await;

    // Every database file there is whole (the runtime has stopped: nobody holds them).
    let databases = common::agent_databases(dir.path());
    databases.iter().for_each(|path| common::assert_whole(path));
    // And so is every spare the restart kept.
    let spares = std::fs::read_dir(dir.path().join("spare")).unwrap();
    let spares: Vec<_> = spares
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sqlite"))
        .collect();
    spares.iter().for_each(|path| common::assert_whole(path));
    let files = databases.len();
    assert!(
        files >= acked.len(),
        "{files} files for {} agents",
        acked.len()
    );
    assert!(
        files < sent,
        "the kill landed mid-creation (all {sent} were made)"
    );
    eprintln!(
        "{} acknowledged, {files} files and {} spares whole after SIGKILL",
        acked.len(),
        spares.len()
    );
}
