//! The SQLite ledger: the embedded default, one database file and no server.
//!
//! Every call is one `BEGIN IMMEDIATE` transaction, so writers are serialised by
//! SQLite itself (across processes too) and a plan made from the balances it read
//! cannot be overtaken. Statements run in-process, so per-entry statements cost
//! microseconds, not network round trips.

use std::collections::HashMap;

use async_trait::async_trait;
use reeve_runtime::Micros;
use sqlx::sqlite::SqlitePool;

use super::{
    BalanceAudit, ENTRY_COLUMNS, EntryRow, LedgerStore, StoreError, entries, entries_by_key,
};
use crate::ledger::{self, LedgerEntry, WriteOutcome, WriteRequest};

/// Bound parameters per `IN (…)` list, well under SQLite's limit.
const IN_LIST_CHUNK: usize = 4_096;

#[derive(Debug, Clone)]
pub struct SqliteLedger {
    pool: SqlitePool,
}

fn placeholders(count: usize) -> String {
    vec!["?"; count].join(", ")
}

impl SqliteLedger {
    pub async fn connect(url: &str) -> Result<SqliteLedger, StoreError> {
        let pool = reeve_runtime::db::sqlite_pool(url).await?;
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        Ok(SqliteLedger { pool })
    }
}

#[async_trait]
impl LedgerStore for SqliteLedger {
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
            sqlx::query_scalar("SELECT balance_micros FROM credit_accounts WHERE user_id = ?")
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for user in ledger::users_to_create(writes) {
            sqlx::query("INSERT OR IGNORE INTO credit_accounts (user_id, balance_micros, updated_at_us) VALUES (?, 0, ?)")
                .bind(user)
                .bind(now_us)
                .execute(&mut *tx)
                .await?;
        }
        let mut balances: HashMap<String, Micros> = HashMap::new();
        for users in ledger::users_to_lock(writes).chunks(IN_LIST_CHUNK) {
            let sql = format!(
                "SELECT user_id, balance_micros FROM credit_accounts WHERE user_id IN ({})",
                placeholders(users.len())
            );
            let mut query = sqlx::query_as::<_, (String, i64)>(&sql);
            for user in users {
                query = query.bind(user);
            }
            balances.extend(
                query
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .map(|(u, b)| (u, Micros(b))),
            );
        }
        let mut existing: HashMap<String, LedgerEntry> = HashMap::new();
        for keys in ledger::keys_of(writes).chunks(IN_LIST_CHUNK) {
            let sql = format!(
                "SELECT {ENTRY_COLUMNS} FROM credit_ledger WHERE idempotency_key IN ({})",
                placeholders(keys.len())
            );
            let mut query = sqlx::query_as::<_, EntryRow>(&sql);
            for key in keys {
                query = query.bind(key);
            }
            existing.extend(entries_by_key(query.fetch_all(&mut *tx).await?)?);
        }

        let plan = ledger::plan(writes, &balances, &existing, now_us);
        let mut ids = Vec::with_capacity(plan.inserts.len());
        for entry in &plan.inserts {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO credit_ledger \
                    (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            )
            .bind(&entry.user_id)
            .bind(entry.kind.as_str())
            .bind(entry.amount.0)
            .bind(entry.balance_after.0)
            .bind(&entry.idempotency_key)
            .bind(&entry.description)
            .bind(now_us)
            .fetch_one(&mut *tx)
            .await?;
            ids.push(id);
        }
        for (user, delta) in plan.deltas() {
            sqlx::query("UPDATE credit_accounts SET balance_micros = balance_micros + ?, updated_at_us = ? WHERE user_id = ?")
                .bind(delta)
                .bind(now_us)
                .bind(user)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(plan.finish(&ids))
    }

    async fn history(
        &self,
        user_id: &str,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let rows = sqlx::query_as::<_, EntryRow>(&format!(
            "SELECT {ENTRY_COLUMNS} FROM credit_ledger \
             WHERE user_id = ? AND id < ? ORDER BY id DESC LIMIT ?"
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
                COALESCE((SELECT balance_micros FROM credit_accounts WHERE user_id = ?1), 0), \
                COALESCE((SELECT SUM(amount_micros) FROM credit_ledger WHERE user_id = ?1), 0), \
                (SELECT COUNT(*) FROM credit_ledger WHERE user_id = ?1)",
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
