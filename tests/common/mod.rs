//! Agents shared by the integration tests.
#![allow(dead_code)]

use std::time::Duration;

use agents::prelude::*;
use serde::{Deserialize, Serialize};

/// A counter in SQLite plus an in-memory field (`starts`) that hibernation resets.
#[derive(Default)]
pub struct Counter {
    pub starts: u32,
    pub memory: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum CounterError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("storage: {0}")]
    Storage(String),
}

impl Agent for Counter {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        self.starts += 1;
        ctx.migrate(&[
            "CREATE TABLE counter(id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL)",
        ])?;
        Ok(())
    }
}

fn add(ctx: &Ctx<Counter>, by: i64) -> Result<i64, AppError> {
    Ok(ctx.sql().query_row(
        "INSERT INTO counter(id, n) VALUES (0, ?1) ON CONFLICT(id) DO UPDATE SET n = n + excluded.n RETURNING n",
        [by],
        |r| r.get(0),
    )?)
}

#[agent]
impl Counter {
    /// Adds `by`; returns the new total.
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, AppError> {
        add(ctx, by)
    }

    #[callable]
    pub async fn get(&mut self, ctx: &mut Ctx<Self>) -> i64 {
        ctx.sql()
            .query_row("SELECT coalesce((SELECT n FROM counter), 0)", [], |r| {
                r.get(0)
            })
            .unwrap_or(-1)
    }

    /// Writes, then refuses: the write must vanish.
    #[callable]
    pub async fn add_then_fail(
        &mut self,
        ctx: &mut Ctx<Self>,
        by: i64,
    ) -> Result<i64, CounterError> {
        add(ctx, by).map_err(|e| CounterError::Storage(e.to_string()))?;
        ctx.kv()
            .put("failed-write", &true)
            .map_err(|e| CounterError::Storage(e.to_string()))?;
        Err(CounterError::Refused(format!("not adding {by}")))
    }

    /// Writes, then panics: the write must vanish and the agent be re-created.
    #[callable]
    pub async fn add_then_panic(&mut self, ctx: &mut Ctx<Self>, by: i64) -> i64 {
        add(ctx, by).unwrap();
        panic!("boom after adding {by}");
    }

    /// Read-modify-write of an in-memory field across an await: atomic because handlers never
    /// interleave.
    #[callable]
    pub async fn bump_memory_slowly(&mut self, _ctx: &mut Ctx<Self>) -> i64 {
        let seen = self.memory;
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_micros(50)).await;
        self.memory = seen + 1;
        self.memory
    }

    #[callable]
    pub async fn starts(&mut self, _ctx: &mut Ctx<Self>) -> u32 {
        self.starts
    }

    #[callable]
    pub async fn whoami(&mut self, ctx: &mut Ctx<Self>) -> (String, String, String) {
        (
            ctx.class().to_owned(),
            ctx.name().to_owned(),
            ctx.id().to_owned(),
        )
    }

    /// A large reply: `len` bytes of text.
    #[callable]
    pub async fn blob(&mut self, _ctx: &mut Ctx<Self>, len: u32) -> String {
        "x".repeat(len as usize)
    }

    #[callable]
    pub async fn sleep_ms(&mut self, _ctx: &mut Ctx<Self>, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Builds the example `name` (a no-op when it is up to date) and returns its path.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the {name} example failed");
    // target/<profile>/deps/<this test> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

/// A running example server (`<example> serve DIR`): the child, its stdin, its stdout lines.
pub type Server = (tokio::process::Child, tokio::process::ChildStdin, Lines);

/// The lines a running example server writes.
pub type Lines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// Starts `exe serve dir [extra..]` and waits for its `ready` line.
pub async fn start_server(exe: &std::path::Path, dir: &std::path::Path, extra: &[&str]) -> Server {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(exe)
        .arg("serve")
        .arg(dir)
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", exe.display()));
    let stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"));
    (child, stdin, lines)
}

/// A client WebSocket, as the tests open them.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `path` on `addr`, asking for `protocol` if given.
pub async fn ws_connect(
    addr: std::net::SocketAddr,
    path: &str,
    protocol: Option<&str>,
) -> Result<Socket, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    if let Some(p) = protocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
        .map_err(|e| e.to_string())
}

/// A test runtime built from `builder`, serving HTTP and WebSockets on an ephemeral port of
/// 127.0.0.1.
pub async fn serve(
    builder: agents::Builder,
) -> (agents::testing::TestRuntime, std::net::SocketAddr) {
    let rt = agents::testing::TestRuntime::start(builder).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let runtime = rt.runtime().clone();
    tokio::spawn(async move { runtime.serve_on(listener).await });
    (rt, addr)
}

/// The next data or close frame (pings and pongs skipped), within 20 s.
pub async fn next_frame(ws: &mut Socket) -> tokio_tungstenite::tungstenite::Message {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return m,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

/// The close frame that ends `ws` (the frames before it skipped), within 10 s each.
pub async fn next_close(
    ws: &mut Socket,
) -> Option<tokio_tungstenite::tungstenite::protocol::CloseFrame> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// The next frame, which must be a JSON text frame.
pub async fn next_json(ws: &mut Socket) -> serde_json::Value {
    match next_frame(ws).await {
        tokio_tungstenite::tungstenite::Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Sends `frame` as a JSON text frame.
pub async fn send_json(ws: &mut Socket, frame: serde_json::Value) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        frame.to_string().into(),
    ))
    .await
    .unwrap();
}

/// One HTTP/1.1 request; returns the status and the body parsed as JSON (or as a string).
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    http_request_with(addr, method, path, &[], body).await
}

/// [`http_request`] with the header lines `headers` (`Name: value`) besides.
pub async fn http_request_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let more: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{more}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_owned())),
    )
}

/// Sends a call frame of `agents.v1.json` and returns its reply (other frames are skipped).
pub async fn call(
    ws: &mut Socket,
    id: u64,
    method: &str,
    args: serde_json::Value,
) -> serde_json::Value {
    send_json(
        ws,
        serde_json::json!({"type": "call", "id": id, "method": method, "args": args}),
    )
    .await;
    loop {
        let frame = next_json(ws).await;
        if frame["type"] == "reply" && frame["id"] == id {
            return frame;
        }
    }
}

/// In a process that a test started with [`start_child`] (the variable `env` names a data dir):
/// builds `builder` on that data dir, prints `listening ADDR` and serves on a port of 127.0.0.1
/// until stdin closes or the process is killed; `before` runs first (to lower a limit, say).
/// Does nothing in any other process: call it from a `#[test]` of its own.
pub fn serve_in_child(env: &str, before: impl FnOnce(), builder: impl FnOnce() -> agents::Builder) {
    serve_in_child_at(env, before, |_| builder());
}

/// [`serve_in_child`], with a builder told the address the server will listen on.
pub fn serve_in_child_at(
    env: &str,
    before: impl FnOnce(),
    builder: impl FnOnce(std::net::SocketAddr) -> agents::Builder,
) {
    let Ok(dir) = std::env::var(env) else {
        return;
    };
    before();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime = builder(addr).data_dir(dir).build().unwrap();
        println!("listening {addr}");
        tokio::spawn(async move { runtime.serve_on(listener).await });
        let mut line = String::new();
        let _ = tokio::io::AsyncBufReadExt::read_line(
            &mut tokio::io::BufReader::new(tokio::io::stdin()),
            &mut line,
        )
        .await;
    });
}

/// Starts this test binary again to run only `test` (which calls [`serve_in_child`]) with `env`
/// set to `dir`: a server process of its own. Returns it, once it listens, and its address.
pub async fn start_child(
    test: &str,
    env: &str,
    dir: &std::path::Path,
) -> (tokio::process::Child, std::net::SocketAddr) {
    start_child_with(test, env, dir, &[]).await
}

/// [`start_child`], with the variables `more` set in the child's environment besides.
pub async fn start_child_with(
    test: &str,
    env: &str,
    dir: &std::path::Path,
    more: &[(&str, &std::ffi::OsStr)],
) -> (tokio::process::Child, std::net::SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .envs(more.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next_line().await.unwrap().expect("the server starts");
        // (The harness prints the test's name first, on the same line.)
        if let Some((_, addr)) = line.split_once("listening ") {
            return (child, addr.parse().unwrap());
        }
    }
}

/// The agents' database files under the data dir `dir` (the template aside).
pub fn agent_databases(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut folders = vec![dir.join("agents")];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                folders.push(path);
            } else if name.ends_with(".sqlite") && !name.starts_with('.') {
                found.push(path);
            }
        }
    }
    found
}

/// Asserts that the SQLite database at `path` passes `PRAGMA integrity_check`.
pub fn assert_whole(path: &std::path::Path) {
    let db = rusqlite::Connection::open(path).unwrap();
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok", "{}", path.display());
}
