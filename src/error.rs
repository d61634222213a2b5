//! The one error type. Each variant is a failure a caller handles differently.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong in big-market, by what the caller does about it.
#[derive(Debug)]
pub enum Error {
    /// The caller passed a value that can never be accepted; fix the input.
    InvalidInput {
        /// The field (or flag) that was wrong.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The order id was already used: the award exists, nothing was written.
    DuplicateOrder {
        /// The repeated order id.
        order_id: String,
    },
    /// The settings or the data directory's layout do not fit; fix the configuration.
    Config(String),
    /// A shard (a SQLite file or a MySQL database) could not be read or written.
    Storage {
        /// What was being done, and on which shard.
        context: String,
        /// The database error underneath.
        source: StorageError,
    },
    /// The database did not answer a write whose commit may have happened (the connection was
    /// lost after the commit was sent, or no answer came within the deadline), or a MySQL shard
    /// writer failed on a bug that may have come after the commit: the write may or may not
    /// have been kept. Retry an award with the same order id: a duplicate on the retry
    /// means it was saved.
    OutcomeUnknown {
        /// What was being written, and on which shard.
        context: String,
        /// The error underneath.
        source: StorageError,
    },
    /// A file system operation failed.
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error underneath.
        source: std::io::Error,
    },
    /// The message broker could not be reached or refused an operation.
    Broker(String),
    /// A message could not be handled: it is malformed or names no known award.
    Poison(String),
    /// An audit or verification found a broken invariant: something was lost or half-written.
    Violation(String),
    /// The service is shutting down and takes no new work; retry against a running instance.
    ShuttingDown,
    /// The operating system refused to start a thread (too many threads or too little memory).
    Spawn {
        /// The thread's name.
        name: String,
        /// The error underneath.
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap a database error with what was being done.
    pub fn storage(context: impl Into<String>, source: impl Into<StorageError>) -> Self {
        Error::Storage {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Build an input error.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            field,
            reason: reason.into(),
        }
    }

    /// The process exit code that fits this error: 2 bad input or settings, 3 duplicate, 4
    /// outcome unknown, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::InvalidInput { .. } | Error::Config(_) => 2,
            Error::DuplicateOrder { .. } => 3,
            Error::OutcomeUnknown { .. } => 4,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput { field, reason } => write!(f, "invalid {field}: {reason}"),
            Error::DuplicateOrder { order_id } => write!(
                f,
                "duplicate order id {order_id}: an award with this order id already exists; nothing was written"
            ),
            Error::Config(msg) => write!(f, "configuration error: {msg}"),
            Error::Storage { context, source } => {
                write!(f, "storage error while {context}: {source}{}", source.hint())
            }
            Error::OutcomeUnknown { context, source } => write!(
                f,
                "outcome unknown while {context}: the award may or may not have been saved: retry with the same orderId (a duplicate order id on the retry means it was saved): {source}"
            ),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Broker(msg) => write!(f, "broker error: {msg}"),
            Error::Poison(msg) => write!(f, "unprocessable message: {msg}"),
            Error::Violation(msg) => write!(f, "invariant violated: {msg}"),
            Error::ShuttingDown => write!(f, "the service is shutting down and takes no new work"),
            Error::Spawn { name, source } => write!(
                f,
                "could not start thread {name}: {source} (the process may have too many threads or too little memory: lower --workers or --threads)"
            ),
        }
    }
}

/// The database error underneath [`Error::Storage`], from either backend. Each backend turns its
/// driver's errors into this (`store::sqlite`, `store::mysql`), with the hint that says what to
/// do about it: only the backends know their driver's error codes.
#[derive(Debug)]
pub struct StorageError {
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
    hint: &'static str,
    full: bool,
}

impl StorageError {
    /// A driver error, with its hint (empty, or a parenthesised sentence with a leading space)
    /// and whether it says that the disk is full.
    pub(crate) fn new(
        source: impl std::error::Error + Send + Sync + 'static,
        hint: &'static str,
        full: bool,
    ) -> Self {
        StorageError {
            source: Box::new(source),
            hint,
            full,
        }
    }

    /// Whether the disk (or the shard's size cap) is full.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// What to do about it, as the backend says.
    pub fn hint(&self) -> &'static str {
        self.hint
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.source.fmt(f)
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Storage { source, .. } => Some(source),
            Error::OutcomeUnknown { source, .. } => Some(source),
            Error::Io { source, .. } => Some(source),
            Error::Spawn { source, .. } => Some(source),
            _ => None,
        }
    }
}
