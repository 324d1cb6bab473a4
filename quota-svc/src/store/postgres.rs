//! The PostgreSQL store (production). Reads and admin writes are the shared SQL of
//! [`super::queries`]; a check-and-consume is the plpgsql `quota_consume` (migration
//! 2004, the rules of [`crate::rules::plan_consume`] restated for one round trip),
//! run for many callers at once by `quota_consume_batch` under a group commit: the
//! same steps taken set-based, three statements for the first item of every user and
//! feature in the batch, then item by item for their later ones (migration 2005; under
//! six pairs the whole batch goes item by item, the loop of migration 2003).
//! Questions are coalesced the same way. Transactions opened here set a 2 s
//! `lock_timeout`: a row held elsewhere answers UNAVAILABLE, never a wait for good.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::queries::{
    CONTEXT_BATCH_SQL, CONTEXT_SQL, CONTEXT_WITH_USAGE_SQL, ContextRow, USAGE_SQL,
    context_from_row, limit_columns,
};
use super::{CheckContext, Checked, Consume, Consumed, QuotaStore, StoreError, Usage};
use crate::registry::Limit;

pub struct PgQuotaStore {
    pool: sqlx::PgPool,
    consumes: ConsumeCommit,
    reads: ReadCommit,
}

quota_store_impl!(
    PgQuotaStore,
    "BEGIN; SET LOCAL lock_timeout = '2s'",
    " FOR UPDATE"
);

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
        .map(|r| r.ok_or_else(|| StoreError::protocol("a batched read lost an item".to_owned())))
        .collect()
}

/// Most checks one batch carries.
const MAX_BATCH: usize = 256;
/// Concurrent batches per group commit, unless configured (`REEVE_QUOTA_BATCH_WORKERS`).
/// On a 2-core box fewer, larger batches win (see BENCHMARKS.md); more cores want more.
pub const DEFAULT_BATCH_WORKERS: usize = 2;

impl PgQuotaStore {
    /// Connects, applies the PostgreSQL migrations and starts the group commits.
    pub(super) async fn open(url: &str, batch_workers: usize) -> Result<PgQuotaStore, StoreError> {
        let pool = reeve_runtime::db::postgres_pool(url, 16).await?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        reeve_events::store::migrate_pg(&pool)
            .await
            .map_err(super::error::outbox_error)?;
        Ok(PgQuotaStore::new(pool, batch_workers))
    }

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
            .map_err(|_| StoreError::closed())?
    }

    /// Group commit: this consume runs with whatever others are waiting, in one
    /// round trip and one transaction (`quota_consume_batch`, migration 2005), each
    /// item resolving its limit and then taking the steps of the SQLite version
    /// (`rules::plan_consume`): set-based for the first item of each user and feature,
    /// one by one for the later ones and for batches of fewer than six pairs.
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
            .map_err(|_| StoreError::closed())??
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
                    one.pop()
                        .ok_or_else(|| StoreError::protocol("empty batch answer".to_owned()))
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
    // One transaction for the batch and the events it causes (quota.threshold_reached).
    let mut tx = pool.begin().await?;
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
    .fetch_all(&mut *tx)
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
                return Err(StoreError::protocol(format!(
                    "quota_consume answered {other:?}"
                )));
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
                return Err(StoreError::protocol(format!(
                    "quota_consume_batch answered item {idx}"
                )));
            }
        }
    }
    let results = results
        .into_iter()
        .map(|r| {
            r.ok_or_else(|| StoreError::protocol("quota_consume_batch skipped an item".to_owned()))
        })
        .collect::<Result<Vec<Checked>, StoreError>>()?;
    let mut events = Vec::new();
    for (item, checked) in items.iter().zip(&results) {
        if let Checked::Done {
            consumed,
            usage,
            tier,
            limit,
        } = checked
        {
            events.extend(crate::events::threshold_events(
                &item.user_id,
                &item.feature,
                tier,
                consumed,
                item.units,
                usage.used,
                *limit,
            ));
        }
    }
    let now_us = items.first().map_or(0, |item| item.now_us);
    reeve_events::insert_pg(&mut tx, &events, now_us).await?;
    tx.commit().await?;
    Ok(results)
}
