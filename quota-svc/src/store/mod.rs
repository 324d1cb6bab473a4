//! Where quota-svc keeps tiers, overrides and consumed units: PostgreSQL in production,
//! SQLite as the embedded default. Both run the same SQL (written once below).
//!
//! Schema choice: one row per consume (`quota_consumptions`: units, time, its
//! idempotency key, whether released) plus one counter row per user and feature
//! (`quota_counters.used`: the units of the rows still present and not released).
//! A check never sums the window: it reads the counter and subtracts only the rows
//! that have expired since the last consume (an index range of, usually, nothing).
//! Each consume prunes the expired rows of its user and feature and moves the
//! counter in the same transaction, under the counter row's lock — that lock is what
//! makes check-and-consume atomic across any number of replicas. So an
//! `api_requests`-like feature with 50,000 units in a window costs the same per check
//! as a feature with 3. A key is remembered while its row is in the window.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::registry::Limit;

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

/// PostgreSQL errors worth a retry: deadlock detected, lock timeout, query cancelled,
/// serialization failure.
const RETRYABLE_SQLSTATES: &[&str] = &["40P01", "55P03", "57014", "40001"];

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> StoreError {
        let retryable = error
            .as_database_error()
            .and_then(|e| e.code())
            .is_some_and(|code| RETRYABLE_SQLSTATES.contains(&code.as_ref()));
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
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

/// Units counted in the window for one user and feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub used: i64,
    /// Consume time of the oldest counted unit.
    pub oldest_us: Option<i64>,
}

/// What a check needs to know of a user, read at once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckContext {
    /// `None` for a user never given a tier.
    pub tier: Option<String>,
    pub override_limit: Option<Limit>,
    /// Zero unless asked for.
    pub usage: Usage,
}

/// One check-and-consume: resolve the user's limit for the feature (their override, or
/// their tier's entry of `tier_limits`), then record `units` under `key` if they fit in
/// the window that starts after `cutoff_us`.
#[derive(Debug, Clone, Copy)]
pub struct Consume<'a> {
    pub user_id: &'a str,
    pub feature: &'a str,
    pub key: &'a str,
    pub units: i64,
    /// The feature's limit in each tier, in [`crate::registry::TIERS`] order.
    pub tier_limits: [Limit; 3],
    pub now_us: i64,
    pub cutoff_us: i64,
}

/// What a check-and-consume found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    Done {
        consumed: Consumed,
        usage: Usage,
        tier: String,
        limit: Limit,
    },
    /// The user's stored tier is not one the registry knows: nothing was recorded.
    UnknownTier(String),
}

/// The limit a user has: their override, else their tier's; `None` for an unknown tier.
fn resolve_limit(
    tier: &str,
    override_limit: Option<Limit>,
    tier_limits: &[Limit; 3],
) -> Option<Limit> {
    let index = crate::registry::tier_index(tier).ok()?;
    Some(override_limit.unwrap_or(tier_limits[index]))
}

/// What a consume did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumed {
    /// Recorded now.
    Recorded,
    /// The key was recorded before with the same units: nothing new counted.
    Duplicate,
    /// Over the limit: nothing recorded.
    Refused,
    /// The key was recorded before with different units.
    KeyReused { units: i64 },
}

#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    async fn ping(&self) -> Result<(), StoreError>;
    /// Connections of the pool, for metrics.
    fn pool_stats(&self) -> reeve_runtime::telemetry::PoolStats;
    async fn tier(&self, user_id: &str) -> Result<Option<String>, StoreError>;
    /// Sets the tier and answers the previous one.
    async fn set_tier(
        &self,
        user_id: &str,
        tier: &str,
        now_us: i64,
    ) -> Result<Option<String>, StoreError>;
    async fn overrides(&self, user_id: &str) -> Result<HashMap<String, Limit>, StoreError>;
    async fn set_override(
        &self,
        user_id: &str,
        feature: &str,
        limit: Limit,
        now_us: i64,
    ) -> Result<(), StoreError>;
    async fn clear_override(&self, user_id: &str, feature: &str) -> Result<bool, StoreError>;
    /// Every feature the user has counted units of, at `cutoff_us`.
    async fn usage(
        &self,
        user_id: &str,
        cutoff_us: i64,
    ) -> Result<HashMap<String, Usage>, StoreError>;
    /// Resolves the user's limit, then atomically counts the window and records the
    /// units under the key if they fit.
    async fn consume(&self, request: &Consume<'_>) -> Result<Checked, StoreError>;
    /// The user's tier and override for `feature` and, with a cutoff, the feature's
    /// live usage: everything a check needs, in one round trip.
    async fn check_context(
        &self,
        user_id: &str,
        feature: &str,
        cutoff_us: Option<i64>,
    ) -> Result<CheckContext, StoreError>;
    /// Gives back the units recorded under `key`; `None` if there is nothing to give back.
    async fn release(
        &self,
        user_id: &str,
        feature: &str,
        key: &str,
    ) -> Result<Option<i64>, StoreError>;
}

/// Opens the store named by `REEVE_DATABASE_URL` and brings its schema up to date.
/// `batch_workers` is the number of concurrent batches of the PostgreSQL group commits
/// (consumes, and questions); SQLite has none.
pub async fn open(url: &str, batch_workers: usize) -> Result<Arc<dyn QuotaStore>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = reeve_runtime::db::postgres_pool(url, 16).await?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        Ok(Arc::new(PgQuotaStore::new(pool, batch_workers)))
    } else if url.starts_with("sqlite:") {
        let pool = reeve_runtime::db::sqlite_pool(url).await?;
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        Ok(Arc::new(SqliteQuotaStore { pool }))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}

pub struct PgQuotaStore {
    pool: sqlx::PgPool,
    consumes: ConsumeCommit,
    reads: ReadCommit,
}

pub struct SqliteQuotaStore {
    pool: sqlx::SqlitePool,
}

fn limit_columns(limit: Limit) -> (bool, i64) {
    match limit {
        Limit::Unlimited => (true, 0),
        Limit::Units(units) => (false, units),
    }
}

/// Every feature's live usage: the counter minus the expired rows not yet pruned, and
/// the oldest live row. `$1` user, `$2` cutoff.
const USAGE_SQL: &str = "\
SELECT c.feature, CAST(c.used - COALESCE((SELECT SUM(q.units) FROM quota_consumptions q \
        WHERE q.user_id = c.user_id AND q.feature = c.feature AND q.consumed_at_us <= $2 AND NOT q.released), 0) AS BIGINT), \
    (SELECT MIN(q.consumed_at_us) FROM quota_consumptions q \
        WHERE q.user_id = c.user_id AND q.feature = c.feature AND q.consumed_at_us > $2 AND NOT q.released) \
FROM quota_counters c WHERE c.user_id = $1";

/// Tier and override of `$1` for feature `$2`.
const CONTEXT_SQL: &str = "\
SELECT (SELECT t.tier FROM quota_tiers t WHERE t.user_id = $1), \
    (SELECT o.unlimited FROM quota_overrides o WHERE o.user_id = $1 AND o.feature = $2), \
    (SELECT o.limit_units FROM quota_overrides o WHERE o.user_id = $1 AND o.feature = $2), \
    CAST(NULL AS BIGINT), CAST(NULL AS BIGINT)";

/// The same, with the live usage of the feature at cutoff `$3` (as [`USAGE_SQL`]).
const CONTEXT_WITH_USAGE_SQL: &str = "\
SELECT (SELECT t.tier FROM quota_tiers t WHERE t.user_id = $1), \
    (SELECT o.unlimited FROM quota_overrides o WHERE o.user_id = $1 AND o.feature = $2), \
    (SELECT o.limit_units FROM quota_overrides o WHERE o.user_id = $1 AND o.feature = $2), \
    (SELECT CAST(c.used - COALESCE((SELECT SUM(q.units) FROM quota_consumptions q \
        WHERE q.user_id = $1 AND q.feature = $2 AND q.consumed_at_us <= $3 AND NOT q.released), 0) AS BIGINT) \
        FROM quota_counters c WHERE c.user_id = $1 AND c.feature = $2), \
    (SELECT MIN(q.consumed_at_us) FROM quota_consumptions q \
        WHERE q.user_id = $1 AND q.feature = $2 AND q.consumed_at_us > $3 AND NOT q.released)";

/// Tier, override unlimited, override units, used, oldest unit.
type ContextRow = (
    Option<String>,
    Option<bool>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

fn context_from_row((tier, unlimited, units, used, oldest_us): ContextRow) -> CheckContext {
    let override_limit = match (unlimited, units) {
        (Some(true), _) => Some(Limit::Unlimited),
        (Some(false), Some(units)) => Some(Limit::Units(units)),
        _ => None,
    };
    CheckContext {
        tier,
        override_limit,
        usage: Usage {
            used: used.unwrap_or(0),
            oldest_us,
        },
    }
}

/// [`CONTEXT_WITH_USAGE_SQL`] for many (user, feature, cutoff) at once: `$1`, `$2`,
/// `$3` are arrays; one row per item with its 1-based position first.
const CONTEXT_BATCH_SQL: &str = "\
SELECT q.ord, \
    (SELECT t.tier FROM quota_tiers t WHERE t.user_id = q.user_id), \
    (SELECT o.unlimited FROM quota_overrides o WHERE o.user_id = q.user_id AND o.feature = q.feature), \
    (SELECT o.limit_units FROM quota_overrides o WHERE o.user_id = q.user_id AND o.feature = q.feature), \
    (SELECT CAST(c.used - COALESCE((SELECT SUM(x.units) FROM quota_consumptions x \
        WHERE x.user_id = q.user_id AND x.feature = q.feature AND x.consumed_at_us <= q.cutoff AND NOT x.released), 0) AS BIGINT) \
        FROM quota_counters c WHERE c.user_id = q.user_id AND c.feature = q.feature), \
    (SELECT MIN(x.consumed_at_us) FROM quota_consumptions x \
        WHERE x.user_id = q.user_id AND x.feature = q.feature AND x.consumed_at_us > q.cutoff AND NOT x.released) \
FROM unnest($1::TEXT[], $2::TEXT[], $3::INT8[]) WITH ORDINALITY AS q(user_id, feature, cutoff, ord)";

/// Writes the store methods once for both databases; only how a transaction begins
/// and how the counter row is locked differ.
macro_rules! quota_store_impl {
    ($store:ty, $begin:literal, $lock_suffix:literal) => {
        #[async_trait]
        impl QuotaStore for $store {
            fn pool_stats(&self) -> reeve_runtime::telemetry::PoolStats {
                reeve_runtime::telemetry::PoolStats { open: self.pool.size(), idle: self.pool.num_idle() }
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn tier(&self, user_id: &str) -> Result<Option<String>, StoreError> {
                Ok(sqlx::query_scalar("SELECT tier FROM quota_tiers WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn set_tier(&self, user_id: &str, tier: &str, now_us: i64) -> Result<Option<String>, StoreError> {
                let mut tx = self.pool.begin_with($begin).await?;
                let previous: Option<String> =
                    sqlx::query_scalar(concat!("SELECT tier FROM quota_tiers WHERE user_id = $1", $lock_suffix))
                        .bind(user_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                sqlx::query(
                    "INSERT INTO quota_tiers (user_id, tier, updated_at_us) VALUES ($1, $2, $3) \
                     ON CONFLICT (user_id) DO UPDATE SET tier = excluded.tier, updated_at_us = excluded.updated_at_us",
                )
                .bind(user_id)
                .bind(tier)
                .bind(now_us)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(previous)
            }

            async fn overrides(&self, user_id: &str) -> Result<HashMap<String, Limit>, StoreError> {
                let rows: Vec<(String, bool, i64)> =
                    sqlx::query_as("SELECT feature, unlimited, limit_units FROM quota_overrides WHERE user_id = $1")
                        .bind(user_id)
                        .fetch_all(&self.pool)
                        .await?;
                Ok(rows
                    .into_iter()
                    .map(|(feature, unlimited, units)| (feature, if unlimited { Limit::Unlimited } else { Limit::Units(units) }))
                    .collect())
            }

            async fn set_override(&self, user_id: &str, feature: &str, limit: Limit, now_us: i64) -> Result<(), StoreError> {
                let (unlimited, units) = limit_columns(limit);
                sqlx::query(
                    "INSERT INTO quota_overrides (user_id, feature, unlimited, limit_units, updated_at_us) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, feature) DO UPDATE SET \
                     unlimited = excluded.unlimited, limit_units = excluded.limit_units, updated_at_us = excluded.updated_at_us",
                )
                .bind(user_id)
                .bind(feature)
                .bind(unlimited)
                .bind(units)
                .bind(now_us)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn clear_override(&self, user_id: &str, feature: &str) -> Result<bool, StoreError> {
                let result = sqlx::query("DELETE FROM quota_overrides WHERE user_id = $1 AND feature = $2")
                    .bind(user_id)
                    .bind(feature)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected() > 0)
            }

            async fn usage(&self, user_id: &str, cutoff_us: i64) -> Result<HashMap<String, Usage>, StoreError> {
                let rows: Vec<(String, i64, Option<i64>)> =
                    sqlx::query_as(USAGE_SQL).bind(user_id).bind(cutoff_us).fetch_all(&self.pool).await?;
                Ok(rows.into_iter().map(|(feature, used, oldest_us)| (feature, Usage { used, oldest_us })).collect())
            }

            async fn consume(&self, request: &Consume<'_>) -> Result<Checked, StoreError> {
                self.consume_units(request).await
            }

            async fn check_context(&self, user_id: &str, feature: &str, cutoff_us: Option<i64>) -> Result<CheckContext, StoreError> {
                self.read_context(user_id, feature, cutoff_us).await
            }

            async fn release(&self, user_id: &str, feature: &str, key: &str) -> Result<Option<i64>, StoreError> {
                let mut tx = self.pool.begin_with($begin).await?;
                let locked: Option<i64> = sqlx::query_scalar(concat!(
                    "SELECT used FROM quota_counters WHERE user_id = $1 AND feature = $2",
                    $lock_suffix
                ))
                .bind(user_id)
                .bind(feature)
                .fetch_optional(&mut *tx)
                .await?;
                if locked.is_none() {
                    return Ok(None);
                }
                let units: Option<i64> = sqlx::query_scalar(
                    "UPDATE quota_consumptions SET released = true \
                     WHERE user_id = $1 AND feature = $2 AND idempotency_key = $3 AND NOT released RETURNING units",
                )
                .bind(user_id)
                .bind(feature)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(units) = units {
                    sqlx::query("UPDATE quota_counters SET used = used - $3 WHERE user_id = $1 AND feature = $2")
                        .bind(user_id)
                        .bind(feature)
                        .bind(units)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(units)
            }
        }

        impl $store {
            /// Tier, override and (with a cutoff) usage of one user and feature, in one query.
            async fn context_single(&self, user_id: &str, feature: &str, cutoff_us: Option<i64>) -> Result<CheckContext, StoreError> {
                let row: ContextRow = match cutoff_us {
                    Some(cutoff_us) => sqlx::query_as(CONTEXT_WITH_USAGE_SQL)
                        .bind(user_id)
                        .bind(feature)
                        .bind(cutoff_us)
                        .fetch_one(&self.pool)
                        .await?,
                    None => sqlx::query_as(CONTEXT_SQL).bind(user_id).bind(feature).fetch_one(&self.pool).await?,
                };
                Ok(context_from_row(row))
            }
        }
    };
}

quota_store_impl!(PgQuotaStore, "BEGIN", " FOR UPDATE");
quota_store_impl!(SqliteQuotaStore, "BEGIN IMMEDIATE", "");

/// One check-and-consume waiting for its group commit (PostgreSQL).
#[derive(Debug, Clone)]
struct ConsumeItem {
    user_id: String,
    feature: String,
    key: String,
    units: i64,
    tier_limits: [Limit; 3],
    now_us: i64,
    cutoff_us: i64,
}

/// Concurrent consumes coalesced into one `quota_consume_batch` call.
/// Each item's own result: a failed batch is re-run item by item (see [`consume_batch`]).
type ConsumeCommit =
    reeve_runtime::group_commit::GroupCommit<ConsumeItem, Result<Checked, StoreError>, StoreError>;

/// One read-only check waiting for its batch (PostgreSQL).
#[derive(Debug, Clone)]
struct ReadItem {
    user_id: String,
    feature: String,
    cutoff_us: i64,
}

type ReadCommit = reeve_runtime::group_commit::GroupCommit<ReadItem, CheckContext, StoreError>;

async fn read_batch(
    pool: &sqlx::PgPool,
    items: Vec<ReadItem>,
) -> Result<Vec<CheckContext>, StoreError> {
    let users: Vec<&str> = items.iter().map(|i| i.user_id.as_str()).collect();
    let features: Vec<&str> = items.iter().map(|i| i.feature.as_str()).collect();
    let cutoffs: Vec<i64> = items.iter().map(|i| i.cutoff_us).collect();
    // The item's 1-based position, then a [`ContextRow`].
    type ReadRow = (
        i64,
        Option<String>,
        Option<bool>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
    );
    let rows: Vec<ReadRow> = sqlx::query_as(CONTEXT_BATCH_SQL)
        .bind(users)
        .bind(features)
        .bind(cutoffs)
        .fetch_all(pool)
        .await?;
    let mut results: Vec<Option<CheckContext>> = vec![None; items.len()];
    for (ord, tier, unlimited, units, used, oldest_us) in rows {
        if let Some(slot) = usize::try_from(ord)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| results.get_mut(i))
        {
            *slot = Some(context_from_row((tier, unlimited, units, used, oldest_us)));
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.ok_or_else(|| {
                StoreError::Database(Arc::new(sqlx::Error::Protocol(
                    "a batched read lost an item".to_owned(),
                )))
            })
        })
        .collect()
}

/// Most checks one batch carries.
const MAX_BATCH: usize = 256;
/// Concurrent batches per group commit, unless configured (`REEVE_QUOTA_BATCH_WORKERS`).
/// On a 2-core box fewer, larger batches win (see BENCHMARKS.md); more cores want more.
pub const DEFAULT_BATCH_WORKERS: usize = 2;

impl PgQuotaStore {
    fn new(pool: sqlx::PgPool, workers: usize) -> PgQuotaStore {
        let batch_pool = pool.clone();
        let run: reeve_runtime::group_commit::BatchFn<
            ConsumeItem,
            Result<Checked, StoreError>,
            StoreError,
        > = Arc::new(move |items| {
            let pool = batch_pool.clone();
            Box::pin(async move { consume_batch(&pool, items).await })
        });
        let consumes = ConsumeCommit::start(workers, MAX_BATCH, run);
        let read_pool = pool.clone();
        let read: reeve_runtime::group_commit::BatchFn<ReadItem, CheckContext, StoreError> =
            Arc::new(move |items| {
                let pool = read_pool.clone();
                Box::pin(async move { read_batch(&pool, items).await })
            });
        let reads = ReadCommit::start(workers, MAX_BATCH, read);
        PgQuotaStore {
            pool,
            consumes,
            reads,
        }
    }

    /// A question's reads are coalesced too: one query answers every check waiting
    /// (each sees data at least as fresh as when it arrived).
    async fn read_context(
        &self,
        user_id: &str,
        feature: &str,
        cutoff_us: Option<i64>,
    ) -> Result<CheckContext, StoreError> {
        let Some(cutoff_us) = cutoff_us else {
            return self.context_single(user_id, feature, None).await;
        };
        let item = ReadItem {
            user_id: user_id.to_owned(),
            feature: feature.to_owned(),
            cutoff_us,
        };
        self.reads
            .submit(item)
            .await
            .map_err(|_| StoreError::Unavailable(Arc::new(sqlx::Error::PoolClosed)))?
    }

    /// Group commit: this consume runs with whatever others are waiting, in one
    /// round trip and one transaction (`quota_consume_batch`, migration 2003), each
    /// item resolving its limit and then taking the steps of the SQLite version below
    /// (`quota_consume`, migration 2002).
    async fn consume_units(&self, request: &Consume<'_>) -> Result<Checked, StoreError> {
        let item = ConsumeItem {
            user_id: request.user_id.to_owned(),
            feature: request.feature.to_owned(),
            key: request.key.to_owned(),
            units: request.units,
            tier_limits: request.tier_limits,
            now_us: request.now_us,
            cutoff_us: request.cutoff_us,
        };
        self.consumes
            .submit(item)
            .await
            .map_err(|_| StoreError::Unavailable(Arc::new(sqlx::Error::PoolClosed)))??
    }
}

/// One answer of `quota_consume_batch`: item index (1-based), outcome, units recorded
/// earlier under the key, units used after, oldest counted unit, tier, limit (NULL:
/// unlimited).
type BatchRow = (
    i32,
    String,
    Option<i64>,
    i64,
    Option<i64>,
    String,
    Option<i64>,
);

/// Runs a batch; if the batch fails as a whole (a lock wait past `lock_timeout`, a
/// lost connection), its items are run again one by one, so one user's trouble fails
/// that user's call only. Each run is its own transaction: a failed one changed nothing.
async fn consume_batch(
    pool: &sqlx::PgPool,
    items: Vec<ConsumeItem>,
) -> Result<Vec<Result<Checked, StoreError>>, StoreError> {
    match run_consume_batch(pool, &items).await {
        Ok(results) => Ok(results.into_iter().map(Ok).collect()),
        Err(error) if items.len() > 1 => {
            tracing::warn!(%error, items = items.len(), "quota consume batch failed; running its items one by one");
            let mut results = Vec::with_capacity(items.len());
            for item in &items {
                let result = run_consume_batch(pool, std::slice::from_ref(item)).await;
                results.push(result.and_then(|mut one| {
                    one.pop().ok_or_else(|| {
                        StoreError::Database(Arc::new(sqlx::Error::Protocol(
                            "empty batch answer".to_owned(),
                        )))
                    })
                }));
            }
            Ok(results)
        }
        Err(error) => Err(error),
    }
}

async fn run_consume_batch(
    pool: &sqlx::PgPool,
    items: &[ConsumeItem],
) -> Result<Vec<Checked>, StoreError> {
    let column = |f: fn(&ConsumeItem) -> String| items.iter().map(f).collect::<Vec<String>>();
    let numbers = |f: fn(&ConsumeItem) -> i64| items.iter().map(f).collect::<Vec<i64>>();
    let limits = |tier: usize| -> Vec<Option<i64>> {
        items
            .iter()
            .map(|item| match item.tier_limits[tier] {
                Limit::Unlimited => None,
                Limit::Units(units) => Some(units),
            })
            .collect()
    };
    let rows: Vec<BatchRow> = sqlx::query_as(
        "SELECT idx, outcome, recorded_units, used, oldest_us, tier, limit_units \
         FROM quota_consume_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(column(|i| i.user_id.clone()))
    .bind(column(|i| i.feature.clone()))
    .bind(column(|i| i.key.clone()))
    .bind(numbers(|i| i.units))
    .bind(limits(0))
    .bind(limits(1))
    .bind(limits(2))
    .bind(numbers(|i| i.now_us))
    .bind(numbers(|i| i.cutoff_us))
    .fetch_all(pool)
    .await?;
    let mut results: Vec<Option<Checked>> = vec![None; items.len()];
    for (idx, outcome, recorded, used, oldest_us, tier, limit_units) in rows {
        let consumed = match (outcome.as_str(), recorded) {
            ("recorded", _) => Consumed::Recorded,
            ("duplicate", _) => Consumed::Duplicate,
            ("refused", _) => Consumed::Refused,
            ("key_reused", Some(units)) => Consumed::KeyReused { units },
            ("unknown_tier", _) => Consumed::Refused,
            (other, _) => {
                return Err(StoreError::Database(Arc::new(sqlx::Error::Protocol(
                    format!("quota_consume answered {other:?}"),
                ))));
            }
        };
        let checked = if outcome == "unknown_tier" {
            Checked::UnknownTier(tier)
        } else {
            let limit = limit_units.map_or(Limit::Unlimited, Limit::Units);
            Checked::Done {
                consumed,
                usage: Usage { used, oldest_us },
                tier,
                limit,
            }
        };
        let slot = usize::try_from(idx)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| results.get_mut(i));
        match slot {
            Some(slot) => *slot = Some(checked),
            None => {
                return Err(StoreError::Database(Arc::new(sqlx::Error::Protocol(
                    format!("quota_consume_batch answered item {idx}"),
                ))));
            }
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.ok_or_else(|| {
                StoreError::Database(Arc::new(sqlx::Error::Protocol(
                    "quota_consume_batch skipped an item".to_owned(),
                )))
            })
        })
        .collect()
}

impl SqliteQuotaStore {
    /// In-process: nothing to coalesce.
    async fn read_context(
        &self,
        user_id: &str,
        feature: &str,
        cutoff_us: Option<i64>,
    ) -> Result<CheckContext, StoreError> {
        self.context_single(user_id, feature, cutoff_us).await
    }

    /// Resolve the limit (tier, override), then: lock the counter (the write lock of
    /// `BEGIN IMMEDIATE`), prune what left the window, look the key up, record if it
    /// fits, move the counter.
    async fn consume_units(&self, request: &Consume<'_>) -> Result<Checked, StoreError> {
        let Consume {
            user_id,
            feature,
            key,
            units,
            tier_limits,
            now_us,
            cutoff_us,
        } = *request;
        let context = self.check_context(user_id, feature, None).await?;
        let tier = context
            .tier
            .unwrap_or_else(|| crate::registry::DEFAULT_TIER.to_owned());
        let Some(limit) = resolve_limit(&tier, context.override_limit, &tier_limits) else {
            return Ok(Checked::UnknownTier(tier));
        };
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO quota_counters (user_id, feature, used) VALUES ($1, $2, 0) \
             ON CONFLICT (user_id, feature) DO NOTHING",
        )
        .bind(user_id)
        .bind(feature)
        .execute(&mut *tx)
        .await?;
        let counted: i64 = sqlx::query_scalar(
            "SELECT used FROM quota_counters WHERE user_id = $1 AND feature = $2",
        )
        .bind(user_id)
        .bind(feature)
        .fetch_one(&mut *tx)
        .await?;
        let earlier: Option<i64> = sqlx::query_scalar(
            "SELECT units FROM quota_consumptions WHERE user_id = $1 AND feature = $2 AND idempotency_key = $3",
        )
        .bind(user_id)
        .bind(feature)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        // Prune what left the window; its still-counted units leave the counter.
        let expired: Vec<(i64, bool)> = sqlx::query_as(
            "DELETE FROM quota_consumptions WHERE user_id = $1 AND feature = $2 AND consumed_at_us <= $3 \
             RETURNING units, released",
        )
        .bind(user_id)
        .bind(feature)
        .bind(cutoff_us)
        .fetch_all(&mut *tx)
        .await?;
        let expired_units: i64 = expired
            .iter()
            .filter(|(_, released)| !released)
            .map(|(units, _)| units)
            .sum();
        let mut used = counted - expired_units;
        let outcome = match earlier {
            Some(recorded) if recorded == units => Consumed::Duplicate,
            Some(recorded) => Consumed::KeyReused { units: recorded },
            None => {
                let fits = match limit {
                    Limit::Unlimited => true,
                    Limit::Units(max) => used.checked_add(units).is_some_and(|after| after <= max),
                };
                if fits {
                    sqlx::query(
                        "INSERT INTO quota_consumptions (user_id, feature, idempotency_key, units, consumed_at_us, released) \
                         VALUES ($1, $2, $3, $4, $5, false)",
                    )
                    .bind(user_id)
                    .bind(feature)
                    .bind(key)
                    .bind(units)
                    .bind(now_us)
                    .execute(&mut *tx)
                    .await?;
                    used += units;
                    Consumed::Recorded
                } else {
                    Consumed::Refused
                }
            }
        };
        if used != counted {
            sqlx::query("UPDATE quota_counters SET used = $3 WHERE user_id = $1 AND feature = $2")
                .bind(user_id)
                .bind(feature)
                .bind(used)
                .execute(&mut *tx)
                .await?;
        }
        let oldest_us: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(consumed_at_us) FROM quota_consumptions \
             WHERE user_id = $1 AND feature = $2 AND NOT released",
        )
        .bind(user_id)
        .bind(feature)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Checked::Done {
            consumed: outcome,
            usage: Usage { used, oldest_us },
            tier,
            limit,
        })
    }
}
