//! What credits-svc needs of storage, and where it lives: PostgreSQL in production,
//! SQLite (one file) as the embedded default. Both run the same [`crate::ledger::plan`]
//! inside one transaction per call and must pass the same test suite.
//!
//! The ledger tables are append-only (a trigger refuses UPDATE and DELETE); the cached
//! balance in `credit_accounts` changes only in the transaction that appends entries.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use reeve_runtime::Micros;

use crate::ledger::{EntryKind, LedgerEntry, WriteOutcome, WriteRequest};

pub mod postgres;
pub mod sqlite;

/// A storage failure. Cloneable so one failed group commit can answer every caller.
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
    #[error("concurrent writes kept colliding on the same idempotency keys; retry")]
    Contention,
    #[error("the ledger is shutting down")]
    ShuttingDown,
    #[error("stored data is not valid: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> StoreError {
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_) => StoreError::Unavailable(Arc::new(error)),
            other => StoreError::Database(Arc::new(other)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> StoreError {
        StoreError::Migration(Arc::new(error))
    }
}

/// A user's cached balance beside the sum of their ledger entries; equal unless the
/// database was edited by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceAudit {
    pub cached: Micros,
    pub entries_sum: Micros,
    pub entries: i64,
}

#[async_trait]
pub trait LedgerStore: Send + Sync + 'static {
    /// Succeeds when the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
    /// The user's balance; zero for an unknown user.
    async fn balance(&self, user_id: &str) -> Result<Micros, StoreError>;
    /// Applies `writes` in order, atomically, in a constant number of round trips:
    /// one outcome per write.
    async fn apply(
        &self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Vec<WriteOutcome>, StoreError>;
    /// Up to `limit` of the user's entries with an id below `before_id`, newest first.
    async fn history(
        &self,
        user_id: &str,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError>;
    /// The cached balance beside the sum of the user's entries.
    async fn audit(&self, user_id: &str) -> Result<BalanceAudit, StoreError>;
    /// Connections of the pool, for metrics.
    fn pool_stats(&self) -> reeve_runtime::telemetry::PoolStats;
}

/// Opens the store named by a `REEVE_DATABASE_URL` and brings its schema up to date.
pub async fn open(url: &str) -> Result<Arc<dyn LedgerStore>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PgLedger::connect(url).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteLedger::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}

/// One ledger row as both stores select it.
#[derive(sqlx::FromRow)]
struct EntryRow {
    id: i64,
    user_id: String,
    kind: String,
    amount_micros: i64,
    balance_after_micros: i64,
    idempotency_key: String,
    description: String,
    created_at_us: i64,
}

/// The column list matching [`EntryRow`].
const ENTRY_COLUMNS: &str = "id, user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us";

impl TryFrom<EntryRow> for LedgerEntry {
    type Error = StoreError;

    fn try_from(row: EntryRow) -> Result<LedgerEntry, StoreError> {
        let kind = EntryKind::parse(&row.kind).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "ledger entry {} has unknown kind {:?}",
                row.id, row.kind
            ))
        })?;
        Ok(LedgerEntry {
            id: row.id,
            user_id: row.user_id,
            kind,
            amount: Micros(row.amount_micros),
            balance_after: Micros(row.balance_after_micros),
            idempotency_key: row.idempotency_key,
            description: row.description,
            created_at_us: row.created_at_us,
        })
    }
}

fn entries_by_key(rows: Vec<EntryRow>) -> Result<HashMap<String, LedgerEntry>, StoreError> {
    rows.into_iter()
        .map(|row| LedgerEntry::try_from(row).map(|entry| (entry.idempotency_key.clone(), entry)))
        .collect()
}

fn entries(rows: Vec<EntryRow>) -> Result<Vec<LedgerEntry>, StoreError> {
    rows.into_iter().map(LedgerEntry::try_from).collect()
}
