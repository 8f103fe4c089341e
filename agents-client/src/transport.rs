//! How a typed client reaches an agent: the [`Transport`] trait and the core every generated
//! client wraps.

use std::{
    borrow::Cow, fmt, future::Future, marker::PhantomData, pin::Pin, sync::Arc, time::Duration,
};

use futures_util::{stream::BoxStream, Stream, StreamExt};
use serde::{de::DeserializeOwned, Serialize};

use tokio::sync::{broadcast, watch};

use crate::{
    error::{ErrorKind, RawError, RpcError},
    payload::{Codec, Payload},
    stream::{self, CallStream, EventStream, StateStream},
};

/// A boxed, sendable future, as transports return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One call as a transport carries it.
#[derive(Debug, Clone)]
pub struct OutgoingCall {
    /// The callable's wire name.
    pub method: Cow<'static, str>,
    /// The arguments, encoded as a tuple.
    pub args: Payload,
    /// How long the caller waits; the agent skips the call if it is dequeued after that.
    pub timeout: Option<Duration>,
}

/// The instant `timeout` from now; a timeout too long to count (`Duration::MAX`) ends in 30
/// years instead of overflowing.
#[doc(hidden)]
pub fn deadline_in(timeout: Duration) -> tokio::time::Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    tokio::time::Instant::now() + timeout.min(FAR)
}

/// Carries calls to one agent: in-process (the runtime's local transport) or over a network.
///
/// A transport returns the encoded result, or a [`RawError`]; the generated client decodes both.
pub trait Transport: Send + Sync + 'static {
    /// Sends `call` and waits for its reply.
    fn call(&self, call: OutgoingCall) -> BoxFuture<'static, Result<Payload, RawError>>;

    /// Sends `call` to a streaming callable and returns its chunks as they arrive. The
    /// default: this transport cannot stream.
    fn call_stream(&self, call: OutgoingCall) -> BoxFuture<'static, RawStream> {
        let e = RawError::internal(format!(
            "`{}`: {} cannot carry streaming calls",
            call.method,
            self.describe()
        ));
        Box::pin(async move { RawStream::failed(e) })
    }

    /// A short description of the target, for `Debug` output (e.g. `counter/bob`).
    fn describe(&self) -> String;

    /// How this transport wants arguments: encoded (postcard, the default, or JSON), or passed
    /// as they are ([`Codec::Value`], in-process).
    fn codec(&self) -> Codec {
        Codec::Postcard
    }

    /// Subscribes to the events the agent sends to this client's connection (postcard). `None`
    /// (the default): this transport has no connection to receive events on.
    fn events(&self) -> Option<broadcast::Receiver<Payload>> {
        None
    }

    /// The agent's shared state as the connection last received it (postcard). `None` (the
    /// default): this transport does not receive the state.
    fn state(&self) -> Option<watch::Receiver<Option<Payload>>> {
        None
    }
}

/// What every generated client holds: a transport and a per-call timeout.
#[derive(Clone)]
pub struct ClientCore {
    transport: Arc<dyn Transport>,
    timeout: Option<Duration>,
}

impl ClientCore {
    /// A client core over `transport`, with the transport's default timeout.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        ClientCore {
            transport,
            timeout: None,
        }
    }

    /// Sets the timeout of every call made through this core.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Calls `method` with `args` (a tuple) and decodes the reply.
    pub async fn call<A, T, E>(&self, method: &'static str, args: A) -> Result<T, RpcError<E>>
    where
        A: Serialize + Send + 'static,
        T: DeserializeOwned + 'static,
        E: DeserializeOwned + 'static,
    {
        let args = self
            .transport
            .codec()
            .pass(args)
            .map_err(|e| RpcError::BadArgs(format!("could not encode the arguments: {e}")))?;
        let call = OutgoingCall {
            method: Cow::Borrowed(method),
            args,
            timeout: self.timeout,
        };
        match self.transport.call(call).await {
            Ok(reply) => reply.decode().map_err(|e| {
                RpcError::Internal(format!("could not decode the reply of `{method}`: {e}"))
            }),
            Err(raw) => Err(raw.into_typed()),
        }
    }

    /// Calls the streaming callable `method` with `args` (a tuple); its chunks arrive typed.
    pub async fn call_stream<A, T, E>(&self, method: &'static str, args: A) -> CallStream<T, E>
    where
        A: Serialize + Send + 'static,
        T: DeserializeOwned + 'static,
        E: DeserializeOwned + 'static,
    {
        let raw = match self.transport.codec().pass(args) {
            Ok(args) => {
                let call = OutgoingCall {
                    method: Cow::Borrowed(method),
                    args,
                    timeout: self.timeout,
                };
                self.transport.call_stream(call).await
            }
            Err(e) => RawStream::failed(RawError::bad_args(format!(
                "could not encode the arguments: {e}"
            ))),
        };
        CallStream::new(method, raw)
    }
}

/// The encoded chunks of a streaming call, as a transport delivers them: `Ok` chunks, then the
/// end (the stream ends) or an error (the last item). Dropping it gives up on the call.
pub struct RawStream {
    inner: Option<BoxStream<'static, Result<Payload, RawError>>>,
    idle: Option<Duration>,
}

impl RawStream {
    /// The chunks of `stream`; waiting longer than `idle` for one fails the stream with
    /// `timeout`.
    pub fn new(
        stream: impl Stream<Item = Result<Payload, RawError>> + Send + 'static,
        idle: Option<Duration>,
    ) -> Self {
        RawStream {
            inner: Some(stream.boxed()),
            idle,
        }
    }

    /// The same stream, failing with `timeout` after waiting longer than `idle` for a chunk.
    pub fn with_idle(mut self, idle: Duration) -> Self {
        self.idle = Some(idle);
        self
    }

    /// A stream whose only item is `error`.
    pub fn failed(error: RawError) -> Self {
        RawStream::new(futures_util::stream::once(async { Err(error) }), None)
    }

    /// The next chunk; `None` once the stream ended (after its last chunk or its error).
    pub async fn next(&mut self) -> Option<Result<Payload, RawError>> {
        let inner = self.inner.as_mut()?;
        let item = match self.idle {
            None => inner.next().await,
            Some(idle) => match tokio::time::timeout(idle, inner.next()).await {
                Ok(item) => item,
                Err(_) => Some(Err(RawError::new(
                    ErrorKind::Timeout,
                    format!("no chunk within {idle:?}"),
                ))),
            },
        };
        if !matches!(item, Some(Ok(_))) {
            self.inner = None; // ended: let go of the call now
        }
        item
    }
}

impl fmt::Debug for RawStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawStream")
            .field("ended", &self.inner.is_none())
            .field("idle", &self.idle)
            .finish()
    }
}

impl ClientCore {
    /// The agent's events, typed (see [`Transport::events`]).
    pub fn events<E: DeserializeOwned + 'static>(&self) -> EventStream<E> {
        EventStream::new(self.transport.events())
    }

    /// The agent's shared state as last received, typed.
    pub fn state<S: DeserializeOwned + 'static>(&self) -> Option<S> {
        self.transport.state().and_then(|rx| stream::latest(&rx))
    }

    /// The changes of the agent's shared state, typed.
    pub fn state_changes<S: DeserializeOwned + 'static>(&self) -> StateStream<S> {
        StateStream::new(self.transport.state())
    }
}

impl fmt::Debug for ClientCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCore")
            .field("target", &self.transport.describe())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A call to agent type `A`, described but not sent: a method name and encoded arguments.
///
/// Generated by `A::calls().method(args..)`, so a wrong argument type is a compile error. The
/// runtime stores it (the name and the arguments as a JSON array, never a position) for
/// schedules and queues: JSON, so that a stored call still reads after its argument types
/// evolve as serde allows (a field added with a default, say).
pub struct MethodCall<A> {
    method: &'static str,
    args: Result<serde_json::Value, String>,
    _agent: PhantomData<fn() -> A>,
}

impl<A> MethodCall<A> {
    /// Describes a call of `method` with `args` (a tuple).
    pub fn new<T: Serialize + ?Sized>(method: &'static str, args: &T) -> Self {
        let args = serde_json::to_value(args).map_err(|e| e.to_string());
        MethodCall {
            method,
            args,
            _agent: PhantomData,
        }
    }

    /// The callable's wire name.
    pub fn method(&self) -> &'static str {
        self.method
    }

    /// The arguments as a JSON array, or why they could not be encoded.
    pub fn args(&self) -> Result<&serde_json::Value, &str> {
        self.args.as_ref().map_err(String::as_str)
    }
}

impl<A> fmt::Debug for MethodCall<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MethodCall")
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl<A> Clone for MethodCall<A> {
    fn clone(&self) -> Self {
        MethodCall {
            method: self.method,
            args: self.args.clone(),
            _agent: PhantomData,
        }
    }
}

/// Implemented by the client `#[interface]` generates: the types its agent's connections carry,
/// and its methods.
#[doc(hidden)]
pub trait Interface {
    /// The shared state.
    type State;
    /// What the agent sends to connections.
    type Event;
    /// Every method, by wire name.
    const METHODS: &'static [MethodInfo];
}

/// A static description of one callable, for introspection and tooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    /// The wire name.
    pub name: &'static str,
    /// The parameters as written, e.g. `["by: i64"]`.
    pub params: &'static [&'static str],
    /// The success type as written.
    pub returns: &'static str,
    /// The application error type as written, if the callable returns a `Result`.
    pub error: Option<&'static str>,
    /// `#[callable(internal)]`: callable only in-process, not over the network.
    pub internal: bool,
}
