//! Network benchmarks, printed as JSON lines, next to a raw tokio-tungstenite echo server
//! measured in the same run. Every agent call does a durable SQLite write (Durability::Full).
//!
//! `cargo bench -p agents --bench network` (add `-- --quick` for a smoke run).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

mod common;

use agents::{prelude::*, testing::TestRuntime};
use common::{Counter, CounterClient};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

/// A raw WebSocket echo server on 127.0.0.1: the baseline.
async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_binary() && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// `sockets` connections with `window` requests in flight each; returns round trips per second.
async fn raw_echo(
    addr: std::net::SocketAddr,
    sockets: usize,
    window: usize,
    per_socket: usize,
) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sockets {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .unwrap();
        let (mut sink, mut stream) = ws.split();
        let credits = Arc::new(Semaphore::new(window));
        let sender = {
            let credits = credits.clone();
            tokio::spawn(async move {
                for i in 0..per_socket {
                    credits.acquire().await.unwrap().forget();
                    // A frame of the size of a postcard call to `add`.
                    sink.send(Message::Binary(vec![i as u8; 16].into()))
                        .await
                        .unwrap();
                }
                sink
            })
        };
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_socket {
                stream.next().await.unwrap().unwrap();
                credits.add_permits(1);
            }
            drop(sender.await);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (sockets * per_socket) as f64 / started.elapsed().as_secs_f64()
}

/// The same shape through the runtime: typed calls, each a durable write.
async fn rpc(base: &str, sockets: usize, window: usize, per_socket: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sockets {
        let client = CounterClient::connect(&format!("{base}/hot"))
            .await
            .unwrap();
        for _ in 0..window {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_socket / window {
                    client.add(1).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    (sockets * per_socket) as f64 / started.elapsed().as_secs_f64()
}

fn report(bench: &str, calls: usize, rate: f64, baseline: f64) {
    println!(
        "{{\"bench\":\"{bench}\",\"calls\":{calls},\"calls_per_sec\":{rate:.0},\"baseline\":\"raw_tungstenite_echo\",\"baseline_per_sec\":{baseline:.0},\"ratio\":{:.3}}}",
        rate / baseline
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let agents = TestRuntime::start(Runtime::builder().agent::<Counter>()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("ws://{}/agents/counter", listener.local_addr().unwrap());
        let runtime = agents.runtime().clone();
        tokio::spawn(async move { runtime.serve_on(listener).await });
        let echo = echo_server().await;
        tokio::time::sleep(Duration::from_millis(100)).await;

        let n = 2_000 / scale;
        let ours = rpc(&base, 1, 1, n).await;
        let raw = raw_echo(echo, 1, 1, n).await;
        report("sequential_rpc_one_socket", n, ours, raw);

        let per_socket = 2_048 / scale;
        let ours = rpc(&base, 16, 32, per_socket).await;
        let raw = raw_echo(echo, 16, 32, per_socket).await;
        report("pipelined_rpc_16x32_one_agent", 16 * per_socket, ours, raw);
    });
}
