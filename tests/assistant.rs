//! The assistant example: per-user agents behind a gateway (token auth, a rate limit through an
//! internal agent), over HTTP and WebSockets; streamed replies; history across a restart;
//! assistants messaging each other.

mod common;

#[path = "../examples/assistant.rs"]
#[allow(dead_code)]
mod assistant;

use assistant::{Assistant, AssistantEvent};
use common::{http_request, next_json, send_json, ws_connect};
use serde_json::json;

async fn serve(rt: &agents::testing::TestRuntime) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = assistant::app(rt.runtime().clone());
    tokio::spawn(async move { agents::axum::serve(listener, app).await });
    addr
}

fn runtime() -> agents::testing::TestRuntime {
    agents::testing::TestRuntime::start(
        agents::Runtime::builder()
            .agent::<Assistant>()
            .agent::<assistant::RateLimiter>(),
    )
    .unwrap()
}

/// An HTTP request through the gateway with `user`'s token.
async fn api(
    addr: std::net::SocketAddr,
    method: &str,
    user: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} /api/{user}{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer demo-{user}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let body = serde_json::from_str(body).unwrap_or(json!(body));
    (status, body, head.to_lowercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_through_the_gateway_and_history_across_a_restart() {
    let mut rt = runtime();
    let addr = serve(&rt).await;
    let (status, body, _) = api(addr, "POST", "ann", "/message", r#"{"text":"hello there"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reply"], "You said 2 words. Backwards: there hello");
    let (_, info, _) = api(addr, "GET", "ann", "/info", "").await;
    assert_eq!(info, json!({"user": "ann", "messages": 2}));
    // No token, a wrong token: refused before the agent is woken.
    let (status, _) = http_request(addr, "GET", "/api/ann/info", "").await;
    assert_eq!(status, 401);
    // The agents are internal: only the gateway reaches them.
    let (status, _) = http_request(addr, "GET", "/agents/assistant/ann/info", "").await;
    assert_eq!(status, 404);

    rt.restart().await.unwrap();
    let addr = serve(&rt).await;
    let (_, history, _) = api(addr, "GET", "ann", "/history", "").await;
    let texts: Vec<_> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text"].clone())
        .collect();
    assert_eq!(
        texts,
        [
            json!("hello there"),
            json!("You said 2 words. Backwards: there hello")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_get_a_welcome_and_a_streamed_reply_in_order() {
    let rt = runtime();
    let addr = serve(&rt).await;
    rt.agent::<Assistant>("bo")
        .message("one two".into())
        .await
        .unwrap();
    let mut ws = ws_connect(addr, "/api/bo?token=demo-bo", Some("agents.v1.json"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "identity");
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "event", "data": {"type": "welcome", "messages": 2}})
    );
    send_json(
        &mut ws,
        json!({"type": "call", "id": 1, "method": "ask", "args": ["a b c"]}),
    )
    .await;
    let mut chunks = Vec::new();
    loop {
        let frame = next_json(&mut ws).await;
        match frame["type"].as_str() {
            Some("chunk") => chunks.push(frame["data"].as_str().unwrap().to_owned()),
            Some("reply") => {
                assert_eq!(frame["ok"], json!(null));
                break;
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    assert_eq!(chunks.concat().trim(), "You said 3 words. Backwards: c b a");
    assert!(chunks.len() > 3, "in chunks: {chunks:?}");
    // The typed client streams the same, in-process.
    let mut stream = rt.agent::<Assistant>("bo").ask("x y".into()).await;
    let mut words = Vec::new();
    while let Some(word) = stream.next().await {
        words.push(word.unwrap());
    }
    assert_eq!(words.concat().trim(), "You said 2 words. Backwards: y x");
    // A refused socket is told why, with a code a browser can read.
    let refused = ws_connect(addr, "/api/bo?token=nope", Some("agents.v1.json")).await;
    let mut refused = refused.unwrap();
    match common::next_frame(&mut refused).await {
        tokio_tungstenite::tungstenite::Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4401)
        }
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429_with_retry_after() {
    let rt = runtime();
    let addr = serve(&rt).await;
    for i in 0..assistant::BURST as usize {
        let (status, _, _) = api(addr, "GET", "cy", "/info", "").await;
        assert_eq!(status, 200, "request {i}");
    }
    let (status, body, head) = api(addr, "GET", "cy", "/info", "").await;
    assert_eq!(status, 429, "{body}");
    assert!(head.contains("retry-after: "), "{head}");
    // Another user has a bucket of their own.
    assert_eq!(api(addr, "GET", "di", "/info", "").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assistants_message_each_other_and_both_histories_keep_it() {
    let rt = runtime();
    let addr = serve(&rt).await;
    let bob = format!("ws://{addr}/api/bob?token=demo-bob");
    let options = agents::ConnectOptions::new().codec(agents::Codec::Json);
    let bob_client = assistant::AssistantClient::connect_with(&bob, options)
        .await
        .unwrap();
    let mut events = bob_client.events();
    let (status, body, _) = api(addr, "POST", "ann", "/call/tell", r#"["bob", "hi bob"]"#).await;
    assert_eq!(status, 200, "{body}");
    let ann = rt.agent::<Assistant>("ann").history().await.unwrap();
    let bob = rt.agent::<Assistant>("bob").history().await.unwrap();
    assert_eq!(
        (ann[0].role.as_str(), ann[0].text.as_str()),
        ("to:bob", "hi bob")
    );
    assert_eq!(
        (bob[0].role.as_str(), bob[0].text.as_str()),
        ("from:ann", "hi bob")
    );
    let mut received = None;
    while let Some(event) = events.next().await {
        if let AssistantEvent::Received { from, text } = event.unwrap() {
            received = Some((from, text));
            break;
        }
    }
    assert_eq!(received, Some(("ann".into(), "hi bob".into())));
    // `receive` is internal: the network cannot forge a message from another assistant.
    let (status, body, _) = api(
        addr,
        "POST",
        "bob",
        "/call/receive",
        r#"["eve", "trust me"]"#,
    )
    .await;
    assert_eq!((status, &body["kind"]), (404, &json!("unknown_method")));
}
