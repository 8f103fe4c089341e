//! The JavaScript client (`agents/js/agents.js`, served at `/agents.js`) against a real server,
//! with Node's own test runner (`agents/js/test/*.test.mjs`): no npm packages.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use agents::{
    axum::{extract::Query, routing::post},
    prelude::*,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Topic {
    topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Said {
    said: String,
}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum EchoError {
    #[error("refused: {0}")]
    Refused(String),
}

#[derive(Default)]
pub struct JsEcho;

impl Agent for JsEcho {
    /// `?token=ok` or a 4401 close that a browser can read.
    async fn on_before_connect(_name: &str, req: &RequestHead) -> Admission {
        let query = Query::<HashMap<String, String>>::try_from_uri(&req.uri);
        match query
            .ok()
            .and_then(|q| q.0.get("token").cloned())
            .as_deref()
        {
            Some("ok") => Ok(None),
            _ => Err(agents::refuse(4401, "who are you?")),
        }
    }

    /// `greeted` says welcome to each connection.
    async fn on_connect(&mut self, ctx: &mut Ctx<Self>, conn: &Conn<Self>) -> Result<(), AppError> {
        if ctx.name() == "greeted" {
            conn.send(&Said {
                said: "welcome".into(),
            })?;
        }
        Ok(())
    }

    async fn on_message(
        &mut self,
        _ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        msg: WsMessage,
    ) -> Result<(), AppError> {
        let text = msg.as_text().unwrap_or_default();
        if text == "fail" {
            return Err(AppError::msg("refused to echo"));
        }
        conn.send(&Said { said: text.into() })?;
        Ok(())
    }
}

#[agent(class = "js-echo", state = "Topic", event = "Said")]
impl JsEcho {
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, AppError> {
        let n = ctx.kv().get::<i64>("n")?.unwrap_or(0) + by;
        ctx.kv().put("n", &n)?;
        Ok(n)
    }

    #[callable]
    pub async fn fail(&mut self, _ctx: &mut Ctx<Self>, why: String) -> Result<(), EchoError> {
        Err(EchoError::Refused(why))
    }

    #[callable]
    pub async fn shout(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<(), AppError> {
        Ok(ctx.broadcast(&Said { said: text }, &[])?)
    }

    #[callable]
    pub async fn set_topic(&mut self, ctx: &mut Ctx<Self>, topic: String) -> Result<(), AppError> {
        Ok(ctx.set_state(&Topic { topic })?)
    }

    /// 0, 1, .. n-1, as fast as the reader takes them.
    #[callable]
    pub async fn count(&mut self, _ctx: &mut Ctx<Self>, n: u64) -> Streaming<u64> {
        let (tx, stream) = Streaming::channel(8);
        tokio::spawn(async move {
            for i in 0..n {
                if tx.send(i).await.is_err() {
                    return;
                }
            }
        });
        stream
    }

    #[callable]
    pub async fn sleep(&mut self, _ctx: &mut Ctx<Self>, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// A listener on `port` (0: any), reusable at once after the previous one on it closed.
fn listen(port: u16) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(([127, 0, 0, 1], port).into()).unwrap();
    socket.listen(1024).unwrap()
}

/// Serves the runtime on `listener`, and again on the same port after each
/// `POST /test/restart` (which shuts the runtime down: its sockets close with 1001).
async fn serve_with_restarts(dir: std::path::PathBuf, mut listener: tokio::net::TcpListener) {
    let port = listener.local_addr().unwrap().port();
    loop {
        let runtime = Runtime::builder()
            .data_dir(&dir)
            .agent::<JsEcho>()
            .build()
            .unwrap();
        let (restart, restarted) = oneshot::channel::<()>();
        let restart = Arc::new(Mutex::new(Some(restart)));
        let app = agents::router(runtime.clone()).route(
            "/test/restart",
            post(move || async move {
                let restart = restart.lock().unwrap().take();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    restart.map(|r| r.send(()));
                });
                "restarting"
            }),
        );
        tokio::select! {
            _ = agents::axum::serve(listener, app) => return,
            _ = restarted => {}
        }
        runtime.shutdown().await;
        listener = listen(port);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_client_passes_its_node_tests() {
    let dir = tempfile::tempdir().unwrap();
    let listener = listen(0);
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_with_restarts(dir.path().to_owned(), listener));
    let tests = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/agents/js/test/client.test.mjs"
    );
    let node = tokio::process::Command::new("node")
        .args(["--experimental-websocket", "--test", tests])
        .env("AGENTS_URL", format!("ws://{addr}"))
        .env("AGENTS_HTTP", format!("http://{addr}"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), node)
        .await
        .expect("the Node tests ended within 3 minutes")
        .expect("Node.js (`node`, version 20 or later) runs the JavaScript client's tests");
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    println!("{out}\n{err}");
    assert!(output.status.success(), "node --test failed:\n{out}\n{err}");
    assert!(out.contains("# fail 0"), "{out}");
}
