//! Opening a service's database pool the same way everywhere. Each service still
//! runs its own migrations (they live beside the tables it owns).
//!
//! SQLite (the embedded default): one file, created with its folder if missing, WAL
//! journal, `synchronous = FULL` (a committed write survives a crash), a 10 s busy
//! timeout, and one connection per pool: the file has one writer at a time anyway, and
//! queueing in the pool is cheaper than SQLite's busy-wait between connections.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// A PostgreSQL pool of at most `max_connections`. A session left idle inside a
/// transaction (a crashed or cut-off caller) is ended after a minute, so the row locks
/// it holds cannot stall everyone else for hours.
///
/// A connection idle for [`PING_IF_IDLE_FOR`] or more is pinged before it is handed
/// out (and replaced if the ping fails); one used more recently is not. sqlx's default
/// pings on every acquire: a round trip on the caller's path before each transaction
/// (BENCHMARKS.md). sqlx still pings each connection when it is given back, in a task
/// of its own. A connection that broke within the last second fails its first
/// statement instead, as one that breaks right after a ping would; the stores answer
/// that as the database being unavailable.
pub async fn postgres_pool(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    postgres_pool_with(url, max_connections, &[]).await
}

/// [`postgres_pool`] with more session settings (`name`, `value`) on every connection.
pub async fn postgres_pool_with(
    url: &str,
    max_connections: u32,
    settings: &[(&str, &str)],
) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .options([("idle_in_transaction_session_timeout", "60s")])
        .options(settings.iter().copied());
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await
}

/// How long a pooled PostgreSQL connection may sit idle before it is checked with a
/// ping on its next acquire.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// A SQLite pool on the file of `url`.
pub async fn sqlite_pool(url: &str) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    if let Some(parent) = options.get_filename().parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
}

/// A database URL fit for logs and `Debug`: any password replaced.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted_url;

    #[test]
    fn passwords_never_leave_a_database_url() {
        assert_eq!(
            redacted_url("postgres://reeve:s3cret@db:5432/reeve"),
            "postgres://reeve:<redacted>@db:5432/reeve"
        );
        assert_eq!(
            redacted_url("postgres://reeve@db/reeve"),
            "postgres://reeve@db/reeve"
        );
        assert_eq!(
            redacted_url("sqlite://reeve-data/reeve.db"),
            "sqlite://reeve-data/reeve.db"
        );
    }
}
