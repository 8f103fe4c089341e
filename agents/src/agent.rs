//! What an agent is: the [`Agent`] trait a user implements, the [`AgentClass`] trait that
//! `#[agent]` implements, and the convenient [`AppError`].

use std::{borrow::Cow, fmt, future::Future};

use agents_client::{BoxFuture, Codec, MethodInfo, Payload, RawError};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    context::Ctx,
    schedule::{AlarmInfo, StaticSchedule},
};

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
}

/// Implemented by `#[agent]`: the class name, the dispatch by method name and the typed client.
/// Not implemented by hand.
pub trait AgentClass: Agent + Default {
    /// The class in addresses: kebab-case of the type name unless `#[agent(class = "..")]`.
    const CLASS: &'static str;
    /// Every callable, by wire name.
    const METHODS: &'static [MethodInfo];
    /// The `#[schedule(..)]` methods.
    #[doc(hidden)]
    const SCHEDULES: &'static [StaticSchedule] = &[];
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

/// One incoming call: the method's wire name and its encoded arguments. The reply is encoded in
/// the same codec as the arguments.
#[derive(Debug)]
pub struct Invocation {
    method: Cow<'static, str>,
    args: Payload,
    internal: bool,
}

impl Invocation {
    /// A call of `method` with `args` (a tuple).
    pub fn new(method: impl Into<Cow<'static, str>>, args: Payload) -> Self {
        Invocation {
            method: method.into(),
            args,
            internal: false,
        }
    }

    /// A call made by the runtime itself (a schedule firing), which may reach `#[schedule]`
    /// methods that clients cannot call.
    pub(crate) fn internal(method: impl Into<Cow<'static, str>>, args: Payload) -> Self {
        Invocation {
            method: method.into(),
            args,
            internal: true,
        }
    }

    /// Whether the runtime itself made this call.
    #[doc(hidden)]
    pub fn is_internal(&self) -> bool {
        self.internal
    }

    /// The wire name of the method called.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Decodes the arguments as the tuple `T`.
    #[doc(hidden)]
    pub fn args<T: DeserializeOwned>(&self) -> Result<T, RawError> {
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

    /// Encodes a plain return value.
    #[doc(hidden)]
    pub fn ok<T: Serialize>(&self, value: &T) -> Result<Payload, RawError> {
        self.codec().encode(value).map_err(|e| {
            RawError::internal(format_args!(
                "could not encode the result of `{}`: {e}",
                self.method
            ))
        })
    }

    /// Encodes a `Result` return value; `Err` becomes an `app` error carrying the typed value.
    #[doc(hidden)]
    pub fn result<T: Serialize, E: Serialize + fmt::Display>(
        &self,
        r: Result<T, E>,
    ) -> Result<Payload, RawError> {
        match r {
            Ok(v) => self.ok(&v),
            Err(e) => Err(RawError::app(self.codec(), &e)),
        }
    }
}

/// A ready-made application error: a message, serializable, and convertible from any error
/// with `?` (rusqlite, the runtime's [`Error`](crate::Error), I/O, ...).
///
/// ```
/// use agents::AppError;
/// fn parse(s: &str) -> Result<i64, AppError> {
///     let n: i64 = s.parse()?;
///     if n < 0 { return Err(AppError::msg("negative")); }
///     Ok(n)
/// }
/// assert_eq!(parse("-1").unwrap_err().to_string(), "negative");
/// assert!(parse("x").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppError {
    /// What went wrong, for people.
    pub message: String,
}

impl AppError {
    /// An error with `message`.
    pub fn msg(message: impl fmt::Display) -> Self {
        AppError {
            message: message.to_string(),
        }
    }
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for AppError {
    fn from(e: E) -> Self {
        AppError::msg(e)
    }
}
