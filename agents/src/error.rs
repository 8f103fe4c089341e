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
    /// The agent has no database (it never existed, or it was destroyed).
    #[error("no agent {0} in this data dir")]
    NoSuchAgent(String),
    /// The agent is live in the runtime serving the data dir, whose lock on its database keeps
    /// other readers out until it hibernates.
    #[error("{0}")]
    AgentLive(String),
    /// The runtime is shutting down or gone.
    #[error("the runtime has shut down")]
    Shutdown,
    /// The runtime is at a limit it keeps (open databases, say) and nothing gave way in time:
    /// try again later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Cluster mode: the agent is another node's (or moved to one while this node wrote).
    #[error("{0}")]
    Moved(String),
}

/// `Result` with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether this is the runtime's own trouble (storage, files, encoding, configuration), whose
    /// detail is for the operator's log and not for a client.
    pub(crate) fn is_internal(&self) -> bool {
        !matches!(
            self,
            Error::InvalidAddress(_)
                | Error::UnknownClass(_)
                | Error::Schedule(_)
                | Error::Shutdown
                | Error::Overloaded(_)
                | Error::Moved(_)
        )
    }

    /// What a caller is told of this error: a bad address as `bad_args`; the runtime's own
    /// trouble as `internal` with only `doing` and a reference, its detail logged under that
    /// reference (see [`hidden`]).
    pub(crate) fn told(&self, doing: &str) -> agents_client::RawError {
        match self {
            Error::InvalidAddress(_) | Error::UnknownClass(_) => {
                agents_client::RawError::bad_args(self)
            }
            Error::Overloaded(why) | Error::Moved(why) => {
                agents_client::RawError::new(agents_client::ErrorKind::Overloaded, why.clone())
            }
            e if e.is_internal() => agents_client::RawError::internal(hidden(doing, e)),
            e => agents_client::RawError::internal(e),
        }
    }
}

/// Logs `detail` at error level under a new reference and returns what a client is told
/// instead: `what` and that reference. Clients never see SQL, file paths or panic messages; the
/// operator finds them in the log by the reference.
pub(crate) fn hidden(what: &str, detail: &dyn std::fmt::Display) -> String {
    let reference = reference();
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!(reference = %reference, "{what}: {detail}");
    } else {
        // No subscriber listens: the detail must still reach someone.
        eprintln!("agents: error (ref {reference}): {what}: {detail}");
    }
    format!("{what}; the server's log has the detail (ref {reference})")
}

/// A short reference, unique enough to find one line in a log: a counter mixed with the
/// process's start time.
fn reference() -> String {
    use std::sync::{atomic::AtomicU64, atomic::Ordering, OnceLock};
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map_or(0, |d| d.as_nanos() as u64) ^ u64::from(std::process::id()) << 32
    });
    // splitmix64: distinct counters give distinct, scattered references.
    let mut z = seed.wrapping_add(
        NEXT.fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:08x}", (z ^ (z >> 31)) as u32)
}

/// Why an event failed, inside the runtime. What its caller is told (the wire's
/// [`RawError`](agents_client::RawError)) is made of it in one place, [`Failure::told`]: the
/// call's own outcome as it is; the runtime's own failures and panics as `internal` with a
/// reference, their detail logged under it when the failure is made.
#[derive(Debug)]
pub(crate) enum Failure {
    /// What the call itself came to (the handler's error, an unknown method, bad arguments, a
    /// deadline, a call it made that failed): told as it is.
    Told(agents_client::RawError),
    /// The runtime could not run or keep the event.
    Runtime(Box<Hidden>),
    /// The handler panicked.
    Panic(Box<Hidden>),
}

/// A failure the caller is told of by reference: `detail` is the whole story (logged),
/// `told` what the caller reads.
#[derive(Debug)]
pub(crate) struct Hidden {
    detail: String,
    told: agents_client::RawError,
}

impl Failure {
    /// `error` happened while `doing`: logged now, told by reference.
    pub(crate) fn runtime(doing: &'static str, error: impl Into<Error>) -> Self {
        let error = error.into();
        Failure::Runtime(Box::new(Hidden {
            detail: format!("{doing}: {error}"),
            told: error.told(doing),
        }))
    }

    /// The handler panicked with `message`: logged now, told by reference.
    pub(crate) fn panic(message: &str) -> Self {
        let what = "the handler panicked";
        Failure::Panic(Box::new(Hidden {
            detail: format!("{what}: {message}"),
            told: agents_client::RawError::internal(hidden(what, &message)),
        }))
    }

    /// What the caller is told.
    pub(crate) fn told(&self) -> agents_client::RawError {
        match self {
            Failure::Told(e) => e.clone(),
            Failure::Runtime(hidden) | Failure::Panic(hidden) => hidden.told.clone(),
        }
    }

    /// The kind of error the caller is told.
    pub(crate) fn kind(&self) -> agents_client::ErrorKind {
        match self {
            Failure::Told(e) => e.kind,
            Failure::Runtime(hidden) | Failure::Panic(hidden) => hidden.told.kind,
        }
    }

    /// The whole story, for the operator (the log, a dead letter).
    pub(crate) fn detail(&self) -> String {
        match self {
            Failure::Told(e) => e.to_string(),
            Failure::Runtime(hidden) | Failure::Panic(hidden) => hidden.detail.clone(),
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
        f.write_str(&self.detail())
    }
}
