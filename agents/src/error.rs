//! The runtime's error type.

/// What can go wrong in the runtime itself (storage, addressing, configuration).
///
/// Handlers usually return [`AppError`](crate::AppError) or their own error type; every
/// `Error` converts into `AppError` with `?`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// SQLite refused something.
    #[error("storage: {0}")]
    Storage(#[from] rusqlite::Error),
    /// A file-system operation on the data dir failed.
    #[error("i/o on {path}: {source}")]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A value could not be encoded or decoded (kv values, stored arguments).
    #[error("codec: {0}")]
    Codec(String),
    /// An agent name or class that cannot be addressed.
    #[error("invalid agent address: {0}")]
    InvalidAddress(String),
    /// No agent type is registered for the class.
    #[error("no agent class `{0}` is registered with this runtime")]
    UnknownClass(String),
    /// The schema migrations do not fit the database.
    #[error("migration: {0}")]
    Migration(String),
    /// A schedule that cannot be: an invalid cron expression or time zone, a zero interval.
    #[error("schedule: {0}")]
    Schedule(String),
    /// The runtime's configuration cannot work: no data dir, a class registered twice, an
    /// invalid `#[schedule]`, `build` outside a tokio runtime.
    #[error("configuration: {0}")]
    Config(String),
    /// A bug in the runtime surfaced as an error instead of a crash (a panicked storage task).
    #[error("internal: {0}")]
    Internal(String),
    /// Another runtime (in this process or another) has the data dir open: one data dir serves
    /// one runtime at a time.
    #[error("the data dir {path} is in use by another runtime{holder}")]
    DataDirInUse {
        /// The data dir.
        path: std::path::PathBuf,
        /// Who holds it, as its lock file says (` (pid 123)`), if it says.
        holder: String,
    },
    /// The runtime is shutting down or gone.
    #[error("the runtime has shut down")]
    Shutdown,
}

/// `Result` with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an event failed, inside the runtime. What its caller is told (the wire's
/// [`RawError`](agents_client::RawError)) is made of it in one place, [`Failure::told`]: the
/// call's own outcome as it is; the runtime's own failures as `internal`, while the typed error
/// stays here for the log.
#[derive(Debug)]
pub(crate) enum Failure {
    /// What the call itself came to (the handler's error, an unknown method, bad arguments, a
    /// deadline, a call it made that failed): told as it is.
    Told(agents_client::RawError),
    /// The runtime could not run or keep the event; `doing` says what failed.
    Runtime { doing: &'static str, error: Error },
    /// The handler panicked, saying this.
    Panic(String),
}

impl Failure {
    /// `error` happened while `doing`.
    pub(crate) fn runtime(doing: &'static str, error: impl Into<Error>) -> Self {
        Failure::Runtime {
            doing,
            error: error.into(),
        }
    }

    /// What the caller is told.
    pub(crate) fn told(&self) -> agents_client::RawError {
        match self {
            Failure::Told(e) => e.clone(),
            Failure::Runtime { doing, error } => {
                agents_client::RawError::internal(format!("{doing}: {error}"))
            }
            Failure::Panic(message) => {
                agents_client::RawError::internal(format!("the handler panicked: {message}"))
            }
        }
    }
}

impl From<agents_client::RawError> for Failure {
    fn from(e: agents_client::RawError) -> Self {
        Failure::Told(e)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.told().fmt(f)
    }
}
