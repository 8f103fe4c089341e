//! WebSocket connections: `GET /agents/{class}/{name}` with the `agents.v1.json` or the
//! `agents.v1.postcard` subprotocol (see `agents_client::protocol`).
//!
//! The socket is owned by the runtime, not by the agent: calls arriving on it are routed to the
//! agent like any other call (waking it if it hibernates), and replies come back in the order
//! they are ready. A call's deadline and its cancellation work as documented in the protocol;
//! a disconnect cancels the calls still in flight (those not yet run never run).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use agents_client::{protocol, ErrorKind, Payload, RawError};
use axum::{
    extract::{
        ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade},
        Path, State,
    },
    http::StatusCode,
    response::{IntoResponse, Response},
};
use futures_util::{SinkExt, StreamExt};
use tokio::{sync::mpsc, task::AbortHandle};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{address::AgentKey, runtime::Runtime};

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// The upgrade handler: checks the address before anything is woken.
pub(crate) async fn upgrade(
    State(runtime): State<Runtime>,
    Path((class, name)): Path<(String, String)>,
    ws: WebSocketUpgrade,
) -> Response {
    let key = match runtime.check_address(&class, &name) {
        Ok(key) => key,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let ws = ws
        .protocols([protocol::JSON_PROTOCOL, protocol::POSTCARD_PROTOCOL])
        .max_message_size(runtime.config().max_message_bytes);
    let wire = match ws.selected_protocol().map(|p| p.as_bytes()) {
        Some(p) if p == protocol::JSON_PROTOCOL.as_bytes() => Some(Wire::Json),
        Some(p) if p == protocol::POSTCARD_PROTOCOL.as_bytes() => Some(Wire::Postcard),
        _ => None,
    };
    ws.on_upgrade(move |socket| async move {
        match wire {
            Some(wire) => serve(runtime, key, socket, wire).await,
            None => refuse(socket).await,
        }
    })
}

/// No subprotocol: raw frames would go to `on_message`, which this runtime does not serve yet.
async fn refuse(mut socket: WebSocket) {
    let reason = format!(
        "use the subprotocol {}: raw frames (no subprotocol) are not served yet",
        protocol::JSON_PROTOCOL
    );
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: close_code::UNSUPPORTED,
            reason: reason.into(),
        })))
        .await;
}

/// The frame encoding a connection chose.
#[derive(Clone, Copy)]
enum Wire {
    /// Text frames of JSON.
    Json,
    /// Binary frames of postcard.
    Postcard,
}

/// A frame from the client, whatever its encoding.
enum Incoming {
    Call {
        id: u64,
        method: String,
        args: Payload,
        deadline_ms: Option<u64>,
    },
    Cancel {
        id: u64,
    },
    Message,
    /// A call that is refused before it is made (its id is known, so it gets a reply).
    Refused {
        id: u64,
        error: RawError,
    },
}

impl Wire {
    fn frame(
        self,
        json: String,
        postcard: impl FnOnce() -> protocol::PostcardServerFrame,
    ) -> Message {
        match self {
            Wire::Json => Message::Text(json.into()),
            Wire::Postcard => Message::Binary(protocol::to_postcard(&postcard()).into()),
        }
    }

    fn identity(self, key: &AgentKey, conn: &str) -> Message {
        let (class, name) = (key.class(), key.name());
        self.frame(protocol::identity_frame(class, name, conn), || {
            protocol::PostcardServerFrame::Identity {
                class: class.to_owned(),
                name: name.to_owned(),
                conn: conn.to_owned(),
            }
        })
    }

    fn reply(self, id: u64, result: &Result<Payload, RawError>) -> Message {
        match self {
            Wire::Json => Message::Text(protocol::reply_frame(id, result).into()),
            Wire::Postcard => Message::Binary(
                protocol::to_postcard(&protocol::PostcardServerFrame::reply(id, result)).into(),
            ),
        }
    }

    fn error(self, message: &str) -> Message {
        self.frame(protocol::error_frame(message), || {
            protocol::PostcardServerFrame::Error {
                message: message.to_owned(),
            }
        })
    }

    /// Reads one data frame.
    fn parse(self, frame: &Message) -> Result<Incoming, String> {
        match (self, frame) {
            (Wire::Json, Message::Text(text)) => {
                match protocol::ClientFrame::from_json(text.as_str())? {
                    protocol::ClientFrame::Call {
                        id,
                        method,
                        args,
                        deadline_ms,
                    } if args.is_array() => Ok(Incoming::Call {
                        id,
                        method,
                        args: Payload::Json(args),
                        deadline_ms,
                    }),
                    protocol::ClientFrame::Call { id, args, .. } => Ok(Incoming::Refused {
                        id,
                        error: RawError::bad_args(format!("`args` must be an array, not {args}")),
                    }),
                    protocol::ClientFrame::Cancel { id } => Ok(Incoming::Cancel { id }),
                    protocol::ClientFrame::Message { .. } => Ok(Incoming::Message),
                }
            }
            (Wire::Postcard, Message::Binary(bytes)) => match postcard::from_bytes(bytes) {
                Ok(protocol::PostcardClientFrame::Call {
                    id,
                    method,
                    args,
                    deadline_ms,
                }) => Ok(Incoming::Call {
                    id,
                    method,
                    args: Payload::Postcard(args),
                    deadline_ms,
                }),
                Ok(protocol::PostcardClientFrame::Cancel { id }) => Ok(Incoming::Cancel { id }),
                Err(e) => Err(format!(
                    "not a frame of {}: {e}",
                    protocol::POSTCARD_PROTOCOL
                )),
            },
            (Wire::Json, _) => {
                Err("binary frames are not part of agents.v1.json; send JSON text frames".into())
            }
            (Wire::Postcard, _) => {
                Err("text frames are not part of agents.v1.postcard; send binary frames".into())
            }
        }
    }
}

async fn serve(runtime: Runtime, key: AgentKey, socket: WebSocket, wire: Wire) {
    let conn = format!("{:016x}", NEXT_CONN.fetch_add(1, Ordering::Relaxed));
    let span =
        tracing::debug_span!("connection", class = key.class(), name = key.name(), conn = %conn);
    serve_frames(runtime, key, socket, wire, conn)
        .instrument(span)
        .await;
}

/// The sending side of one connection: a bounded queue to the writer task. A client that does
/// not read fast enough to keep it from filling is disconnected (`closed`), never waited for.
#[derive(Clone)]
struct Outbound {
    tx: mpsc::Sender<Message>,
    closed: CancellationToken,
}

impl Outbound {
    fn send(&self, frame: Message) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(frame) {
            tracing::debug!("closing a connection whose client does not read its frames");
            self.closed.cancel();
        }
    }
}

async fn serve_frames(
    runtime: Runtime,
    key: AgentKey,
    socket: WebSocket,
    wire: Wire,
    conn: String,
) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut outbound) = mpsc::channel::<Message>(runtime.config().outbound_queue);
    let closed = CancellationToken::new();
    let out = Outbound {
        tx,
        closed: closed.clone(),
    };
    let writer = tokio::spawn({
        let closed = closed.clone();
        async move {
            let write = async {
                while let Some(message) = outbound.recv().await {
                    let closing = matches!(message, Message::Close(_));
                    if sink.send(message).await.is_err() || closing {
                        break;
                    }
                }
            };
            tokio::select! {
                () = write => {}
                () = closed.cancelled() => {
                    // Say why, but do not wait on a client that does not read.
                    let reason = "the client does not read its frames fast enough";
                    let close = Message::Close(Some(CloseFrame { code: close_code::POLICY, reason: reason.into() }));
                    let _ = tokio::time::timeout(Duration::from_millis(100), sink.send(close)).await;
                }
            }
        }
    });
    let in_flight: Arc<Mutex<HashMap<u64, AbortHandle>>> = Arc::default();
    out.send(wire.identity(&key, &conn));

    loop {
        let frame = tokio::select! {
            frame = stream.next() => frame,
            () = closed.cancelled() => break,
        };
        let Some(frame) = frame else { break };
        let frame = match frame {
            Ok(Message::Close(_)) => break,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue, // answered by the socket itself
            Ok(frame) => frame,
            Err(e) => {
                if is_too_big(&e) {
                    let reason = format!(
                        "a message exceeded the limit of {} bytes",
                        runtime.config().max_message_bytes
                    );
                    out.send(Message::Close(Some(CloseFrame {
                        code: close_code::SIZE,
                        reason: reason.into(),
                    })));
                }
                break;
            }
        };
        match wire.parse(&frame) {
            Err(e) => out.send(wire.error(&e)),
            Ok(Incoming::Call {
                id,
                method,
                args,
                deadline_ms,
            }) => {
                let mut calls = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                if calls.contains_key(&id) {
                    let e = RawError::bad_args(format!("a call with id {id} is already in flight"));
                    out.send(wire.reply(id, &Err(e)));
                    continue;
                }
                let (runtime, key, out, registry) =
                    (runtime.clone(), key.clone(), out.clone(), in_flight.clone());
                let task = tokio::spawn(async move {
                    let timeout = deadline_ms.map(Duration::from_millis);
                    let result = runtime
                        .call_with_timeout(key.class(), key.name(), &method, args, timeout)
                        .await;
                    // Whoever takes the call out of the map answers it: this task, or a cancel.
                    let mine = registry
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    if mine.is_some() {
                        out.send(wire.reply(id, &result));
                    }
                });
                calls.insert(id, task.abort_handle());
            }
            Ok(Incoming::Cancel { id }) => {
                if let Some(task) = in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id)
                {
                    task.abort(); // drops the call: if it has not run, it never will
                    let e = RawError::new(
                        ErrorKind::Cancelled,
                        format!("call {id} was cancelled by the client"),
                    );
                    out.send(wire.reply(id, &Err(e)));
                }
            }
            Ok(Incoming::Refused { id, error }) => out.send(wire.reply(id, &Err(error))),
            Ok(Incoming::Message) => {
                out.send(wire.error(
                    "`message` frames reach on_message, which this runtime does not serve yet",
                ))
            }
        }
    }
    for (_, task) in in_flight.lock().unwrap_or_else(|e| e.into_inner()).drain() {
        task.abort();
    }
    drop(out);
    let _ = writer.await;
}

/// Whether a receive error is a message over the size limit.
fn is_too_big(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}
