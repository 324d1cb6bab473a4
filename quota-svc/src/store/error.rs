//! Storage failures, sorted once into "try again" and "something is wrong".
//!
//! Load is never a bug: a database that is busy or locked (SQLite `SQLITE_BUSY` /
//! `SQLITE_LOCKED` after the busy timeout), a PostgreSQL lock wait past
//! `lock_timeout`, a deadlock, a serialization failure, a cancelled statement, a cut
//! or refused connection, all become [`StoreError::Unavailable`] (gRPC UNAVAILABLE,
//! which callers retry). Only what a retry cannot fix is [`StoreError::Database`].
//! This module never looks at error message text, only at codes.

use std::sync::Arc;

/// A storage failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(Arc<sqlx::Error>),
    #[error("database error: {0}")]
    Database(Arc<sqlx::Error>),
    #[error("database migration failed: {0}")]
    Migration(Arc<sqlx::migrate::MigrateError>),
    #[error("unsupported database URL (expected postgres://… or sqlite://…)")]
    UnsupportedUrl,
}

impl StoreError {
    /// An answer of the database that the code did not expect (a bug, not load).
    pub(crate) fn protocol(message: impl Into<String>) -> StoreError {
        StoreError::Database(Arc::new(sqlx::Error::Protocol(message.into())))
    }

    /// The store is closing or its worker is gone: retry elsewhere or later.
    pub(crate) fn closed() -> StoreError {
        StoreError::Unavailable(Arc::new(sqlx::Error::PoolClosed))
    }
}

/// PostgreSQL SQLSTATEs worth a retry: serialization failure, deadlock, lock timeout,
/// statement cancelled (statement_timeout), admin or crash shutdown, cannot connect
/// now, too many connections.
const RETRYABLE_SQLSTATES: &[&str] = &[
    "40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "53300",
];

/// SQLite primary result codes worth a retry: `SQLITE_BUSY` (5, "database is
/// locked") and `SQLITE_LOCKED` (6), with any of their extended codes.
const RETRYABLE_SQLITE_CODES: &[i64] = &[5, 6];

fn is_retryable(error: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = error.code() else {
        return false;
    };
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        // Extended codes carry the primary code in their low byte.
        return code
            .parse::<i64>()
            .is_ok_and(|code| RETRYABLE_SQLITE_CODES.contains(&(code & 0xff)));
    }
    // Class 08: connection exceptions.
    code.starts_with("08") || RETRYABLE_SQLSTATES.contains(&code.as_ref())
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> StoreError {
        let retryable = error.as_database_error().is_some_and(is_retryable);
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => StoreError::Unavailable(Arc::new(error)),
            _ if retryable => StoreError::Unavailable(Arc::new(error)),
            other => StoreError::Database(Arc::new(other)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> StoreError {
        StoreError::Migration(Arc::new(error))
    }
}

/// An error of the outbox (reeve-events) as the store's.
pub(crate) fn outbox_error(error: reeve_events::EventsError) -> StoreError {
    match error {
        reeve_events::EventsError::Database(error) => StoreError::from(error),
        reeve_events::EventsError::Migrate(error) => StoreError::from(error),
        other => StoreError::protocol(other.to_string()),
    }
}
