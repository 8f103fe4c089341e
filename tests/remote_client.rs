//! The generated client over the network: `CounterClient::connect("ws://…")`, postcard protocol.

mod common;

use std::time::Duration;

use agents::{prelude::*, testing::TestRuntime};
use common::{Counter, CounterClient, CounterError};

async fn serve() -> (TestRuntime, String) {
    let (rt, addr) = common::serve(Runtime::builder().agent::<Counter>()).await;
    (rt, format!("ws://{addr}/agents/counter"))
}

/// A typed client of the counter `name` under `base`.
async fn client(base: &str, name: &str) -> CounterClient {
    CounterClient::connect(&format!("{base}/{name}"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_typed_client_works_over_the_network() {
    let (rt, base) = serve().await;
    let remote = client(&base, "net-bob").await;
    assert_eq!(remote.add(5).await.unwrap(), 5);
    assert_eq!(remote.add(2).await.unwrap(), 7);
    assert_eq!(
        rt.agent::<Counter>("net-bob").get().await.unwrap(),
        7,
        "the same agent as in-process"
    );
    // A reply far larger than the client's 8 KiB read buffer arrives whole.
    assert_eq!(remote.blob(300_000).await.unwrap().len(), 300_000);
    // Typed application errors arrive typed; the write was rolled back.
    assert_eq!(
        remote.add_then_fail(3).await.unwrap_err(),
        RpcError::App(CounterError::Refused("not adding 3".into()))
    );
    assert_eq!(remote.get().await.unwrap(), 7);
    // A panic is an internal error that tells a reference, not the panic's message; the
    // connection and the agent go on.
    let panicked = remote.add_then_panic(1).await;
    assert!(
        matches!(&panicked, Err(RpcError::Internal(m)) if m.contains("panicked") && !m.contains("boom")),
        "{panicked:?}"
    );
    assert_eq!(remote.add(1).await.unwrap(), 8);
    // Tuples, strings and unit travel too.
    let (class, name, _) = remote.whoami().await.unwrap();
    assert_eq!((class.as_str(), name.as_str()), ("counter", "net-bob"));
    remote.sleep_ms(1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_many_concurrent_calls() {
    let (_rt, base) = serve().await;
    let remote = client(&base, "net-shared").await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let remote = remote.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    remote.add(1).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(remote.get().await.unwrap(), 800);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_dropped_calls_cancel_on_the_server() {
    let (rt, base) = serve().await;
    let remote = client(&base, "net-cancel").await;
    let quick = remote.clone().with_timeout(Duration::from_millis(50));
    assert_eq!(quick.sleep_ms(500).await.unwrap_err(), RpcError::Timeout);
    // Queue an add behind a slow call, then drop it: it never runs.
    let slow = tokio::spawn({
        let remote = remote.clone();
        async move { remote.sleep_ms(400).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(50), remote.add(1000))
            .await
            .is_err()
    );
    slow.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        rt.agent::<Counter>("net-cancel").get().await.unwrap(),
        0,
        "the dropped add was cancelled"
    );
    // A timeout too long to count is no timeout (not an overflow, here or on the server).
    let patient = remote.clone().with_timeout(Duration::MAX);
    assert_eq!(patient.add(3).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_addresses_fail_to_connect_and_a_lost_connection_fails_calls_clearly() {
    let (rt, base) = serve().await;
    let err = CounterClient::connect(&base.replace("/counter", "/nope/x"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("refused the connection: 404"),
        "{err}"
    );
    assert!(CounterClient::connect("not a url").await.is_err());

    // A proxy the test can cut, between the client and the server.
    let server = base
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let (cut, _) = tokio::sync::broadcast::channel::<()>(1);
    let cutter = cut.clone();
    tokio::spawn(async move {
        loop {
            let (mut client, _) = proxy.accept().await.unwrap();
            let server = server.clone();
            let mut cut = cutter.subscribe();
            tokio::spawn(async move {
                let mut upstream = tokio::net::TcpStream::connect(server).await.unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    _ = cut.recv() => {}
                }
            });
        }
    });
    let remote = CounterClient::connect(&format!("ws://{proxy_addr}/agents/counter/net-lost"))
        .await
        .unwrap();
    assert_eq!(remote.add(1).await.unwrap(), 1);
    let in_flight = tokio::spawn({
        let remote = remote.clone();
        async move { remote.sleep_ms(2_000).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    cut.send(()).unwrap(); // the network goes away mid-call
    let err = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::Internal(m) if m.contains("may or may not have run")),
        "{err}"
    );
    // The client reconnects by itself; the next call waits for that and goes through.
    assert_eq!(remote.add(1).await.unwrap(), 2);
    // A call that cannot reach the agent before its deadline says so.
    drop(rt);
}

/// A server that completes the handshake, says who it is, and then never reads a frame: once
/// the socket's buffers are full, no frame the client writes can go out.
#[allow(clippy::result_large_err)] // tungstenite's handshake callback's type
async fn a_server_that_stops_reading() -> std::net::SocketAddr {
    use agents::client::protocol::{to_postcard, ServerFrame, POSTCARD_PROTOCOL};
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::{handshake::server, Message};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let chose = |_: &server::Request, mut response: server::Response| {
            let protocol = POSTCARD_PROTOCOL.parse().unwrap();
            response
                .headers_mut()
                .insert("sec-websocket-protocol", protocol);
            Ok(response)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(stream, chose)
            .await
            .unwrap();
        let identity = ServerFrame::<Vec<u8>>::Identity {
            class: "counter".into(),
            name: "deaf".into(),
            conn: "c1".into(),
        };
        ws.send(Message::Binary(to_postcard(&identity).into()))
            .await
            .unwrap();
        // Holds the socket open, reading nothing.
        std::future::pending::<()>().await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_cannot_be_written_fails_by_its_deadline() {
    use agents::client::{OutgoingCall, Payload, Transport, WsTransport};
    let addr = a_server_that_stops_reading().await;
    let transport = WsTransport::connect(&format!("ws://{addr}/agents/counter/deaf"))
        .await
        .unwrap();
    // 4 MiB calls, each timing out after 300 ms: the first ones fill the socket's buffers,
    // and then a call waits to be written. Each one fails by its deadline, however far it got.
    for _ in 0..8 {
        let call = OutgoingCall {
            method: "add".into(),
            args: Payload::Postcard(vec![7; 4 << 20]),
            timeout: Some(Duration::from_millis(300)),
        };
        let outcome = tokio::time::timeout(Duration::from_secs(5), transport.call(call)).await;
        let err = outcome
            .expect("the call outlived its deadline")
            .unwrap_err();
        assert_eq!(err.kind, agents::client::ErrorKind::Timeout, "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_larger_than_the_socket_takes_at_once_arrives_whole_and_the_socket_goes_on() {
    let (_rt, base) = serve().await;
    let remote = client(&base, "net-large").await;
    // The only call in flight: its reply is written by the agent's side at once, as far as the
    // socket takes it, and the connection's writer task flushes the rest.
    let rounds = async {
        for round in 1..=3 {
            let blob = remote.blob(6 << 20).await.unwrap();
            assert_eq!(blob.len(), 6 << 20);
            assert_eq!(remote.add(1).await.unwrap(), round, "the socket goes on");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), rounds)
        .await
        .expect("a reply's rest was left unwritten");
    // Larger than tungstenite's default frame limit (16 MiB), within the client's (64 MiB).
    assert_eq!(remote.blob(24 << 20).await.unwrap().len(), 24 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_past_the_clients_limit_fails_its_call_saying_so() {
    let (_rt, base) = serve().await;
    let options = agents::client::ConnectOptions::new().max_message_bytes(1 << 20);
    let remote = CounterClient::connect_with(&format!("{base}/net-limit"), options)
        .await
        .unwrap();
    let err = remote.blob(2 << 20).await.unwrap_err();
    assert!(
        matches!(&err, RpcError::Internal(m) if m.contains("too long") && m.contains("may or may not have run")),
        "{err}"
    );
    // The client reconnects by itself, and the next call goes through.
    assert_eq!(remote.add(1).await.unwrap(), 1);
}
