//! What a hostile or careless client meets, over real sockets on 127.0.0.1: each test is one way
//! a server exposed to real traffic used to fail.

mod common;

use agents::prelude::*;
use common::{http_request, serve};

/// An agent whose failures carry things a client must not read.
#[derive(Default)]
pub struct Leaky;
impl Agent for Leaky {}

#[agent]
impl Leaky {
    /// Reads a table that does not exist: SQLite's error names it.
    #[callable]
    pub async fn read_secret(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT n FROM secret_table", [], |r| r.get(0))?)
    }

    /// Panics with a message that holds a secret.
    #[callable]
    pub async fn explode(&mut self, _ctx: &mut Ctx<Self>) -> i64 {
        panic!("secret key 12345");
    }

    /// The application's own error, meant for the client.
    #[callable]
    pub async fn refuse(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        Err(AppError::msg("not today"))
    }

    #[callable]
    pub async fn ping(&mut self, _ctx: &mut Ctx<Self>) -> i64 {
        1
    }
}

/// The message of a JSON error body.
fn message(body: &serde_json::Value) -> String {
    body["error"]["message"]
        .as_str()
        .or(body["message"].as_str())
        .unwrap_or_else(|| panic!("an error message in {body}"))
        .to_owned()
}

/// Finding 8: SQL errors, panic messages and the data dir's paths stay in the server's log; the
/// client learns what kind of failure it was and a reference to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_tell_a_reference_not_internals() {
    let (rt, addr) = serve(Runtime::builder().agent::<Leaky>()).await;
    let dir = rt.runtime().data_dir().to_string_lossy().into_owned();

    let (status, body) = http_request(addr, "POST", "/agents/leaky/a/call/read_secret", "[]").await;
    assert_eq!(status, 500, "{body}");
    let told = message(&body);
    assert!(
        !told.contains("secret_table"),
        "the SQL error leaked: {told}"
    );
    assert!(told.contains("(ref "), "a reference to the log: {told}");

    let (status, body) = http_request(addr, "POST", "/agents/leaky/a/call/explode", "[]").await;
    assert_eq!(status, 500, "{body}");
    let told = message(&body);
    assert!(
        !told.contains("12345"),
        "the panic's message leaked: {told}"
    );
    assert!(
        told.contains("panicked") && told.contains("(ref "),
        "{told}"
    );

    // An agent whose database cannot be opened (a folder is where its file would be).
    let path = rt.runtime().database_path::<Leaky>("blocked").unwrap();
    std::fs::create_dir_all(&path).unwrap();
    let (status, body) = http_request(addr, "POST", "/agents/leaky/blocked/call/ping", "[]").await;
    assert_eq!(status, 500, "{body}");
    let told = message(&body);
    assert!(!told.contains(&dir), "the data dir's path leaked: {told}");
    assert!(!told.contains("agents/"), "a file path leaked: {told}");
    assert!(told.contains("(ref "), "{told}");

    // What the application says to its clients is still said, and the agent still serves.
    let (status, body) = http_request(addr, "POST", "/agents/leaky/a/call/refuse", "[]").await;
    assert_eq!(
        (status, message(&body).as_str()),
        (422, "not today"),
        "{body}"
    );
    let (status, body) = http_request(addr, "POST", "/agents/leaky/a/call/ping", "[]").await;
    assert_eq!((status, body), (200, serde_json::json!(1)));
}

/// One raw HTTP/1.1 exchange: the status, the response's head (lowercase) and its body.
async fn exchange(addr: std::net::SocketAddr, request: String) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        response[9..12].parse().unwrap(),
        head.to_ascii_lowercase(),
        body.to_owned(),
    )
}

/// A `POST` of `body` to `path`, with extra header lines.
fn post(addr: std::net::SocketAddr, path: &str, headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A WebSocket handshake to `path` that says it comes from a page of `origin`.
async fn ws_from(
    addr: std::net::SocketAddr,
    path: &str,
    origin: &str,
) -> Result<common::Socket, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("Origin", origin.parse().unwrap());
    headers.insert("Sec-WebSocket-Protocol", "agents.v1.json".parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
        .map_err(|e| e.to_string())
}

/// Finding 5: what a page on another site can make a logged-in user's browser send without
/// asking (a form, `text/plain`, a body with no type, a WebSocket) is refused; the server's own
/// pages, non-browser clients and the origins the application allows are served, the last with
/// the CORS answers a browser needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_are_refused_unless_their_origin_is_allowed() {
    let (rt, addr) = serve(Runtime::builder().agent::<common::Counter>()).await;
    let call = "/agents/counter/victim/call/add";
    // Bodies a browser sends across sites without a preflight: refused, before anything runs.
    for content_type in [
        "Content-Type: text/plain\r\n",
        "Content-Type: application/x-www-form-urlencoded\r\n",
        "Content-Type: multipart/form-data; boundary=x\r\n",
        "",
    ] {
        let (status, _, body) = exchange(addr, post(addr, call, content_type, "[5]")).await;
        assert_eq!(status, 415, "{content_type:?}: {body}");
        assert!(body.contains("application/json"), "{body}");
    }
    assert!(
        !rt.runtime()
            .database_path::<common::Counter>("victim")
            .unwrap()
            .exists(),
        "no agent was woken for them"
    );
    // Another site's page, with the type it may only send after asking: refused too, as is
    // its preflight.
    let json = "Content-Type: application/json\r\n";
    let evil = "Origin: https://evil.example\r\n";
    let (status, _, body) = exchange(addr, post(addr, call, &format!("{evil}{json}"), "[5]")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("https://evil.example"), "{body}");
    let preflight = format!(
        "OPTIONS {call} HTTP/1.1\r\nHost: {addr}\r\n{evil}Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(exchange(addr, preflight).await.0, 403);
    let e = ws_from(addr, "/agents/counter/victim", "https://evil.example")
        .await
        .unwrap_err();
    assert!(e.contains("403"), "{e}");
    // The server's own page, and a client that is no browser, are served.
    let own = format!("Origin: http://{addr}\r\n");
    let (status, _, body) = exchange(addr, post(addr, call, &format!("{own}{json}"), "[5]")).await;
    assert_eq!((status, body.as_str()), (200, "5"));
    let (status, _, body) = exchange(addr, post(addr, call, json, "[1]")).await;
    assert_eq!((status, body.as_str()), (200, "6"));
    ws_from(addr, "/agents/counter/victim", &format!("http://{addr}"))
        .await
        .unwrap();

    // An origin the application allows gets its preflight answered and the CORS headers.
    let (_rt, addr) = serve(
        Runtime::builder()
            .agent::<common::Counter>()
            .allowed_origins(["https://app.example"]),
    )
    .await;
    let app = "Origin: https://app.example\r\n";
    let preflight = format!(
        "OPTIONS {call} HTTP/1.1\r\nHost: {addr}\r\n{app}Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\nConnection: close\r\n\r\n"
    );
    let (status, head, _) = exchange(addr, preflight).await;
    assert_eq!(status, 204, "{head}");
    for line in [
        "access-control-allow-origin: https://app.example",
        "access-control-allow-credentials: true",
        "access-control-allow-headers: content-type",
    ] {
        assert!(head.contains(line), "{line} in {head}");
    }
    let (status, head, body) =
        exchange(addr, post(addr, call, &format!("{app}{json}"), "[2]")).await;
    assert_eq!((status, body.as_str()), (200, "2"));
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    ws_from(addr, "/agents/counter/victim", "https://app.example")
        .await
        .unwrap();
    let (status, _, _) = exchange(addr, post(addr, call, &format!("{evil}{json}"), "[5]")).await;
    assert_eq!(status, 403, "only the listed origin");
}

/// An allowed origin must be one.
#[test]
fn an_allowed_origin_that_is_not_one_fails_the_build() {
    let built = Runtime::builder()
        .data_dir(std::env::temp_dir())
        .allowed_origins(["app.example/"])
        .build();
    let Err(e) = built else {
        panic!("built with an invalid origin")
    };
    assert!(e.to_string().contains("`app.example/`"), "{e}");
}

/// Whether the server closes `stream` within `within` (it reads to the end; what the server
/// sent before closing is returned).
async fn closed_by_server(
    stream: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await
        .ok()
        .map(|()| String::from_utf8_lossy(&seen).into_owned())
}

/// Finding 3: a client that sends its request's head a byte at a time, or keeps a connection
/// open without a next request, gives it back after the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_http_clients_are_closed_after_the_header_timeout() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    let (_rt, addr) = serve(
        Runtime::builder()
            .agent::<Leaky>()
            .header_timeout(Duration::from_millis(300)),
    )
    .await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /agents.js HTTP/1.1\r\nHo")
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut slow, Duration::from_secs(10))
            .await
            .is_some(),
        "a head that never ends is not waited for"
    );
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /agents.js HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    idle.write_all(request.as_bytes()).await.unwrap();
    let answered = closed_by_server(&mut idle, Duration::from_secs(10))
        .await
        .expect("a kept-alive connection with no next request is closed");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
}

/// Findings 1 and 3: connections past the limit are answered 503 at once and closed, not left
/// waiting (or holding a descriptor); WebSockets cannot take the last slots, so a plain request
/// is still answered while they are at their limit; a closed socket gives its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_turned_away_and_plain_requests_still_get_in() {
    use std::time::Duration;
    let (_rt, addr) = serve(
        Runtime::builder()
            .agent::<common::Counter>()
            .max_connections(8),
    )
    .await;
    // 8 connections: 7 may be WebSockets.
    let mut sockets = Vec::new();
    for i in 0..7 {
        let path = format!("/agents/counter/c{i}");
        sockets.push(
            common::ws_connect(addr, &path, Some("agents.v1.json"))
                .await
                .unwrap(),
        );
    }
    let e = common::ws_connect(addr, "/agents/counter/c7", Some("agents.v1.json"))
        .await
        .unwrap_err();
    assert!(e.contains("503"), "{e}");
    // (The refused handshake's connection gives its slot back as the server closes it.)
    let plain = format!("GET /agents.js HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut status = 0;
    for _ in 0..50 {
        status = exchange(addr, plain.clone()).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "a plain request finds the slot kept for it");
    // All 8 slots held (7 sockets, one idle connection): the next is told so at once.
    let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut turned = tokio::net::TcpStream::connect(addr).await.unwrap();
    let told = closed_by_server(&mut turned, Duration::from_secs(5))
        .await
        .expect("closed at once");
    assert!(told.starts_with("HTTP/1.1 503"), "{told}");
    assert!(told.contains("Retry-After: 1"), "{told}");
    // A socket that closes gives its slot back.
    drop(_idle);
    sockets.pop().unwrap().close(None).await.unwrap();
    let mut reopened = None;
    for _ in 0..100 {
        match common::ws_connect(addr, "/agents/counter/c7", Some("agents.v1.json")).await {
            Ok(ws) => {
                reopened = Some(ws);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(
        reopened.is_some(),
        "the closed socket's slot was given back"
    );
}

/// Finding 3: a frame larger than a message may be is refused by its header (1009), before its
/// payload is read: the server does not wait for (or buffer) the 12 MiB it announces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_by_its_header() {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::{protocol::frame::coding::CloseCode, Message};
    let (_rt, addr) = serve(
        Runtime::builder()
            .agent::<common::Counter>()
            .max_message_size(64 * 1024),
    )
    .await;
    let mut ws = common::ws_connect(addr, "/agents/counter/big", Some("agents.v1.json"))
        .await
        .unwrap();
    common::next_json(&mut ws).await; // identity
                                      // A masked binary frame that says it carries 12 MiB, and the first kilobyte of it.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(12u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[0; 1024]);
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.get_mut() else {
        unreachable!("plain TCP")
    };
    tcp.write_all(&frame).await.unwrap();
    match common::next_frame(&mut ws).await {
        Message::Close(Some(close)) => assert_eq!(close.code, CloseCode::Size, "{close:?}"),
        other => panic!("expected a 1009 close, got {other:?}"),
    }
}

/// Answers a text message `n` with `n` frames, in one event.
#[derive(Default)]
pub struct Burst;

impl Agent for Burst {
    async fn on_message(
        &mut self,
        _ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        message: WsMessage,
    ) -> Result<(), AppError> {
        let n: u32 = message.as_text().unwrap_or("0").parse()?;
        for i in 0..n {
            conn.send_raw(WsMessage::Text(i.to_string()));
        }
        Ok(())
    }
}

#[agent]
impl Burst {}

/// Finding 4: one event that sends far more frames than the outbound queue holds reaches a
/// client that reads as fast as it can, whole and in order; it is not closed as a slow reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_frames_reaches_a_client_that_reads() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (_rt, addr) = serve(Runtime::builder().agent::<Burst>()).await;
    let mut ws = common::ws_connect(addr, "/agents/burst/b", None)
        .await
        .unwrap();
    // 5,000 frames in one event, with the default queue of 1,024.
    ws.send(Message::Text("5000".into())).await.unwrap();
    for i in 0..5000 {
        match common::next_frame(&mut ws).await {
            Message::Text(t) => assert_eq!(t.as_str(), i.to_string()),
            other => panic!("frame {i}: expected text, got {other:?}"),
        }
    }
    ws.send(Message::Text("1".into())).await.unwrap();
    assert_eq!(common::next_frame(&mut ws).await, Message::Text("0".into()));
}

/// Pays out what its schedule says; nobody else may make it pay.
#[derive(Default)]
pub struct Payroll;
impl Agent for Payroll {}

#[agent]
impl Payroll {
    /// Queues a payout: the one way to reach `payout`.
    #[callable]
    pub async fn approve(&mut self, ctx: &mut Ctx<Self>, cents: u64) -> Result<(), AppError> {
        ctx.enqueue(Self::calls().payout(cents))?;
        Ok(())
    }

    /// Hands `cents` to spawned work, whose result comes back to `payout` too.
    #[callable]
    pub async fn approve_later(&mut self, ctx: &mut Ctx<Self>, cents: u64) {
        ctx.spawn(async move { cents }, |cents| Self::calls().payout(cents));
    }

    #[callable(private)]
    pub async fn payout(&mut self, ctx: &mut Ctx<Self>, cents: u64) -> Result<(), AppError> {
        let paid = ctx.kv().get::<u64>("paid")?.unwrap_or(0);
        ctx.kv().put("paid", &(paid + cents))?;
        Ok(())
    }

    #[callable]
    pub async fn paid(&mut self, ctx: &mut Ctx<Self>) -> Result<u64, AppError> {
        Ok(ctx.kv().get::<u64>("paid")?.unwrap_or(0))
    }
}

/// Finding 7: a `#[callable(private)]` method runs for the agent's own schedules, queue and
/// spawned work, and does not exist for anyone else (HTTP, WebSockets; the typed client has no
/// such method, `tests/ui/fail/private_not_on_client.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_callable_answers_only_the_agent_itself() {
    use std::time::Duration;
    let (rt, addr) = serve(Runtime::builder().agent::<Payroll>()).await;
    let (status, body) =
        http_request(addr, "POST", "/agents/payroll/p/call/payout", "[1000000]").await;
    assert_eq!(
        (status, body["kind"].as_str()),
        (404, Some("unknown_method")),
        "{body}"
    );
    let mut ws = common::ws_connect(addr, "/agents/payroll/p", Some("agents.v1.json"))
        .await
        .unwrap();
    common::next_json(&mut ws).await; // identity
    let reply = common::call(&mut ws, 1, "payout", serde_json::json!([1000000])).await;
    assert_eq!(reply["err"]["kind"], "unknown_method", "{reply}");
    let described = http_request(addr, "GET", "/agents/payroll", "").await.1;
    assert!(!described.to_string().contains("payout"), "{described}");

    let payroll = rt.agent::<Payroll>("p");
    payroll.approve(5).await.unwrap();
    payroll.approve_later(7).await.unwrap();
    let mut paid = 0;
    for _ in 0..500 {
        paid = payroll.paid().await.unwrap();
        if paid == 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        paid, 12,
        "the queue and the spawned work reached it; nobody else did"
    );
}

/// Finding 6: requests that all fail (an unknown method, bad arguments, a 404 of `on_request`)
/// to new names leave no database behind; the first call that succeeds keeps one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_fail_leave_no_database_behind() {
    use std::time::Duration;
    let (rt, addr) = serve(Runtime::builder().agent::<Leaky>()).await;
    let dir = rt.runtime().data_dir().to_owned();
    for i in 0..20 {
        let (status, _) = http_request(
            addr,
            "POST",
            &format!("/agents/leaky/junk-a{i}/call/nope"),
            "[]",
        )
        .await;
        assert_eq!(status, 404);
        let (status, _) = http_request(
            addr,
            "POST",
            &format!("/agents/leaky/junk-b{i}/call/ping"),
            "[1, 2]",
        )
        .await;
        assert_eq!(status, 400);
        let (status, _) =
            http_request(addr, "GET", &format!("/agents/leaky/junk-c{i}/x"), "").await;
        assert_eq!(status, 404);
    }
    // Their replies leave before their files go: wait for the last ones.
    let mut left = common::agent_databases(&dir);
    for _ in 0..200 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        left = common::agent_databases(&dir);
    }
    assert!(
        left.is_empty(),
        "60 failed requests left {} databases: {left:?}",
        left.len()
    );
    // A name that failed once and then succeeds is an agent like any other.
    let (status, _) = http_request(addr, "POST", "/agents/leaky/junk-a0/call/ping", "[]").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        common::agent_databases(&dir).len(),
        1,
        "the agent that answered keeps its database"
    );
    let (status, _) = http_request(addr, "POST", "/agents/leaky/junk-a0/call/nope", "[]").await;
    assert_eq!(status, 404);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        common::agent_databases(&dir).len(),
        1,
        "a used agent is never removed for a failure"
    );
}
