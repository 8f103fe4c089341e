//! [`WsTransport`]: calls over a WebSocket with the `agents.v1.postcard` subprotocol.
//!
//! One socket carries any number of concurrent calls, matched to replies by id. Each call has a
//! timeout; dropping a call's future (or its timeout passing) sends `cancel`, so a call that has
//! not run yet never runs. When the connection drops, the calls in flight fail with an
//! `internal` error saying so: they are never silently re-sent.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

use crate::{
    protocol::{to_postcard, PostcardClientFrame, PostcardServerFrame, POSTCARD_PROTOCOL},
    transport::{BoxFuture, OutgoingCall, Transport},
    ErrorKind, Payload, RawError,
};

/// The timeout of calls that set none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not a WebSocket URL.
    #[error("invalid URL `{0}`")]
    Url(String),
    /// The handshake failed (refused address, unknown class, invalid name, network).
    #[error("could not connect to {url}: {reason}")]
    Handshake {
        /// Where.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server does not speak the postcard protocol, or did not identify itself.
    #[error("{0}")]
    Protocol(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Payload, RawError>>>>>;

/// A connection to one agent (`ws://host/agents/{class}/{name}`).
pub struct WsTransport {
    url: String,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    /// Set (before the pending calls are failed) once the connection is gone.
    closed: Arc<AtomicBool>,
    next_id: AtomicU64,
    /// `class`, `name` and connection id, as the server announced them.
    identity: (String, String, String),
}

impl WsTransport {
    /// Connects and waits for the server's identity frame.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let mut request = url
            .into_client_request()
            .map_err(|_| ConnectError::Url(url.to_owned()))?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            POSTCARD_PROTOCOL.parse().expect("a valid header value"),
        );
        let (socket, response) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| ConnectError::Handshake {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        let chosen = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok());
        if chosen != Some(POSTCARD_PROTOCOL) {
            return Err(ConnectError::Protocol(format!(
                "{url} does not speak {POSTCARD_PROTOCOL}"
            )));
        }
        let (mut sink, mut stream) = socket.split();
        let identity = match stream.next().await {
            Some(Ok(Message::Binary(bytes))) => match postcard::from_bytes(&bytes) {
                Ok(PostcardServerFrame::Identity { class, name, conn }) => (class, name, conn),
                _ => {
                    return Err(ConnectError::Protocol(format!(
                        "{url} did not identify itself"
                    )))
                }
            },
            _ => {
                return Err(ConnectError::Protocol(format!(
                    "{url} closed before identifying itself"
                )))
            }
        };
        let (out, mut outbound) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(message) = outbound.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let pending: Pending = Arc::default();
        let replies = pending.clone();
        let closed = Arc::new(AtomicBool::new(false));
        let gone = closed.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Binary(bytes) = message else {
                    continue;
                };
                match postcard::from_bytes::<PostcardServerFrame>(&bytes) {
                    Ok(PostcardServerFrame::Reply { id, result }) => {
                        let waiter = replies
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                        if let Some(waiter) = waiter {
                            let _ =
                                waiter.send(result.map(Payload::Postcard).map_err(RawError::from));
                        }
                    }
                    Ok(PostcardServerFrame::Error { message }) => {
                        tracing::warn!("the server could not read a frame: {message}")
                    }
                    _ => {}
                }
            }
            // The connection is gone: new calls fail at once, and every call still waiting
            // learns it now.
            gone.store(true, Ordering::SeqCst);
            for (_, waiter) in replies.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                let _ = waiter.send(Err(disconnected()));
            }
        });
        Ok(WsTransport {
            url: url.to_owned(),
            out,
            pending,
            closed,
            next_id: AtomicU64::new(1),
            identity,
        })
    }

    /// The agent's class, its name and this connection's id, as the server announced them.
    pub fn identity(&self) -> (&str, &str, &str) {
        (&self.identity.0, &self.identity.1, &self.identity.2)
    }
}

fn disconnected() -> RawError {
    RawError::internal(
        "the connection closed before the reply arrived; the call may or may not have run",
    )
}

fn closed() -> RawError {
    RawError::internal("the connection closed; the call was not sent (connect again)")
}

/// Sends `cancel` for a call whose future is dropped (or timed out) while it still waits for
/// its reply (an answered or disconnected call is no longer pending).
struct CancelOnDrop {
    id: u64,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id)
            .is_some()
        {
            let _ = self.out.send(Message::Binary(
                to_postcard(&PostcardClientFrame::Cancel { id: self.id }).into(),
            ));
        }
    }
}

impl Transport for WsTransport {
    fn call(&self, call: OutgoingCall) -> BoxFuture<'static, Result<Payload, RawError>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let timeout = call.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let args = match call.args {
            Payload::Postcard(bytes) => Ok(bytes),
            Payload::Json(_) => Err(RawError::bad_args(
                "this transport sends postcard arguments",
            )),
        };
        let guard = CancelOnDrop {
            id,
            out: self.out.clone(),
            pending: self.pending.clone(),
        };
        let frame = args.map(|args| PostcardClientFrame::Call {
            id,
            method: call.method.into_owned(),
            args,
            deadline_ms: Some(timeout.as_millis() as u64),
        });
        // Checked after registering: the reader sets `closed` before it fails what is pending,
        // so a call either sees the flag or is failed by the reader.
        let frame = frame.and_then(|frame| {
            if self.closed.load(Ordering::SeqCst) {
                Err(closed())
            } else {
                Ok(frame)
            }
        });
        let sent = frame.and_then(|frame| {
            self.out
                .send(Message::Binary(to_postcard(&frame).into()))
                .map_err(|_| disconnected())
        });
        Box::pin(async move {
            if let Err(e) = sent {
                guard
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                return Err(e);
            }
            let _cancel_if_dropped = guard;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(disconnected()),
                Err(_) => Err(RawError::new(
                    ErrorKind::Timeout,
                    format!("no reply within {timeout:?}"),
                )),
            }
        })
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

impl Drop for WsTransport {
    fn drop(&mut self) {
        let _ = self.out.send(Message::Close(None));
    }
}
