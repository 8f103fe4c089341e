//! What an agent is: the [`Agent`] trait a user implements, the [`AgentClass`] trait that
//! `#[agent]` implements, and the convenient [`AppError`].

use std::{borrow::Cow, fmt, future::Future};

use agents_client::{
    BoxFuture, Codec, ErrorKind, FrameworkError, MethodInfo, Payload, RawError, RawStream,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    conn::{Conn, WsMessage},
    context::Ctx,
    lock::lock,
    schedule::{AlarmInfo, StaticSchedule},
    stream::Streaming,
};

/// An HTTP request for [`Agent::on_request`], its body already read (up to the runtime's
/// message-size limit).
pub type HttpRequest = axum::http::Request<axum::body::Bytes>;
/// What [`Agent::on_request`] answers (build one with [`axum::response::IntoResponse`]).
pub type HttpResponse = axum::response::Response;
/// The head of an HTTP request (method, URI, headers), as the admission hooks see it.
pub type RequestHead = axum::http::request::Parts;

/// What `on_before_connect` and `on_before_request` decide: `Ok(None)` lets the request in,
/// `Ok(Some(principal))` lets it in and passes `principal` on (see [`Conn::principal`] and the
/// [`Principal`] extension of an [`HttpRequest`]), `Err(response)` answers with `response`
/// without waking the agent.
pub type Admission = Result<Option<String>, HttpResponse>;

/// Refuses a connection or a request in an admission hook (`Err(agents::refuse(..))`), in a way
/// a browser can read: a refused WebSocket handshake reaches JavaScript only as "could not
/// connect", so the WebSocket is accepted and closed at once with `code` (4000 to 4999, e.g.
/// 4401, 4403, 4429) and `reason`; the JavaScript client rejects with both. An HTTP request
/// gets the matching status (`code - 4000`: 401, 403, 429; 403 when that is not an HTTP error
/// status) with `reason` as its body; add headers (`Retry-After`) to the response as you like.
/// A `code` of 400 to 599 is taken as `4000 + code`.
///
/// ```
/// # use agents::prelude::*;
/// # #[derive(Default)] struct Room;
/// impl Agent for Room {
///     async fn on_before_connect(_name: &str, req: &RequestHead) -> Admission {
///         match req.uri.query() {
///             Some("token=s3cret") => Ok(Some("ann".into())),
///             _ => Err(agents::refuse(4401, "who are you?")),
///         }
///     }
/// }
/// ```
pub fn refuse(code: u16, reason: &str) -> HttpResponse {
    use axum::response::IntoResponse;
    let code = match code {
        400..=599 => code + 4000,
        4000..=4999 => code,
        _ => 4403,
    };
    let status = axum::http::StatusCode::from_u16(code - 4000)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(axum::http::StatusCode::FORBIDDEN);
    let reason = crate::conn::close_reason(reason);
    let mut response = (status, reason.clone()).into_response();
    response.extensions_mut().insert(Refusal { code, reason });
    response
}

/// Marks the response of [`refuse`]: WebSockets are closed with this code instead.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub code: u16,
    pub reason: String,
}

/// The principal `on_before_request` passed on, as an extension of the [`HttpRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

/// The lifecycle of an agent. Every hook has a no-op default, so `impl Agent for X {}` is a
/// complete implementation.
///
/// Each hook runs as an event of its own kind: inside the agent's single turn, inside a SQLite
/// savepoint (an `Err` or a panic rolls its writes back).
pub trait Agent: Sized + Send + 'static {
    /// Runs when the agent is created in memory: on its first event after start-up, after
    /// hibernation, and after a handler panicked. Load caches, run migrations
    /// (`ctx.migrate(..)`), etc. If it fails, the event that woke the agent fails with it and
    /// the next event tries again.
    fn on_start(
        &mut self,
        ctx: &mut Ctx<Self>,
    ) -> impl Future<Output = Result<(), AppError>> + Send {
        let _ = ctx;
        async { Ok(()) }
    }

    /// Runs when the agent's alarm (`ctx.set_alarm(..)`) goes off. An `Err` or a panic rolls
    /// its writes back and retries it with backoff, like any scheduled row (`info` says which
    /// attempt this is); after [`RETRIES`](crate::RETRIES) retries it becomes a dead letter.
    fn on_alarm(
        &mut self,
        ctx: &mut Ctx<Self>,
        info: AlarmInfo,
    ) -> impl Future<Output = Result<(), AppError>> + Send {
        let _ = (ctx, info);
        async { Ok(()) }
    }

    /// Decides whether a WebSocket may connect, *before* the agent is woken: it runs on the
    /// request's task and has no `self`. `name` is the agent's name; `request` the upgrade
    /// request (headers, URI). The default lets everyone in.
    fn on_before_connect(
        name: &str,
        request: &RequestHead,
    ) -> impl Future<Output = Admission> + Send {
        let _ = (name, request);
        async { Ok(None) }
    }

    /// Like [`on_before_connect`](Agent::on_before_connect), for HTTP requests to the agent's
    /// paths (`POST .../call/{method}` and whatever reaches [`on_request`](Agent::on_request)).
    fn on_before_request(
        name: &str,
        request: &RequestHead,
    ) -> impl Future<Output = Admission> + Send {
        let _ = (name, request);
        async { Ok(None) }
    }

    /// A WebSocket connected (its identity frame is already sent). An `Err` or a panic refuses
    /// it: its writes are rolled back and the socket is closed with 1008 and the error.
    fn on_connect(
        &mut self,
        ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
    ) -> impl Future<Output = Result<(), AppError>> + Send {
        let _ = (ctx, conn);
        async { Ok(()) }
    }

    /// A message arrived: any data frame of a connection without a subprotocol, or a
    /// `message` frame of `agents.v1.json` / `agents.v1.postcard`. An `Err` rolls its writes
    /// back; the client gets an `error` frame (on a protocol connection) and stays connected.
    fn on_message(
        &mut self,
        ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        message: WsMessage,
    ) -> impl Future<Output = Result<(), AppError>> + Send {
        let _ = (ctx, conn, message);
        async { Ok(()) }
    }

    /// A connection closed: `code` and `reason` from the client's close frame, 1006 if the
    /// socket just went away, or the code the runtime closed it with (1008 for a client that
    /// does not read, 1009 for an oversize message, 1000 after the idle limit). The
    /// connection's stored state and tags are deleted after this hook.
    fn on_close(
        &mut self,
        ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        code: u16,
        reason: &str,
    ) -> impl Future<Output = Result<(), AppError>> + Send {
        let _ = (ctx, conn, code, reason);
        async { Ok(()) }
    }

    /// A connection failed (a protocol error, an oversize message, a client that does not read
    /// its frames); `on_close` follows.
    fn on_error(
        &mut self,
        ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        error: &str,
    ) -> impl Future<Output = Result<(), AppError>> + Send {
        let _ = (ctx, conn, error);
        async { Ok(()) }
    }

    /// An HTTP request to any other path under the agent's (`/agents/{class}/{name}/..`, or a
    /// `GET` of the agent's path without a WebSocket upgrade). A transaction like any event:
    /// the response leaves once its writes are durable. The default answers 404.
    fn on_request(
        &mut self,
        ctx: &mut Ctx<Self>,
        request: HttpRequest,
    ) -> impl Future<Output = Result<HttpResponse, AppError>> + Send {
        let _ = (ctx, request);
        async {
            use axum::response::IntoResponse;
            Ok((axum::http::StatusCode::NOT_FOUND, "not found").into_response())
        }
    }
}

/// Implemented by `#[agent]`: the class name, the dispatch by method name and the typed client.
/// Not implemented by hand.
pub trait AgentClass: Agent + Default {
    /// The class in addresses: kebab-case of the type name unless `#[agent(class = "..")]`.
    const CLASS: &'static str;
    /// `#[agent(internal)]`: reachable only in-process (the network gets 404).
    const INTERNAL: bool = false;
    /// Every callable, by wire name.
    const METHODS: &'static [MethodInfo];
    /// The `#[schedule(..)]` methods.
    #[doc(hidden)]
    const SCHEDULES: &'static [StaticSchedule] = &[];
    /// The shared state (`#[agent(state = "T")]`, `()` by default): [`Ctx::set_state`] stores
    /// it and pushes it to every connection.
    type State: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Each connection's state (`#[agent(conn_state = "T")]`, `()` by default):
    /// [`Conn::set_state`].
    type ConnState: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What the agent sends to connections (`#[agent(event = "T")]`, `()` by default):
    /// [`Conn::send`], [`Ctx::broadcast`]; typed clients receive it from `events()`.
    type Event: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The generated typed client (`CounterClient` for `Counter`).
    type Client: From<agents_client::ClientCore> + Clone + Send + Sync + 'static;

    /// Runs the callable named by `call`.
    #[doc(hidden)]
    fn dispatch<'a>(
        &'a mut self,
        ctx: &'a mut Ctx<Self>,
        call: &'a Invocation,
    ) -> BoxFuture<'a, Result<Payload, RawError>>;
}

/// Where a call comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Rust code in this process: another agent, a client of the runtime.
    Local,
    /// The network: HTTP or a WebSocket.
    Remote,
    /// The runtime itself: a schedule firing.
    Runtime,
}

/// One incoming call: the method's wire name and its encoded arguments. The reply is encoded in
/// the same codec as the arguments.
#[derive(Debug)]
pub struct Invocation {
    method: Cow<'static, str>,
    args: Payload,
    origin: Origin,
    /// What a streaming callable returned, for the runtime to hand to the caller.
    stream: std::sync::Mutex<Option<RawStream>>,
}

impl Invocation {
    /// A call of `method` with `args` (a tuple) from `origin`.
    pub(crate) fn new(method: impl Into<Cow<'static, str>>, args: Payload, origin: Origin) -> Self {
        Invocation {
            method: method.into(),
            args,
            origin,
            stream: Default::default(),
        }
    }

    /// A call that came over the network.
    pub(crate) fn remote(method: impl Into<Cow<'static, str>>, args: Payload) -> Self {
        Self::new(method, args, Origin::Remote)
    }

    /// A call made by the runtime itself (a schedule firing), which may reach `#[schedule]`
    /// methods that clients cannot call.
    pub(crate) fn internal(method: impl Into<Cow<'static, str>>, args: Payload) -> Self {
        Self::new(method, args, Origin::Runtime)
    }

    /// Whether the runtime itself made this call.
    #[doc(hidden)]
    pub fn is_internal(&self) -> bool {
        self.origin == Origin::Runtime
    }

    /// Whether this call came over the network (`#[callable(internal)]` methods refuse it).
    #[doc(hidden)]
    pub fn is_remote(&self) -> bool {
        self.origin == Origin::Remote
    }

    /// The wire name of the method called.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Decodes the arguments as the tuple `T`.
    #[doc(hidden)]
    pub fn args<T: DeserializeOwned + 'static>(&self) -> Result<T, RawError> {
        self.args
            .decode()
            .map_err(|e| RawError::bad_args(format_args!("`{}`: {e}", self.method)))
    }

    /// Checks that no arguments were passed.
    #[doc(hidden)]
    pub fn no_args(&self) -> Result<(), RawError> {
        self.args
            .expect_empty()
            .map_err(|e| RawError::bad_args(format_args!("`{}`: {e}", self.method)))
    }

    fn codec(&self) -> Codec {
        self.args.codec()
    }

    /// Encodes (or passes, in-process) a plain return value.
    #[doc(hidden)]
    pub fn ok<T: Serialize + Send + 'static>(&self, value: T) -> Result<Payload, RawError> {
        self.codec().pass(value).map_err(|e| {
            RawError::internal(format_args!(
                "could not encode the result of `{}`: {e}",
                self.method
            ))
        })
    }

    /// Encodes a `Result` return value; `Err` becomes an `app` error carrying the typed value.
    #[doc(hidden)]
    pub fn result<T, E>(&self, r: Result<T, E>) -> Result<Payload, RawError>
    where
        T: Serialize + Send + 'static,
        E: Serialize + fmt::Display + Send + 'static,
    {
        match r {
            Ok(v) => self.ok(v),
            Err(e) => Err(self.error(e)),
        }
    }

    /// A callable's error: `app` with its data, unless it is an [`AppError`] that carries the
    /// kind of a failed call to another agent.
    fn error<E: Serialize + fmt::Display + Send + 'static>(&self, e: E) -> RawError {
        let e: Box<dyn std::any::Any + Send> = Box::new(e);
        match e.downcast::<AppError>() {
            Ok(app) => app.into_raw(self.codec()),
            Err(e) => {
                let e = e.downcast::<E>().expect("the error's own type");
                RawError::app(self.codec(), *e)
            }
        }
    }
}

impl Invocation {
    /// Keeps the stream a streaming callable returned (its `Err` fails the call as `app`).
    #[doc(hidden)]
    pub fn stream<T, E, SE>(&self, r: Result<Streaming<T, SE>, E>) -> Result<Payload, RawError>
    where
        T: Serialize + Send + 'static,
        E: Serialize + fmt::Display + Send + 'static,
        SE: Serialize + fmt::Display + Send + 'static,
    {
        let stream = r.map_err(|e| self.error(e))?;
        let stream = stream.encode(self.codec(), self.method.clone().into_owned());
        *lock(&self.stream) = Some(stream);
        Ok(Payload::Postcard(Vec::new()))
    }

    /// The stream a streaming callable returned, if this was one.
    pub(crate) fn take_stream(&self) -> Option<RawStream> {
        lock(&self.stream).take()
    }
}

/// A ready-made application error: a message, serializable, and convertible from any error
/// with `?` (rusqlite, the runtime's [`Error`](crate::Error), I/O, ...).
///
/// A failed call to another agent keeps its kind through `?`: a callable that lets another
/// agent's `Timeout`, `Overloaded` or `Cycle` pass fails with that kind (HTTP 504, 503, 500),
/// not as `app` (422). Only errors of the application itself are `app`.
///
/// The runtime's own trouble that reaches a handler through `?` — a SQLite error, an I/O
/// error, an internal [`Error`](crate::Error) — fails the call as `internal`, and the client is
/// told only a reference: the SQL, table names and file paths go to the server's log (at error
/// level, under that reference), not to whoever called. Make an error the client should read
/// with [`AppError::msg`].
///
/// ```
/// use agents::{AppError, ErrorKind, RpcError};
/// fn parse(s: &str) -> Result<i64, AppError> {
///     let n: i64 = s.parse()?;
///     if n < 0 { return Err(AppError::msg("negative")); }
///     Ok(n)
/// }
/// assert_eq!(parse("-1").unwrap_err().to_string(), "negative");
/// assert_eq!(parse("x").unwrap_err().kind(), ErrorKind::App);
///
/// let timeout: Result<(), RpcError> = Err(RpcError::Timeout);
/// let passed = (|| -> Result<(), AppError> { Ok(timeout?) })();
/// assert_eq!(passed.unwrap_err().kind(), ErrorKind::Timeout);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct AppError {
    /// What went wrong, for people.
    pub message: String,
    /// The framework kind of an error that came from another call (`None`: the application's).
    #[serde(skip)]
    framework: Option<ErrorKind>,
}

impl AppError {
    /// An error with `message`.
    pub fn msg(message: impl fmt::Display) -> Self {
        AppError {
            message: message.to_string(),
            framework: None,
        }
    }

    /// What kind of error the caller gets: `App`, or the kind of a failed call to another agent
    /// that this error carries.
    pub fn kind(&self) -> ErrorKind {
        self.framework.unwrap_or(ErrorKind::App)
    }

    /// As a wire error: `app` with this error as its data, or the framework kind it carries.
    pub(crate) fn into_raw(self, codec: Codec) -> RawError {
        match self.framework {
            Some(kind) => RawError::new(kind, self.message),
            None => RawError::app(codec, self),
        }
    }
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for AppError {
    /// Keeps a failed call's kind; makes the runtime's own trouble (SQLite, files, the runtime's
    /// internal [`Error`](crate::Error)s) an `internal` error whose detail goes to the log, not
    /// to the client (see [`AppError`]); any other error is the application's, with its message.
    fn from(e: E) -> Self {
        if let Some((kind, message)) = FrameworkError::find(&e) {
            return AppError {
                message,
                framework: Some(kind),
            };
        }
        if is_internal(&e) {
            return AppError {
                message: crate::error::hidden("a storage or i/o error", &e),
                framework: Some(ErrorKind::Internal),
            };
        }
        AppError::msg(e)
    }
}

/// Whether `e`, or an error in its chain of sources, is the runtime's own trouble: SQLite, I/O,
/// or an internal [`Error`](crate::Error).
fn is_internal(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.is::<rusqlite::Error>()
            || e.is::<std::io::Error>()
            || e.downcast_ref::<crate::Error>()
                .is_some_and(crate::Error::is_internal)
    })
}
