//! Errors a call can end with, in typed form ([`RpcError`]) and wire form ([`RawError`]).

use std::fmt;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::payload::{Codec, Payload};

/// What went wrong with a call, as the wire names it (`"kind"` in the JSON protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The handler ran and returned its own typed error.
    App,
    /// No callable of that name exists on the agent.
    UnknownMethod,
    /// The arguments could not be decoded into the callable's parameter types, or the call was
    /// addressed to something that cannot exist (an invalid agent name, an unregistered class).
    BadArgs,
    /// The deadline passed before a reply was released.
    Timeout,
    /// The caller gave up on the call before it ran.
    Cancelled,
    /// The agent (or the runtime) refused the call because it is over capacity.
    Overloaded,
    /// The call would have waited on an agent that is itself waiting on this call.
    Cycle,
    /// Anything else: a panicking handler, a storage failure, a shut-down runtime.
    Internal,
}

impl ErrorKind {
    /// The wire name, e.g. `"unknown_method"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::App => "app",
            ErrorKind::UnknownMethod => "unknown_method",
            ErrorKind::BadArgs => "bad_args",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Cycle => "cycle",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it travels: a kind, a human-readable message and, for [`ErrorKind::App`], the
/// application's typed error encoded in the call's codec.
#[derive(Debug, Clone, PartialEq)]
pub struct RawError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// A message for people; never parsed.
    pub message: String,
    /// The typed application error (only for [`ErrorKind::App`]).
    pub data: Option<Payload>,
}

impl RawError {
    /// An error of `kind` with `message` and no data.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RawError {
            kind,
            message: message.into(),
            data: None,
        }
    }

    /// `unknown_method` for `method`.
    pub fn unknown_method(method: &str) -> Self {
        Self::new(
            ErrorKind::UnknownMethod,
            format!("no callable named `{method}`"),
        )
    }

    /// `bad_args` with `message`.
    pub fn bad_args(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::BadArgs, message.to_string())
    }

    /// `internal` with `message`.
    pub fn internal(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Internal, message.to_string())
    }

    /// An application error: `message` is its `Display`, `data` the value in `codec`.
    pub fn app<E: Serialize + fmt::Display>(codec: Codec, error: &E) -> Self {
        match codec.encode(error) {
            Ok(data) => RawError {
                kind: ErrorKind::App,
                message: error.to_string(),
                data: Some(data),
            },
            Err(e) => Self::internal(format!(
                "could not encode the application error `{error}`: {e}"
            )),
        }
    }

    /// Turns this wire error into the typed error a client returns.
    pub fn into_typed<E: DeserializeOwned>(self) -> RpcError<E> {
        match self.kind {
            ErrorKind::App => match self.data.as_ref().map(Payload::decode::<E>) {
                Some(Ok(e)) => RpcError::App(e),
                Some(Err(e)) => RpcError::Internal(format!(
                    "application error `{}` could not be decoded: {e}",
                    self.message
                )),
                None => {
                    RpcError::Internal(format!("application error without data: {}", self.message))
                }
            },
            ErrorKind::UnknownMethod => RpcError::UnknownMethod(self.message),
            ErrorKind::BadArgs => RpcError::BadArgs(self.message),
            ErrorKind::Timeout => RpcError::Timeout,
            ErrorKind::Cancelled => RpcError::Cancelled,
            ErrorKind::Overloaded => RpcError::Overloaded(self.message),
            ErrorKind::Cycle => RpcError::Cycle(self.message),
            ErrorKind::Internal => RpcError::Internal(self.message),
        }
    }
}

impl fmt::Display for RawError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for RawError {}

/// The error of a typed call: the callable's own error `E`, or what the framework reports.
///
/// Callables that return a plain value (not a `Result`) use the uninhabited [`NoError`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RpcError<E = NoError> {
    /// The handler returned `Err(e)`. Its writes were rolled back.
    #[error("{0}")]
    App(E),
    /// The agent has no callable of this name (the caller is newer than the agent?).
    #[error("unknown method: {0}")]
    UnknownMethod(String),
    /// The arguments did not decode, or the address is invalid.
    #[error("bad arguments: {0}")]
    BadArgs(String),
    /// The deadline passed. The call may or may not have run.
    #[error("the call's deadline passed")]
    Timeout,
    /// The call was cancelled before it ran.
    #[error("the call was cancelled")]
    Cancelled,
    /// The agent or runtime is over capacity; nothing ran.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The call would deadlock: its target is waiting on this very call chain.
    #[error("call cycle: {0}")]
    Cycle(String),
    /// A panicking handler, a storage failure, a runtime that shut down.
    #[error("internal error: {0}")]
    Internal(String),
}

impl<E> RpcError<E> {
    /// The wire kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RpcError::App(_) => ErrorKind::App,
            RpcError::UnknownMethod(_) => ErrorKind::UnknownMethod,
            RpcError::BadArgs(_) => ErrorKind::BadArgs,
            RpcError::Timeout => ErrorKind::Timeout,
            RpcError::Cancelled => ErrorKind::Cancelled,
            RpcError::Overloaded(_) => ErrorKind::Overloaded,
            RpcError::Cycle(_) => ErrorKind::Cycle,
            RpcError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The application error, if this is one.
    pub fn app(&self) -> Option<&E> {
        match self {
            RpcError::App(e) => Some(e),
            _ => None,
        }
    }
}

/// The error type of callables that cannot fail: it has no values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoError {}

impl fmt::Display for NoError {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {}
    }
}

impl std::error::Error for NoError {}
