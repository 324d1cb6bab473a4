//! The PostgreSQL ledger: production store, safe for many credits-svc replicas.
//!
//! One call is one transaction of four round trips whatever the number of writes:
//! lock the users' balance rows in user order (so concurrent batches never deadlock),
//! read the entries already holding the writes' keys, plan in Rust, then append all
//! entries and move all balances in one UNNEST statement. A key claimed concurrently
//! by a different user's transaction shows up as a missing row of that statement; the
//! transaction is then rolled back and replanned, never half applied.

use std::collections::HashMap;

use async_trait::async_trait;
use reeve_runtime::Micros;
use sqlx::postgres::PgPool;

use super::{
    BalanceAudit, ENTRY_COLUMNS, EntryRow, LedgerStore, StoreError, entries, entries_by_key,
};
use crate::ledger::{self, LedgerEntry, WriteOutcome, WriteRequest};

/// How often a call is replanned after losing a key race before giving up.
const MAX_ATTEMPTS: usize = 8;

#[derive(Debug, Clone)]
pub struct PgLedger {
    pool: PgPool,
}

impl PgLedger {
    pub async fn connect(url: &str) -> Result<PgLedger, StoreError> {
        let pool = reeve_runtime::db::postgres_pool(url, 16).await?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        // Other services keep their own migrations in the same database.
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        Ok(PgLedger { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One attempt; `None` when a concurrent transaction took one of our keys first.
    async fn try_apply(
        &self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Option<Vec<WriteOutcome>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let to_create = ledger::users_to_create(writes);
        if !to_create.is_empty() {
            sqlx::query(
                "INSERT INTO credit_accounts (user_id, balance_micros, updated_at_us) \
                 SELECT user_id, 0, $2 FROM UNNEST($1::text[]) AS u(user_id) \
                 ON CONFLICT (user_id) DO NOTHING",
            )
            .bind(&to_create)
            .bind(now_us)
            .execute(&mut *tx)
            .await?;
        }
        let balances: HashMap<String, Micros> = sqlx::query_as::<_, (String, i64)>(
            "SELECT user_id, balance_micros FROM credit_accounts \
             WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE",
        )
        .bind(ledger::users_to_lock(writes))
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|(user, balance)| (user, Micros(balance)))
        .collect();
        let existing = entries_by_key(
            sqlx::query_as::<_, EntryRow>(&format!(
                "SELECT {ENTRY_COLUMNS} FROM credit_ledger WHERE idempotency_key = ANY($1::text[])"
            ))
            .bind(ledger::keys_of(writes))
            .fetch_all(&mut *tx)
            .await?,
        )?;

        let plan = ledger::plan(writes, &balances, &existing, now_us);
        if plan.inserts.is_empty() {
            tx.commit().await?;
            return Ok(Some(plan.finish(&[])));
        }
        let count = plan.inserts.len();
        let mut users = Vec::with_capacity(count);
        let mut kinds = Vec::with_capacity(count);
        let mut amounts = Vec::with_capacity(count);
        let mut balances_after = Vec::with_capacity(count);
        let mut keys = Vec::with_capacity(count);
        let mut descriptions = Vec::with_capacity(count);
        for entry in &plan.inserts {
            users.push(entry.user_id.as_str());
            kinds.push(entry.kind.as_str());
            amounts.push(entry.amount.0);
            balances_after.push(entry.balance_after.0);
            keys.push(entry.idempotency_key.as_str());
            descriptions.push(entry.description.as_str());
        }
        let inserted: Vec<(i64, String)> = sqlx::query_as(
            "WITH new_entries AS ( \
                INSERT INTO credit_ledger \
                    (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us) \
                SELECT user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, $7 \
                FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[]) \
                    WITH ORDINALITY AS w(user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, position) \
                ORDER BY position \
                ON CONFLICT (idempotency_key) DO NOTHING \
                RETURNING id, idempotency_key, user_id, amount_micros \
             ), moved AS ( \
                UPDATE credit_accounts AS a \
                SET balance_micros = a.balance_micros + d.delta_micros, updated_at_us = $7 \
                FROM (SELECT user_id, SUM(amount_micros)::int8 AS delta_micros FROM new_entries GROUP BY user_id) AS d \
                WHERE a.user_id = d.user_id \
             ) \
             SELECT id, idempotency_key FROM new_entries",
        )
        .bind(&users)
        .bind(&kinds)
        .bind(&amounts)
        .bind(&balances_after)
        .bind(&keys)
        .bind(&descriptions)
        .bind(now_us)
        .fetch_all(&mut *tx)
        .await?;
        if inserted.len() != count {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        let ids_by_key: HashMap<&str, i64> = inserted
            .iter()
            .map(|(id, key)| (key.as_str(), *id))
            .collect();
        let ids =
            keys.iter()
                .map(|key| {
                    ids_by_key.get(key).copied().ok_or_else(|| {
                        StoreError::Corrupt(format!("no id returned for key {key:?}"))
                    })
                })
                .collect::<Result<Vec<i64>, StoreError>>()?;
        Ok(Some(plan.finish(&ids)))
    }
}

#[async_trait]
impl LedgerStore for PgLedger {
    fn pool_stats(&self) -> reeve_runtime::telemetry::PoolStats {
        reeve_runtime::telemetry::PoolStats {
            open: self.pool.size(),
            idle: self.pool.num_idle(),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn balance(&self, user_id: &str) -> Result<Micros, StoreError> {
        let balance: Option<i64> =
            sqlx::query_scalar("SELECT balance_micros FROM credit_accounts WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(Micros(balance.unwrap_or(0)))
    }

    async fn apply(
        &self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        for _ in 0..MAX_ATTEMPTS {
            if let Some(outcomes) = self.try_apply(writes, now_us).await? {
                return Ok(outcomes);
            }
        }
        Err(StoreError::Contention)
    }

    async fn history(
        &self,
        user_id: &str,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let rows = sqlx::query_as::<_, EntryRow>(&format!(
            "SELECT {ENTRY_COLUMNS} FROM credit_ledger \
             WHERE user_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        ))
        .bind(user_id)
        .bind(before_id.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        entries(rows)
    }

    async fn audit(&self, user_id: &str) -> Result<BalanceAudit, StoreError> {
        let (cached, entries_sum, entries): (i64, i64, i64) = sqlx::query_as(
            "SELECT \
                COALESCE((SELECT balance_micros FROM credit_accounts WHERE user_id = $1), 0), \
                COALESCE((SELECT SUM(amount_micros) FROM credit_ledger WHERE user_id = $1), 0)::int8, \
                (SELECT COUNT(*) FROM credit_ledger WHERE user_id = $1)",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(BalanceAudit {
            cached: Micros(cached),
            entries_sum: Micros(entries_sum),
            entries,
        })
    }
}
