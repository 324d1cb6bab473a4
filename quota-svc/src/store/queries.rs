//! The SQL both databases run alike, written once: `$n` placeholders serve PostgreSQL
//! and SQLite. Reads (tier, overrides, usage, a check's context), admin writes, and
//! release, which decides with [`crate::rules::plan_release`]. Only how a transaction
//! begins (PostgreSQL: with a lock timeout, so a held row answers UNAVAILABLE instead
//! of waiting for good) and how a row is locked differ. The check-and-consume is
//! not here: each store has its own (a plpgsql function, a Rust transaction).

use crate::registry::Limit;
use crate::store::CheckContext;
use crate::store::Usage;

pub(super) fn limit_columns(limit: Limit) -> (bool, i64) {
    match limit {
        Limit::Unlimited => (true, 0),
        Limit::Units(units) => (false, units),
    }
}

/// Every feature's live usage: the counter minus the expired rows not yet pruned, and
/// the oldest live row. `$1` user, `$2` cutoff.
pub(super) const USAGE_SQL: &str = "\
SELECT c.feature, CAST(c.used - COALESCE((SELECT SUM(q.units) FROM quota_consumptions q \
        WHERE q.user_id = c.user_id AND q.feature = c.feature AND q.consumed_at_us <= $2 AND NOT q.released), 0) AS BIGINT), \
    (SELECT MIN(q.consumed_at_us) FROM quota_consumptions q \
        WHERE q.user_id = c.user_id AND q.feature = c.feature AND q.consumed_at_us > $2 AND NOT q.released) \
FROM quota_counters c WHERE c.user_id = $1";

/// Tier and override of `$1` for feature `$2`.
pub(super) const CONTEXT_SQL: &str = "\
SELECT (SELECT t.tier FROM quota_tiers t WHERE t.user_id = $1), \
    (SELECT o.unlimited FROM quota_overrides o WHERE o.user_id = $1 AND o.feature = $2), \
    (SELECT o.limit_units FROM quota_overrides o WHERE o.user_id = $1 AND o.feature = $2), \
    CAST(NULL AS BIGINT), CAST(NULL AS BIGINT)";

/// The same, with the live usage of the feature at cutoff `$3` (as [`USAGE_SQL`]).
pub(super) const CONTEXT_WITH_USAGE_SQL: &str = "\
SELECT (SELECT t.tier FROM quota_tiers t WHERE t.user_id = $1), \
    (SELECT o.unlimited FROM quota_overrides o WHERE o.user_id = $1 AND o.feature = $2), \
    (SELECT o.limit_units FROM quota_overrides o WHERE o.user_id = $1 AND o.feature = $2), \
    (SELECT CAST(c.used - COALESCE((SELECT SUM(q.units) FROM quota_consumptions q \
        WHERE q.user_id = $1 AND q.feature = $2 AND q.consumed_at_us <= $3 AND NOT q.released), 0) AS BIGINT) \
        FROM quota_counters c WHERE c.user_id = $1 AND c.feature = $2), \
    (SELECT MIN(q.consumed_at_us) FROM quota_consumptions q \
        WHERE q.user_id = $1 AND q.feature = $2 AND q.consumed_at_us > $3 AND NOT q.released)";

/// Tier, override unlimited, override units, used, oldest unit.
pub(super) type ContextRow = (
    Option<String>,
    Option<bool>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

pub(super) fn context_from_row(
    (tier, unlimited, units, used, oldest_us): ContextRow,
) -> CheckContext {
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
pub(super) const CONTEXT_BATCH_SQL: &str = "\
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
/// and how a row is locked differ.
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

            async fn release(&self, user_id: &str, feature: &str, key: &str, cutoff_us: i64) -> Result<Option<i64>, StoreError> {
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
                let row: Option<(i64, i64, bool)> = sqlx::query_as(
                    "SELECT units, consumed_at_us, released FROM quota_consumptions \
                     WHERE user_id = $1 AND feature = $2 AND idempotency_key = $3",
                )
                .bind(user_id)
                .bind(feature)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
                let row = row.map(|(units, consumed_at_us, released)| $crate::rules::KeyRow { units, consumed_at_us, released });
                let Some(units) = $crate::rules::plan_release(row, cutoff_us) else {
                    return Ok(None);
                };
                sqlx::query(
                    "UPDATE quota_consumptions SET released = true \
                     WHERE user_id = $1 AND feature = $2 AND idempotency_key = $3",
                )
                .bind(user_id)
                .bind(feature)
                .bind(key)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE quota_counters SET used = used - $3 WHERE user_id = $1 AND feature = $2")
                    .bind(user_id)
                    .bind(feature)
                    .bind(units)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Some(units))
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
