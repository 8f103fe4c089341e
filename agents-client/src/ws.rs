//! [`WsTransport`]: calls over a WebSocket with the `agents.v1.postcard` subprotocol (or
//! `agents.v1.json`, see [`ConnectOptions::codec`]).
//!
//! One socket carries any number of concurrent calls, matched to replies by id. A call made
//! while no other is in flight (as the one before it was) writes its frame itself; calls made
//! together queue for the connection's writer task, which writes them in one go. Each call has
//! a timeout, which also bounds the wait to write its frame; dropping a call's future (or its
//! timeout passing) sends `cancel`, so a call that has not run yet never runs. The events and
//! shared state the agent pushes are kept for [`events`](crate::Transport::events) and
//! [`state`](crate::Transport::state): the first `events()` gets every event since the
//! connection opened, and a subscriber may fall 1,024 events behind before it misses some. (The
//! events' buffer is made by the first event or the first `events()`: a client that only calls
//! holds none.)
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
    framing::{self, Received},
    lock::lock,
    transport::{deadline_in, BoxFuture, OutgoingCall, RawStream, Transport},
    Codec, ErrorKind, Payload, RawError,
};

/// The timeout of calls that set none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest frame a client takes from the server unless told otherwise (64 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Why a connection could not be opened. URLs in it have their query string hidden (it may
/// hold a token).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL is not a WebSocket URL.
    #[error("invalid URL `{0}`")]
    Url(String),
    /// The server refused: an admission hook (`on_before_connect`) said no, or the address is
    /// invalid (400) or unknown (404).
    #[error("{url} refused the connection: {status} {body}")]
    Refused {
        /// Where.
        url: String,
        /// The HTTP status of the answer (e.g. 401), or the close code (4000 to 4999, e.g.
        /// 4401) of a refusal the hook made with `agents::refuse`.
        status: u16,
        /// What the admission hook said: the body of the answer, or the close reason.
        body: String,
    },
    /// The handshake failed otherwise (network, TLS, not a WebSocket server).
    #[error("could not connect to {url}: {reason}")]
    Handshake {
        /// Where.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server does not speak the protocol asked for, or did not identify itself.
    #[error("{0}")]
    Protocol(String),
}

/// How to connect: headers for the handshake (say, `Authorization`, so that a token stays out
/// of the URL and of logs), the codec, and the default timeout of calls.
///
/// ```no_run
/// # async fn f() -> Result<(), agents_client::ConnectError> {
/// use agents_client::{Codec, ConnectOptions, WsTransport};
/// let options = ConnectOptions::new()
///     .bearer("s3cret")
///     .codec(Codec::Json)
///     .timeout(std::time::Duration::from_secs(5));
/// let transport = WsTransport::connect_with("ws://127.0.0.1:8080/agents/counter/bob", options).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    headers: Vec<(String, String)>,
    codec: Codec,
    timeout: Duration,
    max_message_bytes: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            headers: Vec::new(),
            codec: Codec::Postcard,
            timeout: DEFAULT_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl ConnectOptions {
    /// Postcard, no extra headers, calls time out after [`DEFAULT_TIMEOUT`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a header to the handshake (and to every reconnection's).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(self, token: impl AsRef<str>) -> Self {
        let value = format!("Bearer {}", token.as_ref());
        self.header("Authorization", value)
    }

    /// The codec: [`Codec::Postcard`] (the default; compact) or [`Codec::Json`] (for types
    /// postcard cannot carry: `serde_json::Value`, tagged or untagged enums, `flatten`).
    /// `Codec::Value` is for in-process calls only, and is refused by `connect_with`.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The timeout of calls that set none.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The largest frame the client takes from the server (a reply, an event, a chunk);
    /// [`DEFAULT_MAX_MESSAGE_BYTES`] unless set. A larger one ends the connection, and the
    /// calls in flight fail saying so.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }
}

/// `url` with its query string hidden (it may hold a token).
fn redact(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
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
type Sink = futures_util::stream::SplitSink<Socket, Message>;

/// The way out of one connection. A call alone on it writes its frame itself (no hand-over to
/// another task, whose wake-up costs a sequential call tens of microseconds); calls made
/// together queue their frames for the connection's writer task, which writes them in one go
/// (so does the first call after a burst: the burst's next calls are on their way).
struct Way {
    queue: mpsc::UnboundedSender<Message>,
    sink: tokio::sync::Mutex<Sink>,
    /// Whether the last call was alone in flight too.
    alone: std::sync::atomic::AtomicBool,
}

/// One connection's way out, shared by its calls (one reference count to touch per call).
#[derive(Clone)]
struct Outgoing(Arc<Way>);

impl Outgoing {
    /// The way out through `sink`, and what its writer task takes from the queue.
    fn new(sink: Sink) -> (Self, mpsc::UnboundedReceiver<Message>) {
        let (queue, queued) = mpsc::unbounded_channel();
        let sink = tokio::sync::Mutex::new(sink);
        let alone = Default::default();
        (Outgoing(Arc::new(Way { queue, sink, alone })), queued)
    }

    /// Queues `frame` for the writer task.
    fn queue(&self, frame: Message) -> Result<(), RawError> {
        self.0.queue.send(frame).map_err(|_| disconnected())
    }

    /// Writes `frames`, in order: now if `alone` (no other call is in flight), as the last
    /// call was, and the socket is free; or else through the queue. A write that waits (the
    /// server does not read) holds the socket until `deadline`, and other frames queue
    /// meanwhile; what it buffered goes with the next write.
    async fn send(
        &self,
        frames: impl IntoIterator<Item = Message>,
        alone: bool,
        deadline: Instant,
    ) -> Result<(), RawError> {
        let twice = self.0.alone.swap(alone, Ordering::Relaxed) && alone;
        let free = if twice {
            self.0.sink.try_lock().ok()
        } else {
            None
        };
        let Some(mut sink) = free else {
            return frames.into_iter().try_for_each(|f| self.queue(f));
        };
        // Boxed: the future of every call holds a pointer to it, not all it holds.
        let write = Box::pin(async move {
            for frame in frames {
                sink.feed(frame).await?;
            }
            sink.flush().await
        });
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(())) => Ok(()),
            // The connection is lost: its reader sees it too, and reconnects.
            Ok(Err(_)) => Err(disconnected()),
            Err(_) => Err(RawError::new(
                ErrorKind::Timeout,
                "the server took no frame before the deadline: the call may not have been sent",
            )),
        }
    }
}

/// The first reconnection attempt waits this long; each failure doubles it, up to
/// [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Whether the transport has a connection to send on.
#[derive(Clone)]
enum Link {
    /// Connected: the `generation`-th connection, and its way out.
    Up(u64, Outgoing),
    /// Reconnecting.
    Down,
    /// Dropped for good.
    Closed,
}

/// What the transport's handle and its background task share.
struct Inner {
    url: String,
    options: ConnectOptions,
    pending: Pending,
    link: watch::Sender<Link>,
    events: Mutex<Events>,
    state: watch::Sender<Option<Payload>>,
    /// `class`, `name` and connection id, as the server last announced them.
    identity: Mutex<(String, String, String)>,
    next_id: AtomicU64,
}

impl Inner {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        lock(&self.pending)
    }
}

/// The events an agent pushes to the transport, for [`Transport::events`]. Their channel (1,024
/// slots, about 100 KB) is made by the first event or the first `events()`, not by every
/// connection: most clients only call.
#[derive(Default)]
struct Events {
    sender: Option<broadcast::Sender<Payload>>,
    /// Subscribed when an event made the channel: the first `events()` takes it, so that no
    /// event since the transport connected (say, what `on_connect` sent) is lost to it.
    first: Option<broadcast::Receiver<Payload>>,
}

impl Events {
    /// How many events a subscriber may fall behind before it misses some.
    const CAPACITY: usize = 1024;

    fn send(&mut self, event: Payload) {
        let sender = match &mut self.sender {
            Some(sender) => sender,
            None => {
                let (sender, first) = broadcast::channel(Self::CAPACITY);
                self.first = Some(first);
                self.sender.insert(sender)
            }
        };
        let _ = sender.send(event);
    }

    fn subscribe(&mut self) -> broadcast::Receiver<Payload> {
        if let Some(first) = self.first.take() {
            return first;
        }
        self.sender
            .get_or_insert_with(|| broadcast::channel(Self::CAPACITY).0)
            .subscribe()
    }
}

/// A connection to one agent (`ws://host/agents/{class}/{name}`) that reconnects by itself.
pub struct WsTransport {
    inner: Arc<Inner>,
    /// Dropping it stops the background task.
    _stop: oneshot::Sender<()>,
}

/// Small buffers: tungstenite zeroes the whole read buffer before every read, and replies are
/// small (a large one still arrives whole: the buffer grows for it). The server sends each
/// message as one frame: the largest frame is the largest message.
fn socket_config(options: &ConnectOptions) -> WebSocketConfig {
    let max = Some(options.max_message_bytes);
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
}

/// Opens one connection and reads the server's identity frame.
async fn open(
    url: &str,
    options: &ConnectOptions,
) -> Result<(Socket, (String, String, String)), ConnectError> {
    let shown = redact(url);
    let mut request = url
        .into_client_request()
        .map_err(|_| ConnectError::Url(shown.clone()))?;
    let Some(subprotocol) = framing::subprotocol(options.codec) else {
        return Err(ConnectError::Protocol(
            "Codec::Value is for in-process calls; connect with Codec::Postcard or Codec::Json"
                .into(),
        ));
    };
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        subprotocol.parse().expect("a valid header value"),
    );
    for (name, value) in &options.headers {
        let header = (
            name.parse::<tokio_tungstenite::tungstenite::http::HeaderName>(),
            value.parse::<tokio_tungstenite::tungstenite::http::HeaderValue>(),
        );
        let (Ok(name), Ok(value)) = header else {
            return Err(ConnectError::Protocol(format!("invalid header `{name}`")));
        };
        headers.append(name, value);
    }
    let (mut socket, response) =
        tokio_tungstenite::connect_async_with_config(request, Some(socket_config(options)), false)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(response) => ConnectError::Refused {
                    url: shown.clone(),
                    status: response.status().as_u16(),
                    body: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                        .into_owned(),
                },
                e => ConnectError::Handshake {
                    url: shown.clone(),
                    reason: e.to_string(),
                },
            })?;
    let chosen = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    if chosen != Some(subprotocol) {
        return Err(ConnectError::Protocol(format!(
            "{shown} does not speak {subprotocol}"
        )));
    }
    let first = socket.next().await.and_then(|f| f.ok());
    if let Some(Message::Close(Some(frame))) = &first {
        let code = u16::from(frame.code);
        if (4000..5000).contains(&code) {
            return Err(ConnectError::Refused {
                url: shown,
                status: code,
                body: frame.reason.to_string(),
            });
        }
    }
    match first.and_then(|f| framing::read(options.codec, &f)) {
        Some(Received::Identity { class, name, conn }) => Ok((socket, (class, name, conn))),
        Some(_) => Err(ConnectError::Protocol(format!(
            "{shown} did not identify itself"
        ))),
        None => Err(ConnectError::Protocol(format!(
            "{shown} closed before identifying itself"
        ))),
    }
}

impl WsTransport {
    /// Connects with the postcard codec and waits for the server's identity frame. Fails if
    /// the first connection cannot be made; later disconnections are repaired in the
    /// background.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        Self::connect_with(url, ConnectOptions::default()).await
    }

    /// Connects with `options` (headers, codec, timeout).
    pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<Self, ConnectError> {
        let (socket, identity) = open(url, &options).await?;
        let inner = Arc::new(Inner {
            url: url.to_owned(),
            options,
            pending: Mutex::default(),
            link: watch::channel(Link::Down).0,
            events: Mutex::default(),
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
        lock(&self.inner.identity).clone()
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
        let (sink, stream) = socket.split();
        let (out, queued) = Outgoing::new(sink);
        inner.link.send_replace(Link::Up(generation, out.clone()));
        let ended = run(&inner, stream, out, queued, &mut stopped).await;
        let stop = matches!(ended, Ended::Dropped);
        // Marked down before the calls in flight are failed: a call either sees the link down
        // or is failed here.
        inner
            .link
            .send_replace(if stop { Link::Closed } else { Link::Down });
        for (_, waiter) in inner.pending().drain() {
            waiter.fail(match &ended {
                Ended::Lost(Some(why)) => failed(why),
                _ => disconnected(),
            });
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
            match open(&inner.url, &inner.options).await {
                Ok((socket, identity)) => {
                    *lock(&inner.identity) = identity;
                    tracing::debug!(url = %redact(&inner.url), "reconnected");
                    break socket;
                }
                Err(e) => {
                    tracing::debug!(url = %redact(&inner.url), "reconnecting failed, retrying in {delay:?}: {e}");
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        };
    }
}

/// How a connection ended.
enum Ended {
    /// The transport was dropped.
    Dropped,
    /// The connection was lost; why, if reading it failed.
    Lost(Option<String>),
}

/// Serves one connection until the transport is dropped or the connection lost. Queued
/// frames are written by a task of their own, so that replies are read while calls are being
/// written.
async fn run(
    inner: &Inner,
    mut stream: futures_util::stream::SplitStream<Socket>,
    out: Outgoing,
    queued: mpsc::UnboundedReceiver<Message>,
    stopped: &mut oneshot::Receiver<()>,
) -> Ended {
    let (stop_writer, writer_stopped) = oneshot::channel();
    let mut writer = tokio::spawn(write(out, queued, writer_stopped));
    let ended = loop {
        tokio::select! {
            _ = &mut *stopped => break Ended::Dropped,
            _ = &mut writer => break Ended::Lost(None), // it could not write
            frame = stream.next() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        tracing::debug!(url = %redact(&inner.url), "the connection failed: {e}");
                        break Ended::Lost(Some(e.to_string()));
                    }
                    None => break Ended::Lost(None),
                };
                if let Some(received) = framing::read(inner.options.codec, &frame) {
                    read(inner, received);
                }
            }
        }
    };
    if let Ended::Dropped = ended {
        let _ = stop_writer.send(()); // it closes the socket
        let _ = writer.await;
    } else {
        writer.abort();
    }
    ended
}

/// Writes the frames queued for one connection until it fails or is stopped.
async fn write(
    out: Outgoing,
    mut outbound: mpsc::UnboundedReceiver<Message>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stopped => {
                let mut sink = out.0.sink.lock().await;
                let bye = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                let _ = sink.send(Message::Close(Some(bye))).await;
                let _ = sink.close().await;
                return;
            }
            message = outbound.recv() => {
                // What is queued goes out together: one write for many frames.
                let mut sink = out.0.sink.lock().await;
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
fn read(inner: &Inner, received: Received) {
    match received {
        Received::Reply { id, result } => match inner.pending().remove(&id) {
            Some(Waiter::Call(tx)) => drop(tx.send(result)),
            // A stream's final reply is `()`.
            Some(Waiter::Stream(tx)) => match result {
                Ok(end) if framing::is_end(&end) => {}
                Ok(_) => drop(tx.send(Err(RawError::internal(
                    "the agent answered with a value: the callable does not stream",
                )))),
                Err(e) => drop(tx.send(Err(e))),
            },
            None => {}
        },
        Received::Chunk { id, data } => {
            if let Some(Waiter::Stream(tx)) = inner.pending().get(&id) {
                let _ = tx.send(Ok(data));
            }
        }
        Received::Event(data) => {
            lock(&inner.events).send(data);
        }
        Received::State(state) => {
            inner.state.send_replace(Some(state));
        }
        Received::Error(e) => tracing::warn!("the server reports an error: {e}"),
        Received::Identity { .. } => {}
        Received::Unknown(what) => tracing::warn!("the server sent {what}"),
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

/// What the calls in flight are told when reading their connection failed `why`.
fn failed(why: &str) -> RawError {
    RawError::internal(format!(
        "the connection failed before the reply arrived ({why}); the call may or may not have run"
    ))
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
    out: Outgoing,
    inner: Arc<Inner>,
}

impl Inner {
    fn codec(&self) -> Codec {
        self.options.codec
    }
}

/// How many chunks of a stream may be on their way (or waiting) ahead of its reader.
const STREAM_WINDOW: u32 = 32;

impl CancelOnDrop {
    /// Lets the call's stream send `chunks` more chunks.
    fn credit(&self, chunks: u32) {
        let _ = self
            .out
            .queue(framing::credit(self.inner.codec(), self.id, chunks));
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.inner.pending().remove(&self.id).is_some() {
            let _ = self.out.queue(framing::cancel(self.inner.codec(), self.id));
        }
    }
}

/// Waits (until `deadline`) for a connection, registers call `id` on it, and returns the
/// connection's way out, and whether the call is alone in flight on it.
async fn register(
    inner: &Inner,
    id: u64,
    waiter: Waiter,
    deadline: Instant,
) -> Result<(Outgoing, bool), RawError> {
    let connected = match &*inner.link.borrow() {
        Link::Up(generation, out) => Some((*generation, out.clone())),
        _ => None,
    };
    let (generation, out) = match connected {
        Some(up) => up,
        None => reconnected(inner, deadline).await?,
    };
    let alone = {
        let mut pending = inner.pending();
        pending.insert(id, waiter);
        pending.len() == 1
    };
    // Checked after registering: the supervisor marks the link down before it fails what is
    // pending, so the call is either failed by it or sees the change here.
    let still = matches!(&*inner.link.borrow(), Link::Up(g, _) if *g == generation);
    if !still {
        inner.pending().remove(&id);
        return Err(disconnected());
    }
    Ok((out, alone))
}

/// Waits (until `deadline`) for the transport to be connected again.
async fn reconnected(inner: &Inner, deadline: Instant) -> Result<(u64, Outgoing), RawError> {
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
                            redact(&inner.url)
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
    if call.args.codec() != inner.codec() {
        return Err(RawError::bad_args(format!(
            "this connection speaks {:?}, not {:?}",
            inner.codec(),
            call.args.codec()
        )));
    }
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let streams = matches!(waiter, Waiter::Stream(_));
    let (out, alone) = register(inner, id, waiter, deadline).await?;
    // From here on, dropping the guard takes the call back (and cancels it, in case it went
    // out whole or in part; a cancel of a call the server never saw is ignored).
    let guard = CancelOnDrop {
        id,
        out,
        inner: inner.clone(),
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    let deadline_ms = remaining.as_millis() as u64;
    let frame = framing::call(
        inner.codec(),
        id,
        call.method.into_owned(),
        call.args,
        deadline_ms,
        crate::trace::current(),
    )?;
    // Flow control from the first chunk: the credit goes before the call.
    let credit = streams.then(|| framing::credit(inner.codec(), id, STREAM_WINDOW));
    let frames = credit.into_iter().chain([frame]);
    guard.out.send(frames, alone, deadline).await?;
    Ok(guard)
}

impl Transport for WsTransport {
    fn call(&self, call: OutgoingCall) -> BoxFuture<'static, Result<Payload, RawError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let timeout = call.timeout.unwrap_or(inner.options.timeout);
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
            let timeout = call.timeout.unwrap_or(inner.options.timeout);
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
        redact(&self.inner.url)
    }

    fn codec(&self) -> Codec {
        self.inner.codec()
    }

    fn events(&self) -> Option<broadcast::Receiver<Payload>> {
        Some(lock(&self.inner.events).subscribe())
    }

    fn state(&self) -> Option<watch::Receiver<Option<Payload>>> {
        Some(self.inner.state.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u32) -> Payload {
        Codec::Json.encode(&n).unwrap()
    }

    fn next(rx: &mut broadcast::Receiver<Payload>) -> Option<u32> {
        rx.try_recv().ok().map(|p| p.decode().unwrap())
    }

    #[test]
    fn the_first_subscriber_gets_every_event_and_a_client_that_only_calls_makes_no_channel() {
        let mut events = Events::default();
        assert!(events.sender.is_none(), "no channel before an event");
        events.send(event(1));
        events.send(event(2));
        let mut first = events.subscribe();
        let mut later = events.subscribe();
        events.send(event(3));
        assert_eq!([next(&mut first), next(&mut first)], [Some(1), Some(2)]);
        assert_eq!(next(&mut first), Some(3));
        assert_eq!(next(&mut later), Some(3), "a later one from when it came");
        assert_eq!(next(&mut later), None);
    }

    #[test]
    fn a_subscriber_before_any_event_gets_them_all() {
        let mut events = Events::default();
        let mut rx = events.subscribe();
        events.send(event(1));
        assert_eq!(next(&mut rx), Some(1));
        let mut second = events.subscribe();
        events.send(event(2));
        assert_eq!((next(&mut rx), next(&mut second)), (Some(2), Some(2)));
    }
}
