//! Errors a call can end with, in typed form ([`RpcError`]) and wire form ([`RawError`]).

use std::fmt;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::payload::{Codec, Payload};

/// What went wrong with a call, as the wire names it (`"kind"` in the JSON protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
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
    pub fn app<E: Serialize + fmt::Display + Send + 'static>(codec: Codec, error: E) -> Self {
        let message = error.to_string();
        match codec.pass(error) {
            Ok(data) => RawError {
                kind: ErrorKind::App,
                message,
                data: Some(data),
            },
            Err(e) => Self::internal(format!(
                "could not encode the application error `{message}`: {e}"
            )),
        }
    }

    /// Turns this wire error into the typed error a client returns.
    pub fn into_typed<E: DeserializeOwned + 'static>(self) -> RpcError<E> {
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
///
/// A framework error keeps its kind through `?` into a handler's error: its
/// [`source`](std::error::Error::source) is a [`FrameworkError`], which
/// [`FrameworkError::find`] recovers from any error chain (the runtime's `AppError` does this, so
/// a callable that lets another agent's `Timeout` pass with `?` fails with `timeout`, not `app`).
#[derive(Debug, Clone, PartialEq)]
pub enum RpcError<E = NoError> {
    /// The handler returned `Err(e)`. Its writes were rolled back.
    App(E),
    /// The agent has no callable of this name (the caller is newer than the agent?).
    UnknownMethod(String),
    /// The arguments did not decode, or the address is invalid.
    BadArgs(String),
    /// The deadline passed. The call may or may not have run.
    Timeout,
    /// The call was cancelled before it ran.
    Cancelled,
    /// The agent or runtime is over capacity; nothing ran.
    Overloaded(String),
    /// The call would deadlock: its target is waiting on this very call chain.
    Cycle(String),
    /// A panicking handler, a storage failure, a runtime that shut down.
    Internal(String),
}

impl<E: fmt::Display> fmt::Display for RpcError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RpcError::App(e) => write!(f, "{e}"),
            other => write!(
                f,
                "{}{}",
                prefix(other.kind()),
                other.message().unwrap_or_default()
            ),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for RpcError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.kind() {
            ErrorKind::App => None,
            kind => Some(&FRAMEWORK[kind as usize]),
        }
    }
}

/// How `RpcError` introduces the message of each framework kind.
fn prefix(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::App => "",
        ErrorKind::UnknownMethod => "unknown method: ",
        ErrorKind::BadArgs => "bad arguments: ",
        ErrorKind::Timeout => "the call's deadline passed",
        ErrorKind::Cancelled => "the call was cancelled",
        ErrorKind::Overloaded => "overloaded: ",
        ErrorKind::Cycle => "call cycle: ",
        ErrorKind::Internal => "internal error: ",
    }
}

/// The kind of a framework error (every [`ErrorKind`] but `App`), as the
/// [`source`](std::error::Error::source) of an [`RpcError`]: it lets code that holds only a
/// `dyn Error` keep the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameworkError(ErrorKind);

static FRAMEWORK: [FrameworkError; 8] = [
    FrameworkError(ErrorKind::App),
    FrameworkError(ErrorKind::UnknownMethod),
    FrameworkError(ErrorKind::BadArgs),
    FrameworkError(ErrorKind::Timeout),
    FrameworkError(ErrorKind::Cancelled),
    FrameworkError(ErrorKind::Overloaded),
    FrameworkError(ErrorKind::Cycle),
    FrameworkError(ErrorKind::Internal),
];

impl FrameworkError {
    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.0
    }

    /// The framework kind of `error` and its message, if `error` is (or wraps, anywhere in its
    /// chain of sources) an [`RpcError`] that is not `App`. The message is the innermost
    /// error's own, without the prefix `RpcError`'s `Display` puts before it.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<(ErrorKind, String)> {
        let mut chain = std::iter::successors(Some(error), |e| e.source());
        let mut outer = None;
        for e in chain.by_ref() {
            if let Some(found) = e.downcast_ref::<FrameworkError>() {
                let rpc = outer.unwrap_or(error).to_string();
                let message = match found.0 {
                    ErrorKind::Timeout | ErrorKind::Cancelled => rpc,
                    kind => rpc.strip_prefix(prefix(kind)).unwrap_or(&rpc).to_owned(),
                };
                return Some((found.0, message));
            }
            outer = Some(e);
        }
        None
    }
}

impl fmt::Display for FrameworkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a framework error of kind `{}`", self.0)
    }
}

impl std::error::Error for FrameworkError {}

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

    /// The message of a framework error (`None` for `App`, `Timeout` and `Cancelled`).
    pub fn message(&self) -> Option<&str> {
        match self {
            RpcError::UnknownMethod(m)
            | RpcError::BadArgs(m)
            | RpcError::Overloaded(m)
            | RpcError::Cycle(m)
            | RpcError::Internal(m) => Some(m),
            RpcError::App(_) | RpcError::Timeout | RpcError::Cancelled => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("while syncing: {0}")]
    struct Wrapper(#[source] RpcError<String>);

    #[test]
    fn framework_kinds_are_found_through_sources() {
        let cycle: RpcError<String> = RpcError::Cycle("a -> a".into());
        assert_eq!(cycle.to_string(), "call cycle: a -> a");
        assert_eq!(
            FrameworkError::find(&cycle),
            Some((ErrorKind::Cycle, "a -> a".into()))
        );
        let wrapped = Wrapper(RpcError::Timeout);
        assert_eq!(
            FrameworkError::find(&wrapped),
            Some((ErrorKind::Timeout, "the call's deadline passed".into()))
        );
        let app: RpcError<String> = RpcError::App("no".into());
        assert_eq!(FrameworkError::find(&app), None);
        assert_eq!(app.to_string(), "no");
        for kind in FRAMEWORK {
            assert_eq!(FRAMEWORK[kind.0 as usize], kind);
        }
    }
}
