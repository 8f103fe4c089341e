//! [`WsTransport`]: calls over a WebSocket with the `agents.v1.postcard` subprotocol.
//!
//! One socket carries any number of concurrent calls, matched to replies by id. Each call has a
//! timeout; dropping a call's future (or its timeout passing) sends `cancel`, so a call that has
//! not run yet never runs. The events and shared state the agent pushes are kept for
//! [`events`](crate::Transport::events) and [`state`](crate::Transport::state).
//!
//! A streaming call's chunks arrive on its [`RawStream`] as their frames come in; the timeout
//! then applies to each wait for a chunk, and dropping the stream sends `cancel`. The transport
//! uses the protocol's flow control: at most 32 chunks are sent ahead of what the stream's
//! reader took, so a slow reader slows the stream down instead of buffering it.
//!
//! When the connection drops, the calls in flight fail with an `internal` error saying so: they
//! are never silently re-sent. The transport then reconnects in the background with
//! exponential backoff (100 ms doubling to 5 s), and event and state subscriptions carry on
//! over the new connection. Calls made while it is reconnecting wait for it, within their
//! timeout. Dropping the transport closes the connection for good (close code 1000).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    time::Instant,
};
use tokio_tungstenite::tungstenite::{
    client::IntoClientRequest,
    protocol::{frame::coding::CloseCode, CloseFrame, WebSocketConfig},
    Message,
};

use crate::{
    protocol::{to_postcard, PostcardClientFrame, PostcardServerFrame, POSTCARD_PROTOCOL},
    transport::{deadline_in, BoxFuture, OutgoingCall, RawStream, Transport},
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

/// Who waits for the frames of a call in flight.
enum Waiter {
    /// A plain call: its reply.
    Call(oneshot::Sender<Result<Payload, RawError>>),
    /// A streaming call: its chunks, then the end (the sender dropped) or an error.
    Stream(mpsc::UnboundedSender<Result<Payload, RawError>>),
}

impl Waiter {
    fn fail(self, e: RawError) {
        match self {
            Waiter::Call(tx) => drop(tx.send(Err(e))),
            Waiter::Stream(tx) => drop(tx.send(Err(e))),
        }
    }
}

type Pending = Mutex<HashMap<u64, Waiter>>;
type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The first reconnection attempt waits this long; each failure doubles it, up to
/// [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Whether the transport has a connection to send on.
#[derive(Clone)]
enum Link {
    /// Connected: the `generation`-th connection, and its outgoing queue.
    Up(u64, mpsc::UnboundedSender<Message>),
    /// Reconnecting.
    Down,
    /// Dropped for good.
    Closed,
}

/// What the transport's handle and its background task share.
struct Inner {
    url: String,
    pending: Pending,
    link: watch::Sender<Link>,
    events: broadcast::Sender<Payload>,
    state: watch::Sender<Option<Payload>>,
    /// `class`, `name` and connection id, as the server last announced them.
    identity: Mutex<(String, String, String)>,
    next_id: AtomicU64,
}

impl Inner {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection to one agent (`ws://host/agents/{class}/{name}`) that reconnects by itself.
pub struct WsTransport {
    inner: Arc<Inner>,
    /// Dropping it stops the background task.
    _stop: oneshot::Sender<()>,
}

/// Small buffers: tungstenite zeroes the whole read buffer before every read, and replies are
/// small (a large one still arrives whole: the buffer grows for it).
fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(16 * 1024)
}

/// Opens one connection and reads the server's identity frame.
async fn open(url: &str) -> Result<(Socket, (String, String, String)), ConnectError> {
    let mut request = url
        .into_client_request()
        .map_err(|_| ConnectError::Url(url.to_owned()))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        POSTCARD_PROTOCOL.parse().expect("a valid header value"),
    );
    let (mut socket, response) =
        tokio_tungstenite::connect_async_with_config(request, Some(socket_config()), false)
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
    match socket.next().await {
        Some(Ok(Message::Binary(bytes))) => match postcard::from_bytes(&bytes) {
            Ok(PostcardServerFrame::Identity { class, name, conn }) => {
                Ok((socket, (class, name, conn)))
            }
            _ => Err(ConnectError::Protocol(format!(
                "{url} did not identify itself"
            ))),
        },
        _ => Err(ConnectError::Protocol(format!(
            "{url} closed before identifying itself"
        ))),
    }
}

impl WsTransport {
    /// Connects and waits for the server's identity frame. Fails if the first connection
    /// cannot be made; later disconnections are repaired in the background.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let (socket, identity) = open(url).await?;
        let inner = Arc::new(Inner {
            url: url.to_owned(),
            pending: Mutex::default(),
            link: watch::channel(Link::Down).0,
            events: broadcast::channel(1024).0,
            state: watch::channel(None).0,
            identity: Mutex::new(identity),
            next_id: AtomicU64::new(1),
        });
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(supervise(inner.clone(), socket, stopped));
        Ok(WsTransport { inner, _stop: stop })
    }

    /// The agent's class, its name and this connection's id, as the server last announced
    /// them (the id changes when the transport reconnects).
    pub fn identity(&self) -> (String, String, String) {
        self.inner
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the transport is connected right now (it may be reconnecting).
    pub fn is_connected(&self) -> bool {
        matches!(*self.inner.link.borrow(), Link::Up(..))
    }
}

/// Runs connections one after the other until the transport is dropped.
async fn supervise(inner: Arc<Inner>, mut socket: Socket, mut stopped: oneshot::Receiver<()>) {
    let mut generation = 0;
    loop {
        generation += 1;
        let (out, outbound) = mpsc::unbounded_channel();
        inner.link.send_replace(Link::Up(generation, out));
        let stop = run(&inner, socket, outbound, &mut stopped).await;
        // Marked down before the calls in flight are failed: a call either sees the link down
        // or is failed here.
        inner
            .link
            .send_replace(if stop { Link::Closed } else { Link::Down });
        for (_, waiter) in inner.pending().drain() {
            waiter.fail(disconnected());
        }
        if stop {
            return;
        }
        let mut delay = MIN_BACKOFF;
        socket = loop {
            tokio::select! {
                _ = &mut stopped => {
                    inner.link.send_replace(Link::Closed);
                    return;
                }
                () = tokio::time::sleep(delay) => {}
            }
            match open(&inner.url).await {
                Ok((socket, identity)) => {
                    *inner.identity.lock().unwrap_or_else(|e| e.into_inner()) = identity;
                    tracing::debug!(url = %inner.url, "reconnected");
                    break socket;
                }
                Err(e) => {
                    tracing::debug!(url = %inner.url, "reconnecting failed, retrying in {delay:?}: {e}");
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        };
    }
}

/// Serves one connection; returns `true` if the transport was dropped, `false` if the
/// connection was lost. Frames are written by a task of their own, so that replies are read
/// while calls are being written.
async fn run(
    inner: &Inner,
    socket: Socket,
    outbound: mpsc::UnboundedReceiver<Message>,
    stopped: &mut oneshot::Receiver<()>,
) -> bool {
    let (sink, mut stream) = socket.split();
    let (stop_writer, writer_stopped) = oneshot::channel();
    let mut writer = tokio::spawn(write(sink, outbound, writer_stopped));
    let dropped = loop {
        tokio::select! {
            _ = &mut *stopped => break true,
            _ = &mut writer => break false, // it could not write: the connection is lost
            frame = stream.next() => {
                let Some(Ok(frame)) = frame else { break false };
                let Message::Binary(bytes) = frame else { continue };
                read(inner, &bytes);
            }
        }
    };
    if dropped {
        let _ = stop_writer.send(()); // it closes the socket
        let _ = writer.await;
    } else {
        writer.abort();
    }
    dropped
}

/// Writes the calls (and cancels) queued for one connection until it fails or is stopped.
async fn write(
    mut sink: futures_util::stream::SplitSink<Socket, Message>,
    mut outbound: mpsc::UnboundedReceiver<Message>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stopped => {
                let bye = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                let _ = sink.send(Message::Close(Some(bye))).await;
                let _ = sink.close().await;
                return;
            }
            message = outbound.recv() => {
                // What is queued goes out together: one write for many frames.
                let mut next = message;
                let mut yielded = false;
                while let Some(message) = next.take() {
                    if sink.feed(message).await.is_err() {
                        return;
                    }
                    next = next_queued(&mut yielded, || outbound.try_recv().ok()).await;
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Handles one frame from the server.
fn read(inner: &Inner, bytes: &[u8]) {
    match postcard::from_bytes::<PostcardServerFrame>(bytes) {
        Ok(PostcardServerFrame::Reply { id, result }) => {
            let result = result.map(Payload::Postcard).map_err(RawError::from);
            match inner.pending().remove(&id) {
                Some(Waiter::Call(tx)) => drop(tx.send(result)),
                // A stream's final reply is `()`: no bytes.
                Some(Waiter::Stream(tx)) => match result {
                    Ok(Payload::Postcard(end)) if end.is_empty() => {}
                    Ok(_) => drop(tx.send(Err(RawError::internal(
                        "the agent answered with a value: the callable does not stream",
                    )))),
                    Err(e) => drop(tx.send(Err(e))),
                },
                None => {}
            }
        }
        Ok(PostcardServerFrame::Chunk { id, data }) => {
            if let Some(Waiter::Stream(tx)) = inner.pending().get(&id) {
                let _ = tx.send(Ok(Payload::Postcard(data)));
            }
        }
        Ok(PostcardServerFrame::Event { data }) => {
            let _ = inner.events.send(Payload::Postcard(data));
        }
        Ok(PostcardServerFrame::State { state }) => {
            inner.state.send_replace(Some(Payload::Postcard(state)));
        }
        Ok(PostcardServerFrame::Error { message }) => {
            tracing::warn!("the server reports an error: {message}")
        }
        Ok(PostcardServerFrame::Failed { error }) => {
            tracing::warn!("the server reports an error: {}", RawError::from(error))
        }
        Ok(PostcardServerFrame::Identity { .. }) => {}
        Err(e) => tracing::warn!("a frame from the server did not decode: {e}"),
    }
}

/// The next frame already queued for a socket that is gathering frames into one write. When
/// there is none, waits one scheduler round, once per write (`yielded`): the tasks just woken
/// (by replies released together, or calls made together) are queuing theirs right now.
#[doc(hidden)]
pub async fn next_queued<M>(
    yielded: &mut bool,
    mut try_recv: impl FnMut() -> Option<M>,
) -> Option<M> {
    if let Some(message) = try_recv() {
        return Some(message);
    }
    if std::mem::replace(yielded, true) {
        return None;
    }
    tokio::task::yield_now().await;
    try_recv()
}

fn disconnected() -> RawError {
    RawError::internal(
        "the connection closed before the reply arrived; the call may or may not have run",
    )
}

fn closed() -> RawError {
    RawError::internal("the client was closed; the call was not sent")
}

/// Sends `cancel` for a call whose future is dropped (or timed out) while it still waits for
/// its reply (an answered or disconnected call is no longer pending).
struct CancelOnDrop {
    id: u64,
    out: mpsc::UnboundedSender<Message>,
    inner: Arc<Inner>,
}

/// How many chunks of a stream may be on their way (or waiting) ahead of its reader.
const STREAM_WINDOW: u32 = 32;

impl CancelOnDrop {
    /// Lets the call's stream send `chunks` more chunks.
    fn credit(&self, chunks: u32) {
        let frame = PostcardClientFrame::Credit {
            id: self.id,
            chunks,
        };
        let _ = self.out.send(Message::Binary(to_postcard(&frame).into()));
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.inner.pending().remove(&self.id).is_some() {
            let _ = self.out.send(Message::Binary(
                to_postcard(&PostcardClientFrame::Cancel { id: self.id }).into(),
            ));
        }
    }
}

/// Waits (until `deadline`) for a connection, registers call `id` on it, and returns the
/// connection's queue.
async fn register(
    inner: &Inner,
    id: u64,
    waiter: Waiter,
    deadline: Instant,
) -> Result<mpsc::UnboundedSender<Message>, RawError> {
    let connected = match &*inner.link.borrow() {
        Link::Up(generation, out) => Some((*generation, out.clone())),
        _ => None,
    };
    let (generation, out) = match connected {
        Some(up) => up,
        None => reconnected(inner, deadline).await?,
    };
    inner.pending().insert(id, waiter);
    // Checked after registering: the supervisor marks the link down before it fails what is
    // pending, so the call is either failed by it or sees the change here.
    let still = matches!(&*inner.link.borrow(), Link::Up(g, _) if *g == generation);
    if !still {
        inner.pending().remove(&id);
        return Err(disconnected());
    }
    Ok(out)
}

/// Waits (until `deadline`) for the transport to be connected again.
async fn reconnected(
    inner: &Inner,
    deadline: Instant,
) -> Result<(u64, mpsc::UnboundedSender<Message>), RawError> {
    let mut link = inner.link.subscribe();
    loop {
        let current = link.borrow_and_update().clone();
        match current {
            Link::Up(generation, out) => return Ok((generation, out)),
            Link::Closed => return Err(closed()),
            Link::Down => match tokio::time::timeout_at(deadline, link.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(closed()),
                Err(_) => {
                    return Err(RawError::new(
                        ErrorKind::Timeout,
                        format!(
                            "not connected to {} before the deadline; the call was not sent",
                            inner.url
                        ),
                    ))
                }
            },
        }
    }
}

/// Registers `waiter` for a new call, sends the call, and returns what cancels it if dropped
/// before its reply.
async fn start(
    inner: &Arc<Inner>,
    call: OutgoingCall,
    waiter: Waiter,
    deadline: Instant,
) -> Result<CancelOnDrop, RawError> {
    let Payload::Postcard(args) = call.args else {
        return Err(RawError::bad_args(
            "this transport sends postcard arguments",
        ));
    };
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let streams = matches!(waiter, Waiter::Stream(_));
    let out = register(inner, id, waiter, deadline).await?;
    if streams {
        // Flow control from the first chunk: the credit goes before the call.
        let credit = PostcardClientFrame::Credit {
            id,
            chunks: STREAM_WINDOW,
        };
        let _ = out.send(Message::Binary(to_postcard(&credit).into()));
    }
    let remaining = deadline.saturating_duration_since(Instant::now());
    let frame = PostcardClientFrame::Call {
        id,
        method: call.method.into_owned(),
        args,
        deadline_ms: Some(remaining.as_millis() as u64),
    };
    if out
        .send(Message::Binary(to_postcard(&frame).into()))
        .is_err()
    {
        inner.pending().remove(&id);
        return Err(disconnected());
    }
    Ok(CancelOnDrop {
        id,
        out,
        inner: inner.clone(),
    })
}

impl Transport for WsTransport {
    fn call(&self, call: OutgoingCall) -> BoxFuture<'static, Result<Payload, RawError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let timeout = call.timeout.unwrap_or(DEFAULT_TIMEOUT);
            let deadline = deadline_in(timeout);
            let (tx, rx) = oneshot::channel();
            let _cancel_if_dropped = start(&inner, call, Waiter::Call(tx), deadline).await?;
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(disconnected()),
                Err(_) => Err(RawError::new(
                    ErrorKind::Timeout,
                    format!("no reply within {timeout:?}"),
                )),
            }
        })
    }

    fn call_stream(&self, call: OutgoingCall) -> BoxFuture<'static, RawStream> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let timeout = call.timeout.unwrap_or(DEFAULT_TIMEOUT);
            let (tx, rx) = mpsc::unbounded_channel();
            let waiter = Waiter::Stream(tx);
            match start(&inner, call, waiter, deadline_in(timeout)).await {
                // The guard lives as long as the stream: dropping the stream cancels the call.
                // Flow control: at most STREAM_WINDOW chunks are sent ahead of what the stream's
                // reader took, so a slow reader holds a bounded buffer, however fast the stream.
                Ok(guard) => {
                    let state = (rx, guard, 0);
                    let chunks =
                        futures_util::stream::unfold(state, |(mut rx, guard, taken)| async move {
                            let item = rx.recv().await?;
                            let taken = taken + 1;
                            let taken = if taken == STREAM_WINDOW / 2 {
                                guard.credit(taken);
                                0
                            } else {
                                taken
                            };
                            Some((item, (rx, guard, taken)))
                        });
                    RawStream::new(chunks, Some(timeout))
                }
                Err(e) => RawStream::failed(e),
            }
        })
    }

    fn describe(&self) -> String {
        self.inner.url.clone()
    }

    fn events(&self) -> Option<broadcast::Receiver<Payload>> {
        Some(self.inner.events.subscribe())
    }

    fn state(&self) -> Option<watch::Receiver<Option<Payload>>> {
        Some(self.inner.state.subscribe())
    }
}
