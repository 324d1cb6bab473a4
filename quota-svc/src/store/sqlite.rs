//! The SQLite store (the embedded default). Reads, admin writes and release are the
//! shared SQL of [`super::queries`]; a check-and-consume is one `BEGIN IMMEDIATE`
//! transaction that gathers what [`crate::rules`] needs (the key's row, the live
//! usage) and writes what [`crate::rules::plan_consume`] decided. It decides nothing
//! itself: PostgreSQL's plpgsql must agree with this file's answers, and
//! `tests/store_equivalence.rs` checks that they do.

use std::collections::HashMap;

use async_trait::async_trait;

use super::queries::{
    CONTEXT_SQL, CONTEXT_WITH_USAGE_SQL, ContextRow, USAGE_SQL, context_from_row, limit_columns,
};
use super::{CheckContext, Checked, Consume, Consumed, QuotaStore, StoreError, Usage};
use crate::registry::Limit;
use crate::rules::{self, KeyRow};

pub struct SqliteQuotaStore {
    pool: sqlx::SqlitePool,
}

quota_store_impl!(SqliteQuotaStore, "BEGIN IMMEDIATE", "");

impl SqliteQuotaStore {
    /// Opens (creating if needed) the file and applies the SQLite migrations.
    pub(super) async fn open(url: &str) -> Result<SqliteQuotaStore, StoreError> {
        let pool = reeve_runtime::db::sqlite_pool(url).await?;
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        reeve_events::store::migrate_sqlite(&pool)
            .await
            .map_err(super::error::outbox_error)?;
        Ok(SqliteQuotaStore { pool })
    }

    /// In-process: nothing to coalesce.
    async fn read_context(
        &self,
        user_id: &str,
        feature: &str,
        cutoff_us: Option<i64>,
    ) -> Result<CheckContext, StoreError> {
        self.context_single(user_id, feature, cutoff_us).await
    }

    /// Under the write lock of `BEGIN IMMEDIATE`: resolve the limit (tier, override),
    /// read the counter and the key's row, prune what left the window, plan, and record
    /// and move the counter as planned.
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // Tier and override are read under the write lock, as PostgreSQL reads them
        // inside quota_consume_batch: a concurrent tier change is before or after.
        let context: ContextRow = sqlx::query_as(CONTEXT_SQL)
            .bind(user_id)
            .bind(feature)
            .fetch_one(&mut *tx)
            .await?;
        let context = context_from_row(context);
        let (tier, limit) = match rules::resolve_limit(
            context.tier.as_deref(),
            context.override_limit,
            &tier_limits,
        ) {
            Ok(resolved) => resolved,
            Err(tier) => return Ok(Checked::UnknownTier(tier)),
        };
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
        let earlier: Option<(i64, i64, bool)> = sqlx::query_as(
            "SELECT units, consumed_at_us, released FROM quota_consumptions \
             WHERE user_id = $1 AND feature = $2 AND idempotency_key = $3",
        )
        .bind(user_id)
        .bind(feature)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        let earlier = earlier.map(|(units, consumed_at_us, released)| KeyRow {
            units,
            consumed_at_us,
            released,
        });
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
        let mut used = rules::live_used(counted, expired_units);
        let outcome = rules::plan_consume(earlier, cutoff_us, limit, used, units);
        if outcome == Consumed::Recorded {
            // A released key's row is still here: it is replaced, counted afresh.
            sqlx::query(
                "INSERT INTO quota_consumptions (user_id, feature, idempotency_key, units, consumed_at_us, released) \
                 VALUES ($1, $2, $3, $4, $5, false) \
                 ON CONFLICT (user_id, feature, idempotency_key) DO UPDATE SET \
                 units = excluded.units, consumed_at_us = excluded.consumed_at_us, released = false",
            )
            .bind(user_id)
            .bind(feature)
            .bind(key)
            .bind(units)
            .bind(now_us)
            .execute(&mut *tx)
            .await?;
            used += units;
        }
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
        let events =
            crate::events::threshold_events(user_id, feature, &tier, &outcome, units, used, limit);
        reeve_events::insert_sqlite(&mut tx, &events, now_us).await?;
        tx.commit().await?;
        Ok(Checked::Done {
            consumed: outcome,
            usage: Usage { used, oldest_us },
            tier,
            limit,
        })
    }
}
