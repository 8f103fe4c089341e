//! A WebSocket's life: the upgrade (admission, subprotocol), and the socket's reader and
//! writer until it closes.
//!
//! The socket is owned by the runtime, not by the agent: it is registered in `Sockets` under
//! the agent's address, outlives the agent's hibernation, and its frames are routed to the agent
//! through the core's door (waking it), in the order the client sent them; a full mailbox slows
//! the reader (and so the client) down. Calls are answered in the order they are ready, by the
//! agent straight into the socket's queue (see `inflight`); a call's deadline and its
//! cancellation work as documented in the protocol; a disconnect cancels the calls still in
//! flight (those not yet run never run). Everything the agent sends goes through a bounded queue
//! per connection: a client that does not read is disconnected, never waited for.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agents_client::{
    __private::{deadline_in, next_queued},
    protocol, ErrorKind, RawError,
};
use axum::{
    extract::ws::{close_code, Message, WebSocket, WebSocketUpgrade},
    http::request::Parts,
    response::Response,
};
use futures_util::StreamExt;
use tokio::{sync::oneshot, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::port::{Admitting, AgentKey, ConnCall, ConnId, Limits, Protocol, Refusal};

use super::{
    frames::{close, Incoming},
    inflight::InFlight,
    outbound::{self, Next, Outbound},
    timer::Timer,
    Wing,
};

/// Upgrades a request to the agent `key` (registered) to a WebSocket, once the class's
/// `on_before_connect` admitted it. Nothing is woken before that.
pub(crate) async fn upgrade(
    wing: Wing,
    key: AgentKey,
    mut head: Parts,
    ws: WebSocketUpgrade,
) -> Response {
    // Small buffers: an idle connection should cost a few KB, not tungstenite's default 128 KiB
    // read buffer. They grow while a large message passes. A frame larger than a message may
    // be is refused by its header, before any of it is read.
    let max = wing.door.limits().max_message_bytes;
    let ws = ws
        .protocols([protocol::JSON_PROTOCOL, protocol::POSTCARD_PROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_frame_size(max)
        .max_message_size(max);
    let principal = match wing.door.admit(&key, &head).await {
        Ok(principal) => principal,
        Err(refusal) => return refused(ws, refusal),
    };
    // The socket holds what the front put in the request (its connection's slot) as long as it
    // is open.
    let held = Held(std::mem::take(&mut head.extensions));
    let wire = match ws.selected_protocol().map(|p| p.as_bytes()) {
        Some(p) if p == protocol::JSON_PROTOCOL.as_bytes() => Protocol::Json,
        Some(p) if p == protocol::POSTCARD_PROTOCOL.as_bytes() => Protocol::Postcard,
        _ => Protocol::Raw,
    };
    // Served by a task of its own, not inside axum's upgrade task: that one ends at once and
    // frees what it holds, instead of living as long as the connection.
    ws.on_upgrade(move |socket| {
        tokio::spawn(serve(wing, key, socket, wire, principal, held));
        std::future::ready(())
    })
}

/// Answers an upgrade with `refusal`: a refusal of `agents::refuse` is accepted, to be closed at
/// once with its code and reason (a browser can read them, not an HTTP status); any other
/// response is given as it is.
pub(crate) fn refused(ws: WebSocketUpgrade, refusal: Response) -> Response {
    match refusal.extensions().get::<Refusal>().cloned() {
        Some(Refusal { code, reason }) => ws
            .protocols([protocol::JSON_PROTOCOL, protocol::POSTCARD_PROTOCOL])
            .on_upgrade(move |mut socket| async move {
                let _ = socket.send(close(code, &reason)).await;
            }),
        None => refusal,
    }
}

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
/// Serves one upgraded socket until it closes. Not `async`: the socket is split first, so that
/// the future (alive as long as the connection) holds the two halves, not the whole socket too.
fn serve(
    wing: Wing,
    key: AgentKey,
    socket: WebSocket,
    wire: Protocol,
    principal: Option<String>,
    held: Held,
) -> impl Future<Output = ()> {
    let conn = next_conn_id();
    let span = tracing::debug_span!("connection", class = key.class(), name = key.name(), conn = %conn, ?wire);
    Connection {
        limits: wing.door.limits(),
        wing,
        key,
        conn,
        wire,
        principal: principal.map(Arc::from),
        _held: held,
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
    wing: Wing,
    limits: Limits,
    key: AgentKey,
    conn: ConnId,
    wire: Protocol,
    /// What `on_before_connect` passed on: the principal of every call on this connection.
    principal: Option<Arc<str>>,
    _held: Held,
}

/// What an open socket holds until it closes: the upgrade request's extensions (the front's
/// slot for its connection).
struct Held(#[allow(dead_code)] axum::http::Extensions);

impl Connection {
    async fn serve(self, (sink, stream): Halves) {
        let closed = CancellationToken::new();
        let (out, outbound) =
            outbound::queue(self.limits.outbound_queue, closed.clone(), Some(sink));
        // Tells the reader that the server closed the connection (the agent, or a shutdown).
        let (server_closed, mut closing) = oneshot::channel::<Ending>();
        let writer = tokio::spawn({
            let closed = closed.clone();
            let (slow, key) = (self.wing.sockets.clone(), self.key.clone());
            async move {
                let write = async {
                    while let Some(next) = outbound.next().await {
                        // What is queued goes out together: one write for many frames.
                        let mut next = match next {
                            Next::Frame(frame) => Some(frame),
                            Next::Flush => None,
                        };
                        let mut yielded = false;
                        let mut sink = outbound.hold();
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
                        drop(sink);
                        outbound.written();
                    }
                };
                tokio::select! {
                    () = write => {}
                    () = closed.cancelled() => {
                        slow.closed_slow(&key);
                        // Say why, but do not wait on a client that does not read.
                        let close = close(close_code::POLICY, SLOW_READER);
                        let _ = tokio::time::timeout(Duration::from_millis(100), outbound.hold().send(close)).await;
                    }
                }
            }
        });
        let Wing { door, sockets } = &self.wing;
        sockets.add(&self.key, self.conn.clone(), out.clone(), self.wire);
        if self.wire != Protocol::Raw {
            out.send(self.wire.identity(&self.key, self.conn.as_str()));
        }
        let principal = self.principal.as_deref().map(str::to_owned);
        // Frames are read as soon as the agent has the connection's event, not once it is
        // durable: a call sent right after the handshake joins its commit. If `on_connect`
        // refuses, the calls made meanwhile never run.
        let calls = Arc::new(InFlight::default());
        let refused = Box::new({
            let calls = calls.clone();
            move || calls.refuse()
        });
        let admitting = door
            .connect(&self.key, self.conn.clone(), self.wire, principal, refused)
            .await;
        let ending = match admitting {
            Ok(admitting) => {
                let read = self.read(stream, &out, &closed, &mut closing, &calls, admitting);
                read.await
            }
            Err(e) => Err(e),
        };
        let ending = ending
            .inspect_err(|e| {
                tracing::debug!("the connection was not admitted: {e}");
                out.send(close(close_code::POLICY, &e.message));
            })
            .ok();
        let registered = sockets.remove(&self.key, &self.conn);
        if let Some(Ending {
            code,
            reason,
            error,
        }) = ending.filter(|_| registered)
        {
            let closing = door.close(&self.key, self.conn.clone(), code, reason, error);
            if let Err(e) = closing.await {
                tracing::debug!("on_close cannot run: {e}");
            }
        }
        drop(out);
        let _ = writer.await;
    }

    /// Reads frames until the connection ends, and says how it ended; an error if the agent
    /// refused it (`admitting`).
    async fn read(
        &self,
        mut stream: futures_util::stream::SplitStream<WebSocket>,
        out: &Outbound,
        closed: &CancellationToken,
        server_closed: &mut oneshot::Receiver<Ending>,
        calls: &Arc<InFlight>,
        admitting: Admitting,
    ) -> Result<Ending, RawError> {
        let limits = self.limits;
        let mut admitting = Some(admitting);
        let mut timer = Timer::new(limits.connection_idle);
        let mut writer_gone = false;
        let ending = loop {
            let frame = tokio::select! {
                frame = stream.next() => frame,
                admitted = async { admitting.as_mut().expect("pending").await }, if admitting.is_some() => {
                    admitting = None;
                    match admitted {
                        Ok(()) => continue,
                        // The agent refused it (and so closed the calls table already), or
                        // could not run or store its connect event: the calls made meanwhile
                        // that have not run never run, and streams stop.
                        Err(e) => {
                            calls.refuse();
                            return Err(e);
                        }
                    }
                }
                () = &mut timer.sleep, if timer.armed => {
                    if let Some(idle) = timer.idle.filter(|_| timer.is_idle()) {
                        let reason = format!("no frame for {idle:?}");
                        out.send(close(close_code::NORMAL, &reason));
                        break Ending { code: close_code::NORMAL, reason, error: None };
                    }
                    self.expire(&mut timer, calls, out);
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
                    if let Some((code, reason)) = refused_frame(&e, &limits) {
                        out.send(close(code, &reason));
                        break Ending {
                            code,
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
                    trace,
                }) => {
                    let timeout = deadline_ms.map_or(limits.call_timeout, Duration::from_millis);
                    let deadline = deadline_in(timeout);
                    let Some(reply) = calls.start(id, deadline, out, self.wire, args.codec())
                    else {
                        let e =
                            RawError::bad_args(format!("a call with id {id} is already in flight"));
                        out.send(self.wire.reply(id, &Err(e)));
                        continue;
                    };
                    timer.call_due(deadline);
                    let call = ConnCall {
                        method,
                        args,
                        reply: Box::new(reply),
                        deadline,
                        conn: self.conn.clone(),
                        principal: self.principal.clone(),
                        trace,
                    };
                    let routed = self.wing.door.call(&self.key, call);
                    self.waiting(routed, &mut timer, calls, out).await;
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
                    let routed = self
                        .wing
                        .door
                        .message(&self.key, self.conn.clone(), message);
                    if let Err(e) = self.waiting(routed, &mut timer, calls, out).await {
                        let e = RawError::internal(format!("the message cannot be delivered: {e}"));
                        out.send(self.wire.error(&e));
                    }
                }
            }
        };
        calls.clear();
        Ok(ending)
    }

    /// Waits for `routed` (an event handed to the agent, in the order the frames came). A full
    /// mailbox slows this reader down (and so the client); meanwhile calls whose deadline
    /// passes are answered.
    async fn waiting<T>(
        &self,
        routed: impl Future<Output = T>,
        timer: &mut Timer,
        calls: &InFlight,
        out: &Outbound,
    ) -> T {
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
/// The close code and reason for a receive error that is the client's doing: a message over the
/// size limit (1009), a text frame that is not UTF-8 (1007). `None`: the connection broke.
fn refused_frame(e: &axum::Error, limits: &Limits) -> Option<(u16, String)> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        match err.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Capacity(_)) => {
                let limit = limits.max_message_bytes;
                let reason = format!("a message exceeded the limit of {limit} bytes");
                return Some((close_code::SIZE, reason));
            }
            Some(tungstenite::Error::Utf8(_)) => {
                let reason = "a text frame was not valid UTF-8".to_owned();
                return Some((close_code::INVALID, reason));
            }
            _ => source = err.source(),
        }
    }
    None
}
