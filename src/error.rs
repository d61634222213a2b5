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

    /// The process exit code that fits this error: 2 bad input or settings, 3 duplicate, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::InvalidInput { .. } | Error::Config(_) => 2,
            Error::DuplicateOrder { .. } => 3,
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
                let hint = match source {
                    StorageError::Sqlite(e) => sqlite_hint(e),
                    StorageError::Mysql(e) => mysql_hint(e),
                };
                write!(f, "storage error while {context}: {source}{hint}")
            }
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Broker(msg) => write!(f, "broker error: {msg}"),
            Error::Poison(msg) => write!(f, "unprocessable message: {msg}"),
            Error::Violation(msg) => write!(f, "invariant violated: {msg}"),
            Error::ShuttingDown => write!(f, "the service is shutting down and takes no new work"),
        }
    }
}

fn sqlite_hint(e: &rusqlite::Error) -> &'static str {
    match e.sqlite_error_code() {
                    Some(rusqlite::ErrorCode::NotADatabase) => {
                        " (the file is not a SQLite database: move it away or point --data-dir elsewhere)"
                    }
                    Some(rusqlite::ErrorCode::DiskFull) => {
                        " (the disk is full, or the shard reached its size limit: free space, e.g. `big-market tasks purge --older-than 7d`, and retry)"
                    }
                    Some(rusqlite::ErrorCode::ReadOnly) | Some(rusqlite::ErrorCode::CannotOpen) => {
                        " (check that the data directory exists and is writable)"
                    }
                    Some(rusqlite::ErrorCode::DatabaseBusy) => {
                        " (another process holds the shard's write lock: retry)"
                    }
                    _ => "",
                }
}

fn mysql_hint(e: &mysql::Error) -> &'static str {
    match e {
        mysql::Error::MySqlError(m) if m.code == 1213 => " (a deadlock between processes: retry)",
        mysql::Error::MySqlError(m) if m.code == 1205 => {
            " (another process held a row lock too long: retry)"
        }
        mysql::Error::MySqlError(m) if m.code == 1114 || m.code == 1021 => {
            " (the MySQL server is out of space: free space, e.g. `big-market tasks purge --older-than 7d`, and retry)"
        }
        mysql::Error::MySqlError(m) if m.code == 1045 || m.code == 1044 || m.code == 1142 => {
            " (check the user and password of --store and the user's grants)"
        }
        e if e.is_connectivity_error() => {
            " (check that the MySQL server of --store is running and reachable)"
        }
        _ => "",
    }
}

/// The database error underneath [`Error::Storage`], from either backend.
#[derive(Debug)]
pub enum StorageError {
    /// From a SQLite shard file.
    Sqlite(rusqlite::Error),
    /// From a MySQL or MariaDB server.
    Mysql(mysql::Error),
}

impl StorageError {
    /// Whether the disk (or the shard's size cap) is full.
    pub fn is_full(&self) -> bool {
        match self {
            StorageError::Sqlite(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            StorageError::Mysql(mysql::Error::MySqlError(m)) => m.code == 1114 || m.code == 1021,
            StorageError::Mysql(_) => false,
        }
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Sqlite(e)
    }
}

impl From<mysql::Error> for StorageError {
    fn from(e: mysql::Error) -> Self {
        StorageError::Mysql(e)
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Sqlite(e) => e.fmt(f),
            StorageError::Mysql(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Sqlite(e) => Some(e),
            StorageError::Mysql(e) => Some(e),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Storage { source, .. } => Some(source),
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
