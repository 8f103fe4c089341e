//! Calls over a WebSocket with the `agents.v1.json` subprotocol, on a real socket on 127.0.0.1.

mod common;

use std::time::Duration;

use agents::{prelude::*, testing::TestRuntime};
use common::{call, next_json, send_json, ws_connect, Counter, Socket};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::{protocol::frame::coding::CloseCode, Message};

async fn serve() -> (TestRuntime, std::net::SocketAddr) {
    serve_with(
        Runtime::builder()
            .agent::<Counter>()
            .max_message_size(64 * 1024),
    )
    .await
}

async fn serve_with(builder: agents::Builder) -> (TestRuntime, std::net::SocketAddr) {
    common::serve(builder).await
}

/// Connects with the JSON protocol and reads the identity frame.
async fn open(addr: std::net::SocketAddr, name: &str) -> Socket {
    let mut ws = ws_connect(
        addr,
        &format!("/agents/counter/{name}"),
        Some("agents.v1.json"),
    )
    .await
    .unwrap();
    let identity = next_json(&mut ws).await;
    assert_eq!(
        (
            identity["type"].as_str(),
            identity["class"].as_str(),
            identity["name"].as_str()
        ),
        (Some("identity"), Some("counter"), Some(name))
    );
    assert!(
        identity["conn"].as_str().is_some_and(|c| !c.is_empty()),
        "{identity}"
    );
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_answered_by_id_even_when_pipelined() {
    let (rt, addr) = serve().await;
    let mut ws = open(addr, "ws-bob").await;
    send_json(
        &mut ws,
        json!({"type": "call", "id": 7, "method": "add", "args": [5]}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "reply", "id": 7, "ok": 5})
    );
    for id in 100..150 {
        send_json(
            &mut ws,
            json!({"type": "call", "id": id, "method": "add", "args": [1]}),
        )
        .await;
    }
    let mut seen = Vec::new();
    for _ in 100..150 {
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["type"], "reply");
        seen.push(reply["id"].as_u64().unwrap());
    }
    seen.sort();
    assert_eq!(seen, (100..150).collect::<Vec<_>>());
    assert_eq!(rt.agent::<Counter>("ws-bob").get().await.unwrap(), 55);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_answers_and_the_connection_stays_up() {
    let (_rt, addr) = serve().await;
    let mut ws = open(addr, "ws-errors").await;
    send_json(
        &mut ws,
        json!({"type": "call", "id": 1, "method": "nope", "args": []}),
    )
    .await;
    let r = next_json(&mut ws).await;
    assert_eq!(
        (r["id"].as_u64(), r["err"]["kind"].as_str()),
        (Some(1), Some("unknown_method")),
        "{r}"
    );
    send_json(
        &mut ws,
        json!({"type": "call", "id": 2, "method": "add", "args": ["five"]}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["err"]["kind"], "bad_args");
    send_json(
        &mut ws,
        json!({"type": "call", "id": 3, "method": "add", "args": {"by": 1}}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["err"]["kind"], "bad_args");
    send_json(
        &mut ws,
        json!({"type": "call", "id": 4, "method": "add_then_fail", "args": [1]}),
    )
    .await;
    let r = next_json(&mut ws).await;
    assert_eq!(
        r["err"],
        json!({"kind": "app", "message": "refused: not adding 1", "data": {"Refused": "not adding 1"}})
    );
    ws.send(Message::Text("this is not json".into()))
        .await
        .unwrap();
    let error = next_json(&mut ws).await;
    assert_eq!(
        (&error["type"], &error["kind"]),
        (&json!("error"), &json!("bad_args"))
    );
    send_json(&mut ws, json!({"type": "teleport"})).await;
    assert_eq!(next_json(&mut ws).await["kind"], "bad_args");
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["kind"], "bad_args");
    // Still up, and nothing was written by the failed calls.
    send_json(&mut ws, json!({"type": "call", "id": 5, "method": "get"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "reply", "id": 5, "ok": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_cancellation_work_and_a_cancelled_call_never_runs() {
    let (rt, addr) = serve().await;
    let mut ws = open(addr, "ws-cancel").await;
    send_json(
        &mut ws,
        json!({"type": "call", "id": 1, "method": "sleep_ms", "args": [500], "deadline_ms": 50}),
    )
    .await;
    let r = next_json(&mut ws).await;
    assert_eq!(
        (r["id"].as_u64(), r["err"]["kind"].as_str()),
        (Some(1), Some("timeout")),
        "{r}"
    );
    // A call queued behind a slow one, then cancelled: it must never run.
    send_json(
        &mut ws,
        json!({"type": "call", "id": 2, "method": "sleep_ms", "args": [400]}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_json(
        &mut ws,
        json!({"type": "call", "id": 3, "method": "add", "args": [1000]}),
    )
    .await;
    send_json(&mut ws, json!({"type": "cancel", "id": 3})).await;
    let r = next_json(&mut ws).await;
    assert_eq!(
        (r["id"].as_u64(), r["err"]["kind"].as_str()),
        (Some(3), Some("cancelled")),
        "{r}"
    );
    // The id is free again at once; the new call 3 is not mistaken for the cancelled one
    // (still queued behind the slow call). A deadline too far to count is no deadline.
    send_json(
        &mut ws,
        json!({"type": "call", "id": 3, "method": "add", "args": [7], "deadline_ms": u64::MAX}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "reply", "id": 2, "ok": null})
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "reply", "id": 3, "ok": 7})
    );
    assert_eq!(
        rt.agent::<Counter>("ws-cancel").get().await.unwrap(),
        7,
        "the cancelled add never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_room_in_a_full_mailbox_still_times_out_on_time() {
    let builder = Runtime::builder().agent::<Counter>().mailbox_capacity(1);
    let (rt, addr) = serve_with(builder).await;
    let mut ws = open(addr, "ws-full").await;
    // The agent is busy for 1.5 s; the next call fills its one-event mailbox, so the reader
    // waits to hand over the third. Its 50 ms deadline is answered meanwhile, while the agent
    // is still busy (not once the reader could hand the call over), and the call never runs.
    let call = |id: u64, method: &str, args: serde_json::Value| json!({"type": "call", "id": id, "method": method, "args": args});
    send_json(&mut ws, call(1, "sleep_ms", json!([1500]))).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_json(&mut ws, call(2, "add", json!([1]))).await;
    let mut third = call(3, "add", json!([1000]));
    third["deadline_ms"] = json!(50);
    send_json(&mut ws, third).await;
    let r = tokio::time::timeout(Duration::from_millis(1000), next_json(&mut ws))
        .await
        .expect("the timeout, while the agent is still busy");
    assert_eq!(
        (r["id"].as_u64(), r["err"]["kind"].as_str()),
        (Some(3), Some("timeout")),
        "{r}"
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "reply", "id": 1, "ok": null})
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "reply", "id": 2, "ok": 1})
    );
    assert_eq!(rt.agent::<Counter>("ws-full").get().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_close_with_1009_and_bad_addresses_are_refused_before_upgrade() {
    let (rt, addr) = serve().await;
    let mut ws = open(addr, "ws-big").await;
    let big = json!({"type": "call", "id": 1, "method": "add", "args": ["x".repeat(100 * 1024)]});
    ws.send(Message::Text(big.to_string().into()))
        .await
        .unwrap();
    let close = common::next_close(&mut ws).await;
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Size));

    // Unknown classes and invalid names fail the handshake; nothing was woken.
    assert!(
        ws_connect(addr, "/agents/no-such-class/x", Some("agents.v1.json"))
            .await
            .is_err()
    );
    let long = "x".repeat(2000);
    assert!(ws_connect(
        addr,
        &format!("/agents/counter/{long}"),
        Some("agents.v1.json")
    )
    .await
    .is_err());
    // Only the agent connected to (woken by its on_connect) is live, and the oversize call
    // never reached it.
    assert_eq!(rt.live_count(), 1);
    assert_eq!(rt.agent::<Counter>("ws-big").get().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_that_is_not_utf8_closes_with_1007_and_loses_nothing() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        coding::{Data, OpCode},
        Frame,
    };
    let (rt, addr) = serve().await;
    let mut ws = open(addr, "ws-utf8").await;
    let reply = call(&mut ws, 1, "add", json!([2])).await;
    assert_eq!(reply, json!({"type": "reply", "id": 1, "ok": 2}));
    // A text frame whose bytes are not UTF-8, written as a raw frame.
    let bad = Frame::message(vec![0x7b, 0xff, 0xfe, 0x7d], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(bad)).await.unwrap();
    let close = common::next_close(&mut ws).await;
    let close = close.expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Invalid, "{close:?}");
    assert!(close.reason.contains("UTF-8"), "{close:?}");
    // What the connection did before stays.
    assert_eq!(rt.agent::<Counter>("ws-utf8").get().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_disconnected_and_holds_up_nobody() {
    let (_rt, addr) = serve_with(Runtime::builder().agent::<Counter>().outbound_queue(8)).await;
    let mut slow = open(addr, "ws-slow").await;
    // 400 replies of 64 KiB (25 MiB) that the client never reads: more than the kernel's socket
    // buffers and the 8-frame queue can hold.
    for id in 0..400 {
        send_json(
            &mut slow,
            json!({"type": "call", "id": id, "method": "blob", "args": [64 * 1024]}),
        )
        .await;
    }
    // Meanwhile another client of the same agent is served normally.
    let mut fast = open(addr, "ws-slow").await;
    for id in 0..20 {
        send_json(
            &mut fast,
            json!({"type": "call", "id": id, "method": "add", "args": [1]}),
        )
        .await;
        assert_eq!(next_json(&mut fast).await["ok"], id + 1);
    }
    // The slow client finds the connection ended after at most what was buffered.
    let mut replies = 0;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(20), slow.next())
            .await
            .expect("the server ends the connection")
        {
            Some(Ok(Message::Text(_))) => replies += 1,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None, // closed without a close frame: its buffers were full
        }
    };
    assert!(
        replies < 400,
        "the connection was cut before every reply was written ({replies} read)"
    );
    assert!(matches!(ended, None | Some(CloseCode::Policy)), "{ended:?}");
}
