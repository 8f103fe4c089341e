//! WebSocket connections: `GET /agents/{class}/{name}` with the `agents.v1.json` or the
//! `agents.v1.postcard` subprotocol (see `agents_client::protocol`), or none (raw frames to
//! `on_message`).
//!
//! The socket is owned by the runtime, not by the agent: it is registered in [`Sockets`] under
//! the agent's address, outlives the agent's hibernation, and its frames are routed to the agent
//! as events (waking it), in the order the client sent them; a full mailbox slows the reader
//! (and so the client) down. Calls are answered in the order they are ready, by the agent
//! straight into the socket's queue (see `inflight`); a call's deadline and its cancellation
//! work as documented in the protocol; a disconnect cancels the calls still in flight (those
//! not yet run never run). Everything the agent sends goes through a bounded queue per
//! connection: a client that does not read is disconnected, never waited for.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agents_client::{
    __private::{deadline_in, next_queued},
    protocol, ErrorKind, Payload, RawError,
};
use axum::{
    extract::{
        ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade},
        FromRequestParts, Path, Request, State,
    },
    response::Response,
};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    sync::oneshot,
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    address::AgentKey,
    agent::{Invocation, Refusal},
    conn::{close_reason, ConnId, Effect, Outgoing, Protocol, Speaks, WsMessage},
    lock::lock,
    port::Connections,
    registry::{CallEvent, Chain, Class, Event, ReplyTo},
    runtime::Runtime,
};

use super::{
    inflight::InFlight,
    outbound::{self, Outbound},
};

/// Connection ids: a per-process random-ish base (so that ids differ across restarts) plus a
/// counter.
fn next_conn_id() -> ConnId {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id())
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    ConnId::new(format!("{:016x}", base.wrapping_add(n)))
}

/// The open sockets of every agent. Each agent's sockets have a lock of their own: a broadcast
/// to a big room holds only that room's, not every agent's.
#[derive(Default)]
pub(crate) struct Sockets {
    by_agent: Mutex<HashMap<AgentKey, Arc<AgentSockets>>>,
}

type AgentSockets = Mutex<HashMap<ConnId, Socket>>;

/// One open socket: where its frames go, how to encode them, and whether `on_connect` has
/// admitted it (until then it gets only what is sent to it by id, never a broadcast).
struct Socket {
    out: Outbound,
    wire: Protocol,
    admitted: bool,
}

impl Sockets {
    /// `key`'s sockets, if it has any.
    fn of(&self, key: &AgentKey) -> Option<Arc<AgentSockets>> {
        lock(&self.by_agent).get(key).cloned()
    }

    // Adding and removing hold the outer lock too, so that an agent's map is never dropped
    // from it while a socket is being added to that map.
    fn add(&self, key: &AgentKey, id: ConnId, out: Outbound, wire: Protocol) {
        let mut all = lock(&self.by_agent);
        let conns = all.entry(key.clone()).or_default();
        let socket = Socket {
            out,
            wire,
            admitted: false,
        };
        lock(conns).insert(id, socket);
    }

    /// Forgets socket `id`; whether it was registered (an agent destroyed since has
    /// forgotten it already).
    fn remove(&self, key: &AgentKey, id: &ConnId) -> bool {
        let mut all = lock(&self.by_agent);
        let Some(conns) = all.get(key) else {
            return false;
        };
        let mut conns = lock(conns);
        let was = conns.remove(id).is_some();
        if conns.is_empty() {
            drop(conns);
            all.remove(key);
        }
        was
    }
}

/// The sockets as the core reaches them (the delivery port).
impl Connections for Sockets {
    fn close_agent(&self, key: &AgentKey, code: u16, reason: &str) {
        let Some(conns) = lock(&self.by_agent).remove(key) else {
            return;
        };
        for socket in lock(&conns).values() {
            socket.out.send(close(code, reason));
        }
    }

    /// The ids of `key`'s open sockets.
    fn ids(&self, key: &AgentKey) -> Vec<ConnId> {
        self.of(key)
            .map(|conns| lock(&conns).keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `key`'s socket `id` is open.
    fn is_open(&self, key: &AgentKey, id: &ConnId) -> bool {
        self.of(key)
            .is_some_and(|conns| lock(&conns).contains_key(id))
    }

    /// How many sockets `key` has open.
    fn speaks(&self, key: &AgentKey) -> Speaks {
        let mut speaks = Speaks::default();
        if let Some(conns) = self.of(key) {
            for socket in lock(&conns).values() {
                let one = Speaks::of(socket.wire);
                speaks.json |= one.json;
                speaks.postcard |= one.postcard;
            }
        }
        speaks
    }

    fn count_of(&self, key: &AgentKey) -> usize {
        self.of(key).map_or(0, |conns| lock(&conns).len())
    }

    /// How many sockets are open, over all agents.
    fn count(&self) -> usize {
        lock(&self.by_agent)
            .values()
            .map(|conns| lock(conns).len())
            .sum()
    }

    /// Sends what an event produced (once it is durable) to `key`'s sockets.
    fn deliver(&self, key: &AgentKey, effects: Vec<Effect>) {
        let Some(conns) = self.of(key) else {
            return;
        };
        let mut conns = lock(&conns);
        for effect in effects {
            match effect {
                Effect::Send(id, outgoing) => {
                    if let Some(socket) = conns.get(&id) {
                        if let Some(frame) = socket.wire.outgoing(&outgoing) {
                            socket.out.send(frame);
                        }
                    }
                }
                Effect::Broadcast(outgoing, except) => {
                    // Encoded once per protocol, shared by every socket speaking it.
                    let mut frames: [Option<Option<Message>>; 3] = [None, None, None];
                    // A long exclusion list is looked up by hash, not scanned for every socket.
                    let long: Option<HashSet<&ConnId>> =
                        (except.len() > 8).then(|| except.iter().collect());
                    let excluded = |id| match &long {
                        Some(set) => set.contains(id),
                        None => except.contains(id),
                    };
                    for (id, socket) in conns.iter() {
                        if !socket.admitted || excluded(id) {
                            continue;
                        }
                        let frame = frames[socket.wire as usize]
                            .get_or_insert_with(|| socket.wire.outgoing(&outgoing));
                        if let Some(frame) = frame {
                            socket.out.send(frame.clone());
                        }
                    }
                }
                Effect::Admit(id) => {
                    if let Some(socket) = conns.get_mut(&id) {
                        socket.admitted = true;
                    }
                }
                Effect::SetState(..) | Effect::SetTags(..) => {}
            }
        }
    }

    /// Closes every socket (the runtime is shutting down).
    fn close_all(&self) {
        for conns in lock(&self.by_agent).values() {
            for socket in lock(conns).values() {
                socket
                    .out
                    .send(close(close_code::AWAY, "the server is shutting down"));
            }
        }
    }
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: close_reason(reason).into(),
    }))
}

/// `GET /agents/{class}/{name}`: a WebSocket upgrade, or else a request for `on_request`.
/// The address and the admission hook are checked before anything is woken.
pub(crate) async fn agent_root(
    State(runtime): State<Runtime>,
    Path((class, name)): Path<(String, String)>,
    request: Request,
) -> Response {
    match crate::server::address(&runtime, &class, &name) {
        Ok(key) => root(runtime, key, request).await,
        Err(refused) => axum::response::IntoResponse::into_response(refused),
    }
}

/// A request to the root of the agent `key` (registered): a WebSocket upgrade, or else a
/// request for `on_request`.
pub(crate) async fn root(runtime: Runtime, key: AgentKey, request: Request) -> Response {
    let class = runtime.shared().class(key.class()).expect("checked");
    let (mut parts, body) = request.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &runtime).await {
        Ok(ws) => ws,
        Err(_) => {
            return crate::server::to_agent(runtime, key, Request::from_parts(parts, body)).await
        }
    };
    upgrade(runtime, key, class, parts, ws).await
}

async fn upgrade(
    runtime: Runtime,
    key: AgentKey,
    class: Class,
    parts: axum::http::request::Parts,
    ws: WebSocketUpgrade,
) -> Response {
    // Small buffers: an idle connection should cost a few KB, not tungstenite's default 128 KiB
    // read buffer. They grow while a large message passes.
    let ws = ws
        .protocols([protocol::JSON_PROTOCOL, protocol::POSTCARD_PROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(runtime.config().max_message_bytes);
    let principal = match (class.before_connect)(key.name(), &parts).await {
        Ok(principal) => principal,
        Err(refusal) => return refused(ws, refusal),
    };
    let wire = match ws.selected_protocol().map(|p| p.as_bytes()) {
        Some(p) if p == protocol::JSON_PROTOCOL.as_bytes() => Protocol::Json,
        Some(p) if p == protocol::POSTCARD_PROTOCOL.as_bytes() => Protocol::Postcard,
        _ => Protocol::Raw,
    };
    // Served by a task of its own, not inside axum's upgrade task: that one ends at once and
    // frees what it holds, instead of living as long as the connection.
    ws.on_upgrade(move |socket| {
        tokio::spawn(serve(runtime, key, socket, wire, principal));
        std::future::ready(())
    })
}

/// Answers an upgrade with `refusal`: a refusal of `agents::refuse` is accepted, to be closed at
/// once with its code and reason (a browser can read them, not an HTTP status); any other
/// response is given as it is.
fn refused(ws: WebSocketUpgrade, refusal: Response) -> Response {
    match refusal.extensions().get::<Refusal>().cloned() {
        Some(Refusal { code, reason }) => ws
            .protocols([protocol::JSON_PROTOCOL, protocol::POSTCARD_PROTOCOL])
            .on_upgrade(move |mut socket| async move {
                let _ = socket.send(close(code, &reason)).await;
            }),
        None => refusal,
    }
}

/// Answers `request` with `refusal` (see [`refused`]), whether or not it is an upgrade.
pub(crate) async fn refuse(runtime: &Runtime, request: Request, refusal: Response) -> Response {
    let (mut parts, _) = request.into_parts();
    match WebSocketUpgrade::from_request_parts(&mut parts, runtime).await {
        Ok(ws) => refused(ws, refusal),
        Err(_) => refusal,
    }
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
    Credit {
        id: u64,
        chunks: u32,
    },
    Message(WsMessage),
    /// A call that is refused before it is made (its id is known, so it gets a reply).
    Refused {
        id: u64,
        error: RawError,
    },
}

impl Protocol {
    /// What the agent sends, as a frame of this protocol (`None`: not for this protocol).
    fn outgoing(self, outgoing: &Outgoing) -> Option<Message> {
        Some(match (outgoing, self) {
            (Outgoing::Raw(WsMessage::Text(t)), _) => Message::Text(t.clone().into()),
            (Outgoing::Raw(WsMessage::Binary(b)), _) => Message::Binary(b.clone().into()),
            (Outgoing::Close(code, reason), _) => close(*code, reason),
            (Outgoing::Event(e), Protocol::Raw) => Message::Text(e.json().ok()?.to_owned().into()),
            (Outgoing::State(_) | Outgoing::Error(..), Protocol::Raw) => return None,
            (Outgoing::Event(e), wire) => wire.frame(
                || match e.json() {
                    Ok(json) => protocol::event_frame(json),
                    Err(why) => protocol::error_frame(&RawError::internal(why)),
                },
                || match e.postcard() {
                    Ok(data) => protocol::PostcardServerFrame::Event {
                        data: data.to_vec(),
                    },
                    Err(why) => protocol::PostcardServerFrame::failed(&why),
                },
            ),
            (Outgoing::State(s), wire) => wire.frame(
                || match s.json() {
                    Ok(json) => protocol::state_frame(json),
                    Err(why) => protocol::error_frame(&RawError::internal(why)),
                },
                || match s.postcard() {
                    Ok(state) => protocol::PostcardServerFrame::State {
                        state: state.to_vec(),
                    },
                    Err(why) => protocol::PostcardServerFrame::failed(&why),
                },
            ),
            (Outgoing::Error(error, data), wire) => wire.frame(
                || {
                    let data = data.as_ref().map(|d| Payload::Json(d.json_value()));
                    protocol::error_frame(&RawError {
                        data,
                        ..error.clone()
                    })
                },
                || protocol::PostcardServerFrame::Failed {
                    error: protocol::WireError {
                        data: data
                            .as_ref()
                            .and_then(|d| d.postcard().ok().map(<[u8]>::to_vec)),
                        ..protocol::WireError::from(error)
                    },
                },
            ),
        })
    }

    /// The frame in this protocol's encoding (only the one needed is built).
    fn frame(
        self,
        json: impl FnOnce() -> String,
        postcard: impl FnOnce() -> protocol::PostcardServerFrame,
    ) -> Message {
        match self {
            Protocol::Json | Protocol::Raw => Message::Text(json().into()),
            Protocol::Postcard => Message::Binary(protocol::to_postcard(&postcard()).into()),
        }
    }

    fn identity(self, key: &AgentKey, conn: &str) -> Message {
        let (class, name) = (key.class(), key.name());
        self.frame(
            || protocol::identity_frame(class, name, conn),
            || protocol::PostcardServerFrame::Identity {
                class: class.to_owned(),
                name: name.to_owned(),
                conn: conn.to_owned(),
            },
        )
    }

    pub(crate) fn reply(self, id: u64, result: &Result<Payload, RawError>) -> Message {
        self.frame(
            || protocol::reply_frame(id, result),
            || protocol::PostcardServerFrame::reply(id, result),
        )
    }

    pub(crate) fn chunk(self, id: u64, data: &Payload) -> Message {
        self.frame(
            || protocol::chunk_frame(id, data),
            || protocol::PostcardServerFrame::chunk(id, data),
        )
    }

    /// An `error` frame: a frame that could not be read (`bad_args`), a message that could not
    /// be delivered.
    fn error(self, error: &RawError) -> Message {
        self.frame(
            || protocol::error_frame(error),
            || protocol::PostcardServerFrame::Failed {
                error: protocol::WireError::from(error),
            },
        )
    }

    /// Reads one data frame.
    fn parse(self, frame: &Message) -> Result<Incoming, String> {
        match (self, frame) {
            (Protocol::Raw, Message::Text(text)) => {
                Ok(Incoming::Message(WsMessage::Text(text.as_str().to_owned())))
            }
            (Protocol::Raw, Message::Binary(bytes)) => {
                Ok(Incoming::Message(WsMessage::Binary(bytes.to_vec())))
            }
            (Protocol::Json, Message::Text(text)) => {
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
                    protocol::ClientFrame::Credit { id, chunks } => {
                        Ok(Incoming::Credit { id, chunks })
                    }
                    protocol::ClientFrame::Message { data } => {
                        Ok(Incoming::Message(WsMessage::Text(match data {
                            serde_json::Value::String(text) => text,
                            other => other.to_string(),
                        })))
                    }
                }
            }
            (Protocol::Postcard, Message::Binary(bytes)) => match postcard::from_bytes(bytes) {
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
                Ok(protocol::PostcardClientFrame::Credit { id, chunks }) => {
                    Ok(Incoming::Credit { id, chunks })
                }
                Ok(protocol::PostcardClientFrame::Message { data }) => {
                    Ok(Incoming::Message(WsMessage::Binary(data)))
                }
                Err(e) => Err(format!(
                    "not a frame of {}: {e}",
                    protocol::POSTCARD_PROTOCOL
                )),
            },
            (Protocol::Json, _) => {
                Err("binary frames are not part of agents.v1.json; send JSON text frames".into())
            }
            (Protocol::Postcard, _) => {
                Err("text frames are not part of agents.v1.postcard; send binary frames".into())
            }
            (Protocol::Raw, _) => Err("not a data frame".into()),
        }
    }
}

/// Serves one upgraded socket until it closes. Not `async`: the socket is split first, so that
/// the future (alive as long as the connection) holds the two halves, not the whole socket too.
fn serve(
    runtime: Runtime,
    key: AgentKey,
    socket: WebSocket,
    wire: Protocol,
    principal: Option<String>,
) -> impl Future<Output = ()> {
    let conn = next_conn_id();
    let span = tracing::debug_span!("connection", class = key.class(), name = key.name(), conn = %conn, ?wire);
    Connection {
        runtime,
        key,
        conn,
        wire,
        principal: principal.map(Arc::from),
    }
    .serve(socket.split())
    .instrument(span)
}

/// The read buffer of each socket.
const READ_BUFFER: usize = 1024;
/// Frames are gathered up to this many bytes before a write (and written at the latest when
/// the connection's queue is empty).
const WRITE_BUFFER: usize = 16 * 1024;

const SLOW_READER: &str = "the client does not read its frames fast enough";

/// How a connection ended, for `on_error` and `on_close`.
struct Ending {
    code: u16,
    reason: String,
    error: Option<String>,
}

type Halves = (
    futures_util::stream::SplitSink<WebSocket, Message>,
    futures_util::stream::SplitStream<WebSocket>,
);

struct Connection {
    runtime: Runtime,
    key: AgentKey,
    conn: ConnId,
    wire: Protocol,
    /// What `on_before_connect` passed on: the principal of every call on this connection.
    principal: Option<Arc<str>>,
}

impl Connection {
    async fn serve(self, (mut sink, stream): Halves) {
        let closed = CancellationToken::new();
        let (out, outbound) = outbound::queue(self.runtime.config().outbound_queue, closed.clone());
        // Tells the reader that the server closed the connection (the agent, or a shutdown).
        let (server_closed, mut closing) = oneshot::channel::<Ending>();
        let writer = tokio::spawn({
            let closed = closed.clone();
            async move {
                let write = async {
                    while let Some(first) = outbound.recv().await {
                        // What is queued goes out together: one write for many frames.
                        let mut next = Some(first);
                        let mut yielded = false;
                        while let Some(message) = next.take() {
                            if let Message::Close(frame) = &message {
                                let (code, reason) = frame
                                    .as_ref()
                                    .map_or((close_code::NORMAL, String::new()), |f| {
                                        (f.code, f.reason.as_str().to_owned())
                                    });
                                let _ = server_closed.send(Ending {
                                    code,
                                    reason,
                                    error: None,
                                });
                                let _ = sink.send(message).await;
                                return;
                            }
                            if sink.feed(message).await.is_err() {
                                return;
                            }
                            next = next_queued(&mut yielded, || outbound.try_recv()).await;
                        }
                        if sink.flush().await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    () = write => {}
                    () = closed.cancelled() => {
                        // Say why, but do not wait on a client that does not read.
                        let close = close(close_code::POLICY, SLOW_READER);
                        let _ = tokio::time::timeout(Duration::from_millis(100), sink.send(close)).await;
                    }
                }
            }
        });
        let shared = self.runtime.shared().clone();
        let sockets = self.runtime.sockets();
        sockets.add(&self.key, self.conn.clone(), out.clone(), self.wire);
        if self.wire != Protocol::Raw {
            out.send(self.wire.identity(&self.key, self.conn.as_str()));
        }
        let (done, connected) = oneshot::channel();
        let event = Event::Connect {
            conn: self.conn.clone(),
            protocol: self.wire,
            principal: self.principal.as_deref().map(str::to_owned),
            done,
        };
        let connected = match shared.route(&self.key, event).await {
            Ok(()) => connected
                .await
                .unwrap_or_else(|_| Err(RawError::internal("the agent stopped"))),
            Err((e, _)) => Err(RawError::internal(e)),
        };
        let ending = match connected {
            Ok(_) => Some(self.read(stream, &out, &closed, &mut closing).await),
            Err(e) => {
                tracing::debug!("on_connect refused the connection: {e}");
                out.send(close(close_code::POLICY, &e.message));
                None
            }
        };
        let registered = sockets.remove(&self.key, &self.conn);
        if let Some(Ending {
            code,
            reason,
            error,
        }) = ending.filter(|_| registered)
        {
            let event = Event::Close {
                conn: self.conn.clone(),
                code,
                reason,
                error,
            };
            if let Err((e, _)) = shared.route(&self.key, event).await {
                tracing::debug!("on_close cannot run: {e}");
            }
        }
        drop(out);
        let _ = writer.await;
    }

    /// Reads frames until the connection ends, and says how it ended.
    async fn read(
        &self,
        mut stream: futures_util::stream::SplitStream<WebSocket>,
        out: &Outbound,
        closed: &CancellationToken,
        server_closed: &mut oneshot::Receiver<Ending>,
    ) -> Ending {
        let config = self.runtime.config();
        let calls = Arc::new(InFlight::default());
        let mut timer = Timer::new(config.connection_idle);
        let mut writer_gone = false;
        let ending = loop {
            let frame = tokio::select! {
                frame = stream.next() => frame,
                () = &mut timer.sleep, if timer.armed => {
                    if let Some(idle) = timer.idle.filter(|_| timer.is_idle()) {
                        let reason = format!("no frame for {idle:?}");
                        out.send(close(close_code::NORMAL, &reason));
                        break Ending { code: close_code::NORMAL, reason, error: None };
                    }
                    self.expire(&mut timer, &calls, out);
                    continue;
                }
                () = closed.cancelled() => break Ending { code: close_code::POLICY, reason: SLOW_READER.into(), error: Some(SLOW_READER.into()) },
                ending = &mut *server_closed, if !writer_gone => {
                    let Ok(ending) = ending else {
                        writer_gone = true; // the writer stopped without a close: keep reading
                        continue;
                    };
                    // Give the client a moment to answer the close, but do not wait on it.
                    let echo = async { while let Some(Ok(frame)) = stream.next().await { if let Message::Close(_) = frame { break; } } };
                    let _ = tokio::time::timeout(Duration::from_secs(1), echo).await;
                    break ending;
                }
            };
            timer.active();
            let frame = match frame {
                None => {
                    break Ending {
                        code: close_code::ABNORMAL,
                        reason: String::new(),
                        error: None,
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    break match frame {
                        Some(f) => Ending {
                            code: f.code,
                            reason: f.reason.as_str().to_owned(),
                            error: None,
                        },
                        None => Ending {
                            code: close_code::STATUS,
                            reason: String::new(),
                            error: None,
                        },
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue, // answered by the socket
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    if is_too_big(&e) {
                        let reason = format!(
                            "a message exceeded the limit of {} bytes",
                            config.max_message_bytes
                        );
                        out.send(close(close_code::SIZE, &reason));
                        break Ending {
                            code: close_code::SIZE,
                            reason: reason.clone(),
                            error: Some(reason),
                        };
                    }
                    break Ending {
                        code: close_code::ABNORMAL,
                        reason: String::new(),
                        error: Some(e.to_string()),
                    };
                }
            };
            match self.wire.parse(&frame) {
                Err(e) => out.send(self.wire.error(&RawError::bad_args(e))),
                Ok(Incoming::Call {
                    id,
                    method,
                    args,
                    deadline_ms,
                }) => {
                    let timeout = deadline_ms.map_or(config.call_timeout, Duration::from_millis);
                    let deadline = deadline_in(timeout);
                    let Some(reply) = calls.start(id, deadline, out, self.wire, args.codec())
                    else {
                        let e =
                            RawError::bad_args(format!("a call with id {id} is already in flight"));
                        out.send(self.wire.reply(id, &Err(e)));
                        continue;
                    };
                    timer.call_due(deadline);
                    let event = Event::Call(CallEvent {
                        inv: Invocation::remote(method, args),
                        reply: ReplyTo::Port(Box::new(reply)),
                        chain: Chain::default(),
                        deadline: Some(deadline),
                        conn: Some(self.conn.clone()),
                        principal: self.principal.clone(),
                    });
                    if let Err((e, event)) = self.route(event, &mut timer, &calls, out).await {
                        event.abandon(RawError::internal(e));
                    }
                }
                Ok(Incoming::Cancel { id }) => {
                    // If it has not run, it never will: the agent skips a call taken out.
                    if calls.cancel(id) {
                        let e = RawError::new(
                            ErrorKind::Cancelled,
                            format!("call {id} was cancelled by the client"),
                        );
                        out.send(self.wire.reply(id, &Err(e)));
                    }
                }
                Ok(Incoming::Credit { id, chunks }) => calls.credit(id, chunks),
                Ok(Incoming::Refused { id, error }) => out.send(self.wire.reply(id, &Err(error))),
                Ok(Incoming::Message(message)) => {
                    let event = Event::Message {
                        conn: self.conn.clone(),
                        message,
                    };
                    if let Err((e, _)) = self.route(event, &mut timer, &calls, out).await {
                        let e = RawError::internal(format!("the message cannot be delivered: {e}"));
                        out.send(self.wire.error(&e));
                    }
                }
            }
        };
        calls.clear();
        ending
    }

    /// Hands `event` to the agent, in the order the frames came. A full mailbox slows this
    /// reader down (and so the client); meanwhile calls whose deadline passes are answered.
    async fn route(
        &self,
        event: Event,
        timer: &mut Timer,
        calls: &InFlight,
        out: &Outbound,
    ) -> Result<(), (crate::Error, Event)> {
        let routed = self.runtime.shared().route(&self.key, event);
        tokio::pin!(routed);
        loop {
            tokio::select! {
                routed = &mut routed => return routed,
                () = &mut timer.sleep, if timer.armed => {
                    timer.active(); // waiting on the agent is not idling
                    self.expire(timer, calls, out);
                }
            }
        }
    }

    /// Answers `timeout` to the calls whose deadline has passed, and sets the timer again.
    fn expire(&self, timer: &mut Timer, calls: &InFlight, out: &Outbound) {
        let now = Instant::now();
        if timer.calls_due.is_some_and(|due| due <= now) {
            timer.calls_due = calls.expire(now, |id| {
                let e = RawError::new(
                    ErrorKind::Timeout,
                    format!("no reply from {} before the deadline", self.key),
                );
                out.send(self.wire.reply(id, &Err(e)));
            });
        }
        timer.arm();
    }
}

/// The one timer of a connection's reader: for its idle limit and for the deadlines of its
/// calls (no timer per call). It may go off early (for a call answered since); it then just
/// sets itself again.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    armed: bool,
    idle: Option<Duration>,
    last_frame: Instant,
    /// The earliest deadline of a call in flight, as far as the reader knows.
    calls_due: Option<Instant>,
}

impl Timer {
    fn new(idle: Option<Duration>) -> Self {
        let now = Instant::now();
        let mut timer = Timer {
            sleep: Box::pin(tokio::time::sleep_until(now)),
            armed: false,
            idle,
            last_frame: now,
            calls_due: None,
        };
        timer.arm();
        timer
    }

    /// The connection is not idle now (a frame came). Reads the clock only if there is an idle
    /// limit to keep.
    fn active(&mut self) {
        if self.idle.is_some() {
            self.last_frame = Instant::now();
        }
    }

    fn idle_due(&self) -> Option<Instant> {
        self.idle.and_then(|idle| self.last_frame.checked_add(idle))
    }

    fn is_idle(&self) -> bool {
        self.idle_due().is_some_and(|due| due <= Instant::now())
    }

    /// Sets the timer for the earlier of the idle limit and the first call's deadline.
    fn arm(&mut self) {
        let at = self.idle_due().into_iter().chain(self.calls_due).min();
        self.armed = at.is_some();
        if let Some(at) = at {
            self.sleep.as_mut().reset(at);
        }
    }

    /// A call due by `deadline` is in flight.
    fn call_due(&mut self, deadline: Instant) {
        if self.calls_due.is_none_or(|due| deadline < due) {
            self.calls_due = Some(deadline);
            self.arm();
        }
    }
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
