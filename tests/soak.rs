//! A soak bounded in time: a server process whose descriptor limit is 256 meets far more
//! WebSockets and agents than it may hold at once. Throughout, a health request is answered
//! within a second; its memory stays bounded; afterwards, every acknowledged write is there.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agents::prelude::*;
use common::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Set (to the data dir) in the server process the soak starts.
const CHILD: &str = "AGENTS_SOAK_SERVER_DIR";
/// The server's descriptor limit.
const DESCRIPTORS: u64 = 256;
/// Rounds of clients, and clients (each on an agent of its own) per round.
const ROUNDS: usize = 6;
const CLIENTS: usize = 120;
/// Calls each connected client makes.
const CALLS: u64 = 5;

/// The server's side of the soak: a no-op unless the soak started this process.
#[test]
fn soak_server() {
    let lower = || rlimit::setrlimit(rlimit::Resource::NOFILE, DESCRIPTORS, DESCRIPTORS).unwrap();
    common::serve_in_child(CHILD, lower, || Runtime::builder().agent::<Counter>());
}

/// A health request: `GET /agents.js`, answered 200, and how long it took.
async fn health(addr: std::net::SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request =
            format!("GET /agents.js HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0; 12];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(head)) if head.ends_with("200") => Ok(started.elapsed()),
        Ok(Ok(head)) => Err(format!("answered {head}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in 5 s".into()),
    }
}

/// The server's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// One client: connects to its own agent and makes `CALLS` calls, recording what was
/// acknowledged; a connection turned away (503) records nothing.
async fn client(addr: std::net::SocketAddr, name: String, acked: Arc<Mutex<HashMap<String, i64>>>) {
    let Ok(mut ws) = common::ws_connect(
        addr,
        &format!("/agents/counter/{name}"),
        Some("agents.v1.json"),
    )
    .await
    else {
        return;
    };
    common::next_json(&mut ws).await; // identity
    for id in 0..CALLS {
        let reply = common::call(&mut ws, id, "add", serde_json::json!([1])).await;
        let total = reply["ok"]
            .as_i64()
            .unwrap_or_else(|| panic!("{name}: an acknowledged add, not {reply}"));
        acked.lock().unwrap().insert(name.clone(), total);
    }
    let _ = ws.close(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_limits_the_server_keeps_answering_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = common::start_child("soak_server", CHILD, dir.path()).await;
    let pid = server.id().unwrap();

    // Health checks every 50 ms while the load runs.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checks = tokio::spawn({
        let done = done.clone();
        async move {
            let (mut answered, mut slowest, mut max_rss) = (0, Duration::ZERO, 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                match health(addr).await {
                    Ok(took) => slowest = slowest.max(took),
                    Err(e) => panic!("a health request failed after {answered}: {e}"),
                }
                answered += 1;
                max_rss = max_rss.max(rss(pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (answered, slowest, max_rss)
        }
    });
    // Rounds of clients, each on an agent of its own: far more sockets than the server takes
    // (96 connections, 84 of them WebSockets) and agents than it keeps live (24).
    let acked = Arc::new(Mutex::new(HashMap::new()));
    for round in 0..ROUNDS {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| tokio::spawn(client(addr, format!("r{round}-{i}"), acked.clone())))
            .collect();
        for c in clients {
            c.await.unwrap();
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, slowest, max_rss) = checks.await.unwrap();
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    println!(
        "soak: {} agents acknowledged {} calls; {answered} health requests, the slowest {slowest:?}; server RSS at most {} MiB",
        acked.len(),
        acked.values().sum::<i64>(),
        max_rss >> 20
    );
    assert!(answered > 0);
    assert!(
        slowest < Duration::from_secs(1),
        "a health request took {slowest:?}"
    );
    assert!(
        acked.len() >= CLIENTS,
        "the server served clients ({})",
        acked.len()
    );
    assert!(max_rss < 256 << 20, "RSS {max_rss} is bounded");

    // Nothing acknowledged is lost: a runtime on the same data dir, once the server is gone.
    server.kill().await.unwrap();
    let runtime = Runtime::builder()
        .data_dir(dir.path())
        .agent::<Counter>()
        .build()
        .unwrap();
    for (name, total) in &acked {
        assert_eq!(
            runtime.agent::<Counter>(name).get().await.unwrap(),
            *total,
            "{name}"
        );
    }
}
