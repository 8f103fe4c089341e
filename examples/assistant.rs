//! A per-user assistant behind a gateway: one `Assistant` agent per user, its history in its
//! own SQLite, a reply streamed in chunks (the shape an LLM-backed agent has; the reply is
//! computed here, no model), assistants messaging each other, and a gateway with token auth and
//! a per-user rate limit kept by an internal `RateLimiter` agent.
//!
//! ```text
//! cargo run --example assistant                      # serves 127.0.0.1:8081, then:
//! curl -H 'Authorization: Bearer demo-ann' 127.0.0.1:8081/api/ann/info
//! curl -H 'Authorization: Bearer demo-ann' 127.0.0.1:8081/api/ann/message -d '{"text":"hello there"}'
//! curl -H 'Authorization: Bearer demo-ann' 127.0.0.1:8081/api/ann/history
//! cargo run --example assistant -- serve --addr 127.0.0.1:0 --data DIR   # prints `ready <url>`
//! ```
//!
//! The gateway (`/api/{user}/..`) checks the token (`demo-<user>`: a stand-in for your auth),
//! takes a token from the user's bucket (10 requests, one more every 6 s; over that: 429 with
//! `Retry-After`), and hands the request on to the user's assistant with `runtime.fetch`. The
//! agents themselves are `internal`: not reachable but through the gateway.

use std::{net::SocketAddr, time::UNIX_EPOCH};

use agents::{
    axum::{
        extract::{Path, Request, State},
        http::{header, StatusCode},
        response::{IntoResponse, Response},
        routing::any,
        Json, Router,
    },
    prelude::*,
};
use serde::{Deserialize, Serialize};

/// How many requests a user may make in a burst, and how fast the bucket refills.
pub const BURST: f64 = 10.0;
pub const REFILL_PER_SEC: f64 = 1.0 / 6.0;

/// One user's assistant.
#[derive(Default)]
pub struct Assistant;

/// One line of a user's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// `user`, `assistant`, `from:<name>` (another assistant wrote) or `to:<name>`.
    pub role: String,
    pub text: String,
    pub at_ms: u64,
}

/// What `/info` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    pub user: String,
    pub messages: u64,
}

/// What a connection receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AssistantEvent {
    /// On connect: how many messages the history holds.
    Welcome { messages: u64 },
    /// Another assistant sent a message.
    Received { from: String, text: String },
}

/// The assistant's answer to `text`: computed locally (stands in for a model).
pub fn reply_to(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let backwards: Vec<&str> = words.iter().rev().copied().collect();
    format!(
        "You said {} words. Backwards: {}",
        words.len(),
        backwards.join(" ")
    )
}

fn record(ctx: &Ctx<Assistant>, role: &str, text: &str) -> Result<(), AppError> {
    let at_ms = ctx
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    ctx.sql().execute(
        "INSERT INTO history(role, text, at_ms) VALUES (?1, ?2, ?3)",
        (role, text, at_ms),
    )?;
    Ok(())
}

fn count(ctx: &Ctx<Assistant>) -> Result<u64, AppError> {
    Ok(ctx
        .sql()
        .query_row("SELECT count(*) FROM history", [], |r| r.get::<_, i64>(0))? as u64)
}

/// Records `text` from the user and the reply; returns the reply.
fn converse(ctx: &Ctx<Assistant>, text: &str) -> Result<String, AppError> {
    if text.trim().is_empty() {
        return Err(AppError::msg("say something"));
    }
    let reply = reply_to(text);
    record(ctx, "user", text)?;
    record(ctx, "assistant", &reply)?;
    Ok(reply)
}

impl Agent for Assistant {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&["CREATE TABLE history(
            id INTEGER PRIMARY KEY, role TEXT NOT NULL, text TEXT NOT NULL, at_ms INTEGER NOT NULL)"])?;
        Ok(())
    }

    async fn on_connect(&mut self, ctx: &mut Ctx<Self>, conn: &Conn<Self>) -> Result<(), AppError> {
        conn.send(&AssistantEvent::Welcome {
            messages: count(ctx)?,
        })?;
        Ok(())
    }

    /// `GET /info`, `GET /history`, `POST /message` with `{"text": ".."}`.
    async fn on_request(
        &mut self,
        ctx: &mut Ctx<Self>,
        request: HttpRequest,
    ) -> Result<HttpResponse, AppError> {
        let path = request.uri().path().trim_end_matches('/');
        let route = path.rsplit('/').next().unwrap_or_default();
        Ok(match (request.method().as_str(), route) {
            ("GET", "info") => Json(info(ctx)?).into_response(),
            ("GET", "history") => Json(history(ctx)?).into_response(),
            ("POST", "message") => {
                #[derive(Deserialize)]
                struct Said {
                    text: String,
                }
                let Ok(said) = serde_json::from_slice::<Said>(request.body()) else {
                    let hint = r#"send {"text": ".."}"#;
                    return Ok((StatusCode::BAD_REQUEST, hint).into_response());
                };
                let reply = converse(ctx, &said.text)?;
                Json(serde_json::json!({ "reply": reply })).into_response()
            }
            _ => (StatusCode::NOT_FOUND, "try /info, /history or /message").into_response(),
        })
    }
}

fn info(ctx: &Ctx<Assistant>) -> Result<Info, AppError> {
    Ok(Info {
        user: ctx.name().to_owned(),
        messages: count(ctx)?,
    })
}

fn history(ctx: &Ctx<Assistant>) -> Result<Vec<Entry>, AppError> {
    let mut stmt = ctx
        .sql()
        .prepare("SELECT role, text, at_ms FROM history ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok(Entry {
            role: r.get(0)?,
            text: r.get(1)?,
            at_ms: r.get::<_, i64>(2)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[agent(internal, event = "AssistantEvent")]
impl Assistant {
    /// Answers `text` at once.
    #[callable]
    pub async fn message(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<String, AppError> {
        converse(ctx, &text)
    }

    /// Answers `text` word by word, as a model streams its tokens. The exchange is stored
    /// before the first chunk leaves.
    #[callable]
    pub async fn ask(
        &mut self,
        ctx: &mut Ctx<Self>,
        text: String,
    ) -> Result<Streaming<String, AppError>, AppError> {
        let reply = converse(ctx, &text)?;
        let (tx, stream) = Streaming::channel(4);
        tokio::spawn(async move {
            for word in reply.split(' ') {
                if tx.send(format!("{word} ")).await.is_err() {
                    return; // the caller went away
                }
            }
        });
        Ok(stream)
    }

    #[callable]
    pub async fn history(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<Entry>, AppError> {
        history(ctx)
    }

    #[callable]
    pub async fn info(&mut self, ctx: &mut Ctx<Self>) -> Result<Info, AppError> {
        info(ctx)
    }

    /// Sends `text` to `to`'s assistant (a typed call to another agent): both histories keep it.
    #[callable]
    pub async fn tell(
        &mut self,
        ctx: &mut Ctx<Self>,
        to: String,
        text: String,
    ) -> Result<(), AppError> {
        record(ctx, &format!("to:{to}"), &text)?;
        let from = ctx.name().to_owned();
        ctx.agent::<Assistant>(&to).receive(from, text).await?;
        Ok(())
    }

    /// A message from another assistant.
    #[callable(internal)]
    pub async fn receive(
        &mut self,
        ctx: &mut Ctx<Self>,
        from: String,
        text: String,
    ) -> Result<(), AppError> {
        record(ctx, &format!("from:{from}"), &text)?;
        ctx.broadcast(&AssistantEvent::Received { from, text }, &[])?;
        Ok(())
    }
}

/// A token bucket per user, atomic because the agent is the only writer of its bucket.
#[derive(Default)]
pub struct RateLimiter;
impl Agent for RateLimiter {}

#[agent(internal)]
impl RateLimiter {
    /// Takes a token: `None` if there was one, else how many seconds until there is.
    #[callable]
    pub async fn take(&mut self, ctx: &mut Ctx<Self>) -> Result<Option<u64>, AppError> {
        let now = ctx
            .now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let (tokens, at): (f64, f64) = ctx.kv().get("bucket")?.unwrap_or((BURST, now));
        let tokens = (tokens + (now - at) * REFILL_PER_SEC).min(BURST);
        if tokens < 1.0 {
            ctx.kv().put("bucket", &(tokens, now))?;
            return Ok(Some(((1.0 - tokens) / REFILL_PER_SEC).ceil() as u64));
        }
        ctx.kv().put("bucket", &(tokens - 1.0, now))?;
        Ok(None)
    }
}

/// The token of `user` in this demo (use your own authentication).
fn valid_token(user: &str, token: &str) -> bool {
    token.strip_prefix("demo-") == Some(user)
}

/// `/api/{user}/{*rest}` → the assistant `user`, at `/{rest}`, after auth and rate limiting.
async fn gateway(
    State(runtime): State<Runtime>,
    Path((user, rest)): Path<(String, String)>,
    request: Request,
) -> Response {
    forward(runtime, user, format!("/{rest}"), request).await
}

/// `/api/{user}`: the assistant's root (WebSockets).
async fn gateway_root(
    State(runtime): State<Runtime>,
    Path(user): Path<String>,
    request: Request,
) -> Response {
    forward(runtime, user, "/".into(), request).await
}

async fn forward(runtime: Runtime, user: String, path: String, mut request: Request) -> Response {
    // Browsers cannot set headers on a WebSocket: `?token=` works too.
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let query = request.uri().query().unwrap_or_default();
    let token = bearer.or_else(|| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix("token=").map(str::to_owned))
    });
    // Refusals a browser can read, also on a WebSocket (a close code, not an HTTP status).
    if !token.is_some_and(|t| valid_token(&user, &t)) {
        let refusal = agents::refuse(4401, "a valid token is needed");
        return runtime.refuse(request, refusal).await;
    }
    match runtime.agent::<RateLimiter>(&user).take().await {
        Ok(None) => {}
        Ok(Some(retry)) => {
            let mut slow_down = agents::refuse(4429, "too many requests");
            slow_down
                .headers_mut()
                .insert(header::RETRY_AFTER, retry.into());
            return runtime.refuse(request, slow_down).await;
        }
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
    *request.uri_mut() = match path.parse() {
        Ok(uri) => uri,
        Err(_) => return (StatusCode::BAD_REQUEST, "bad path").into_response(),
    };
    runtime.fetch::<Assistant>(&user, request).await
}

/// The gateway's routes (mount them beside your own).
pub fn app(runtime: Runtime) -> Router {
    Router::new()
        .route("/api/{user}", any(gateway_root))
        .route("/api/{user}/{*rest}", any(gateway))
        .with_state(runtime)
}

/// The runtime of this example on `data`.
pub fn runtime(data: &str) -> Result<Runtime, agents::Error> {
    Runtime::builder()
        .data_dir(data)
        .agent::<Assistant>()
        .agent::<RateLimiter>()
        .build()
}

async fn serve(addr: SocketAddr, data: &str) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let url = format!("http://{}", listener.local_addr()?);
    println!("ready {url}");
    println!("try: curl -H 'Authorization: Bearer demo-ann' {url}/api/ann/message -d '{{\"text\":\"hello there\"}}'");
    agents::axum::serve(listener, app(runtime(data)?)).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let addr = flag("--addr").unwrap_or_else(|| "127.0.0.1:8081".into());
    let data = flag("--data").unwrap_or_else(|| "./data/assistant".into());
    serve(addr.parse()?, &data).await
}
