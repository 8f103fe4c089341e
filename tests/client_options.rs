//! The typed network client: what `on_connect` sends reaches the first `events()`, headers for
//! admission, the JSON codec for types postcard cannot carry, a refused handshake says why.

mod common;

use std::time::Duration;

use agents::{prelude::*, Codec, ConnectError, ConnectOptions};
use serde::{Deserialize, Serialize};

/// A JS-shaped event: internally tagged, which postcard cannot carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Note {
    Welcome { who: String },
    Echo { value: serde_json::Value },
}

#[derive(Default)]
pub struct Desk;

impl Agent for Desk {
    async fn on_before_connect(_name: &str, req: &RequestHead) -> Admission {
        match req
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some("Bearer s3cret") => Ok(Some("ann".into())),
            Some("Bearer old") => Err(agents::refuse(4403, "your token expired")),
            _ => Err(agents::axum::response::IntoResponse::into_response((
                agents::axum::http::StatusCode::UNAUTHORIZED,
                "who are you?",
            ))),
        }
    }

    async fn on_before_request(_name: &str, req: &RequestHead) -> Admission {
        match req.headers.get("x-flood") {
            Some(_) => {
                let mut slow_down = agents::refuse(4429, "slow down");
                slow_down.headers_mut().insert(
                    "retry-after",
                    agents::axum::http::HeaderValue::from_static("7"),
                );
                Err(slow_down)
            }
            None => Ok(None),
        }
    }

    async fn on_connect(
        &mut self,
        _ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
    ) -> Result<(), AppError> {
        let who = conn.principal().unwrap_or("?").to_owned();
        conn.send(&Note::Welcome { who })?;
        Ok(())
    }
}

#[agent(event = "Note")]
impl Desk {
    /// Echoes any JSON back, as a reply and as an event to every connection.
    #[callable]
    pub async fn echo(
        &mut self,
        ctx: &mut Ctx<Self>,
        value: serde_json::Value,
    ) -> Result<serde_json::Value, AppError> {
        ctx.broadcast(
            &Note::Echo {
                value: value.clone(),
            },
            &[],
        )?;
        Ok(value)
    }

    #[callable]
    pub async fn nap(&mut self, _ctx: &mut Ctx<Self>, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

async fn serve() -> (agents::testing::TestRuntime, String) {
    let (rt, addr) = common::serve(Runtime::builder().agent::<Desk>()).await;
    (rt, format!("ws://{addr}/agents/desk"))
}

fn options() -> ConnectOptions {
    ConnectOptions::new().bearer("s3cret")
}

async fn next_event(events: &mut agents::client::EventStream<Note>) -> Note {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event in time")
        .expect("the stream is open")
        .expect("the event decodes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_on_connect_sends_reaches_the_first_subscriber() {
    let (_rt, base) = serve().await;
    let json = options().codec(Codec::Json);
    let desk = DeskClient::connect_with(&format!("{base}/front"), json)
        .await
        .unwrap();
    // Subscribe well after on_connect ran and sent its event.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut events = desk.events();
    assert_eq!(
        next_event(&mut events).await,
        Note::Welcome { who: "ann".into() }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_codec_carries_self_describing_types() {
    let (_rt, base) = serve().await;
    let value = serde_json::json!({"any": ["json", 1, null]});
    let json = options().codec(Codec::Json);
    let desk = DeskClient::connect_with(&format!("{base}/json"), json)
        .await
        .unwrap();
    let mut events = desk.events();
    assert_eq!(desk.echo(value.clone()).await.unwrap(), value);
    assert_eq!(
        next_event(&mut events).await,
        Note::Welcome { who: "ann".into() }
    );
    assert_eq!(
        next_event(&mut events).await,
        Note::Echo {
            value: value.clone()
        }
    );

    // Postcard cannot carry them, and says what to do instead.
    let desk = DeskClient::connect_with(&format!("{base}/json"), options())
        .await
        .unwrap();
    let e = desk.echo(value).await.unwrap_err();
    assert!(
        matches!(&e, RpcError::BadArgs(m) if m.contains("Codec::Json")),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_carries_the_status_and_the_body_but_not_the_token() {
    let (_rt, base) = serve().await;
    let url = format!("{base}/locked?token=hunter2");
    let e = DeskClient::connect(&url).await.unwrap_err();
    match &e {
        ConnectError::Refused { status, body, .. } => {
            assert_eq!((*status, body.as_str()), (401, "who are you?"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!e.to_string().contains("hunter2"), "{e}");
    // Refused with `agents::refuse`: the socket is accepted and closed with a code a browser
    // can read; the typed client reports it the same way.
    let old = ConnectOptions::new().bearer("old");
    let e = DeskClient::connect_with(&format!("{base}/locked"), old)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ConnectError::Refused { status: 4403, body, .. } if body == "your token expired"),
        "{e:?}"
    );
    // A wrong class is refused by the router itself.
    let e = DeskClient::connect(&base.replace("/desk", "/nope/x"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ConnectError::Refused { status: 404, .. }),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_option_applies_to_every_call() {
    let (_rt, base) = serve().await;
    let quick = options().timeout(Duration::from_millis(50));
    let desk = DeskClient::connect_with(&format!("{base}/slow"), quick)
        .await
        .unwrap();
    assert_eq!(desk.nap(1_000).await.unwrap_err(), RpcError::Timeout);
    assert_eq!(
        desk.clone()
            .with_timeout(Duration::from_secs(5))
            .nap(1)
            .await,
        Ok(())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_answers_http_with_the_matching_status() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_rt, addr) = common::serve(Runtime::builder().agent::<Desk>()).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = "POST /agents/desk/d/call/nap HTTP/1.1\r\nHost: x\r\nx-flood: 1\r\nContent-Type: application/json\r\nContent-Length: 3\r\nConnection: close\r\n\r\n[1]";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 429"), "{response}");
    assert!(
        response.to_lowercase().contains("retry-after: 7"),
        "{response}"
    );
    assert!(response.ends_with("slow down"), "{response}");
}
