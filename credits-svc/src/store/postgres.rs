//! The PostgreSQL ledger: production store, safe for many credits-svc replicas.
//!
//! One call is one transaction of four round trips whatever the number of writes:
//! lock the users' balance rows in user order (so concurrent batches never deadlock),
//! read the entries already holding the writes' keys, plan in Rust, then append all
//! entries and move all balances in one UNNEST statement. A key claimed concurrently
//! by a different user's transaction shows up as a missing row of that statement; the
//! transaction is then rolled back and replanned, never half applied. A deadlock or
//! serialization failure (two batches of different users inserting the same keys in
//! different orders) is replanned the same way: load never answers INTERNAL.

use std::collections::HashMap;

use async_trait::async_trait;
use reeve_runtime::Micros;
use sqlx::PgConnection;
use sqlx::postgres::PgPool;

use super::{
    BalanceAudit, DisputeRow, ENTRY_COLUMNS, EntryRow, INSERT_PAYMENT_SQL, LedgerStore,
    PAYMENT_COLUMNS, PaymentOutcome, PaymentRow, PaymentTx, SELECT_DISPUTE_SQL, StoreError,
    TAKE_LEGACY_REFUNDS_SQL, UPDATE_PAYMENT_SQL, UPSERT_DISPUTE_SQL, entries, entries_by_key,
    run_payment_event, with_retries,
};
use crate::ledger::{self, LedgerEntry, WriteOutcome, WriteRequest};
use crate::payments::{DisputeState, PaymentEvent, PaymentState};

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
        let Some(outcomes) = apply_in(&mut tx, writes, now_us).await? else {
            tx.rollback().await?;
            return Ok(None);
        };
        tx.commit().await?;
        Ok(Some(outcomes))
    }

    async fn try_payment_event(
        &self,
        event: &PaymentEvent,
        now_us: i64,
    ) -> Result<Option<PaymentOutcome>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(outcome) = run_payment_event(&mut PgTx(&mut tx), event, now_us).await? else {
            tx.rollback().await?;
            return Ok(None);
        };
        tx.commit().await?;
        Ok(Some(outcome))
    }
}

/// Applies `writes` inside an open transaction in four round trips: create missing
/// accounts, lock balances in user order, read used keys, append and move balances in
/// one statement. `None` when a concurrent transaction claimed one of the keys first
/// (the caller rolls back and replans).
async fn apply_in(
    conn: &mut PgConnection,
    writes: &[WriteRequest],
    now_us: i64,
) -> Result<Option<Vec<WriteOutcome>>, StoreError> {
    let to_create = ledger::users_to_create(writes);
    if !to_create.is_empty() {
        sqlx::query(
            "INSERT INTO credit_accounts (user_id, balance_micros, updated_at_us) \
             SELECT user_id, 0, $2 FROM UNNEST($1::text[]) AS u(user_id) \
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(&to_create)
        .bind(now_us)
        .execute(&mut *conn)
        .await?;
    }
    let balances: HashMap<String, Micros> = sqlx::query_as::<_, (String, i64)>(
        "SELECT user_id, balance_micros FROM credit_accounts \
         WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE",
    )
    .bind(ledger::users_to_lock(writes))
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|(user, balance)| (user, Micros(balance)))
    .collect();
    let existing = entries_by_key(
        sqlx::query_as::<_, EntryRow>(&format!(
            "SELECT {ENTRY_COLUMNS} FROM credit_ledger WHERE idempotency_key = ANY($1::text[])"
        ))
        .bind(ledger::keys_of(writes))
        .fetch_all(&mut *conn)
        .await?,
    )?;

    let plan = ledger::plan(writes, &balances, &existing, now_us);
    if plan.inserts.is_empty() {
        return Ok(Some(plan.finish(&[])));
    }
    let count = plan.inserts.len();
    let mut users = Vec::with_capacity(count);
    let mut kinds = Vec::with_capacity(count);
    let mut amounts = Vec::with_capacity(count);
    let mut balances_after = Vec::with_capacity(count);
    let mut keys = Vec::with_capacity(count);
    let mut sources = Vec::with_capacity(count);
    let mut payments = Vec::with_capacity(count);
    let mut descriptions = Vec::with_capacity(count);
    for entry in &plan.inserts {
        let write = &entry.write;
        users.push(write.user_id.as_str());
        kinds.push(write.kind.as_str());
        amounts.push(write.amount.0);
        balances_after.push(entry.balance_after.0);
        keys.push(write.idempotency_key.as_str());
        sources.push(write.key_source.as_str());
        payments.push(write.payment_id.as_deref());
        descriptions.push(write.description.as_str());
    }
    let inserted: Vec<(i64, String, String)> = sqlx::query_as(
        "WITH new_entries AS ( \
            INSERT INTO credit_ledger \
                (user_id, kind, amount_micros, balance_after_micros, idempotency_key, key_source, payment_id, description, created_at_us) \
            SELECT user_id, kind, amount_micros, balance_after_micros, idempotency_key, key_source, payment_id, description, $9 \
            FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[]) \
                WITH ORDINALITY AS w(user_id, kind, amount_micros, balance_after_micros, idempotency_key, key_source, payment_id, description, position) \
            ORDER BY position \
            ON CONFLICT (idempotency_key, key_source) DO NOTHING \
            RETURNING id, idempotency_key, key_source, user_id, amount_micros \
         ), moved AS ( \
            UPDATE credit_accounts AS a \
            SET balance_micros = a.balance_micros + d.delta_micros, updated_at_us = $9 \
            FROM (SELECT user_id, SUM(amount_micros)::int8 AS delta_micros FROM new_entries GROUP BY user_id) AS d \
            WHERE a.user_id = d.user_id \
         ) \
         SELECT id, idempotency_key, key_source FROM new_entries",
    )
    .bind(&users)
    .bind(&kinds)
    .bind(&amounts)
    .bind(&balances_after)
    .bind(&keys)
    .bind(&sources)
    .bind(&payments)
    .bind(&descriptions)
    .bind(now_us)
    .fetch_all(&mut *conn)
    .await?;
    if inserted.len() != count {
        return Ok(None);
    }
    let ids_by_key: HashMap<(&str, &str), i64> = inserted
        .iter()
        .map(|(id, key, source)| ((key.as_str(), source.as_str()), *id))
        .collect();
    let ids = keys
        .iter()
        .zip(&sources)
        .map(|(key, source)| {
            ids_by_key
                .get(&(*key, *source))
                .copied()
                .ok_or_else(|| StoreError::Corrupt(format!("no id returned for key {key:?}")))
        })
        .collect::<Result<Vec<i64>, StoreError>>()?;
    Ok(Some(plan.finish(&ids)))
}

/// The payment-event steps on an open PostgreSQL transaction.
struct PgTx<'a>(&'a mut PgConnection);

#[async_trait]
impl PaymentTx for PgTx<'_> {
    async fn payment(&mut self, payment_id: &str) -> Result<Option<PaymentState>, StoreError> {
        let row = sqlx::query_as::<_, PaymentRow>(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM credit_payments WHERE payment_id = $1"
        ))
        .bind(payment_id)
        .fetch_optional(&mut *self.0)
        .await?;
        Ok(row.map(PaymentState::from))
    }

    async fn lock_user(&mut self, user_id: &str) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 FROM credit_accounts WHERE user_id = $1 FOR UPDATE")
            .bind(user_id)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn stripe_entry(&mut self, key: &str) -> Result<Option<LedgerEntry>, StoreError> {
        let row = sqlx::query_as::<_, EntryRow>(&format!(
            "SELECT {ENTRY_COLUMNS} FROM credit_ledger WHERE idempotency_key = $1 AND key_source = 'stripe'"
        ))
        .bind(key)
        .fetch_optional(&mut *self.0)
        .await?;
        row.map(LedgerEntry::try_from).transpose()
    }

    async fn dispute(&mut self, dispute_id: &str) -> Result<Option<DisputeState>, StoreError> {
        let row = sqlx::query_as::<_, DisputeRow>(SELECT_DISPUTE_SQL)
            .bind(dispute_id)
            .fetch_optional(&mut *self.0)
            .await?;
        Ok(row.map(DisputeState::from))
    }

    async fn take_legacy_refunds(&mut self, charge_id: &str) -> Result<Micros, StoreError> {
        let taken: Option<i64> = sqlx::query_scalar(TAKE_LEGACY_REFUNDS_SQL)
            .bind(charge_id)
            .fetch_optional(&mut *self.0)
            .await?;
        Ok(Micros(taken.unwrap_or(0)))
    }

    async fn save_payment(&mut self, payment: &PaymentState) -> Result<(), StoreError> {
        sqlx::query(UPDATE_PAYMENT_SQL)
            .bind(&payment.payment_id)
            .bind(payment.refunded.0)
            .bind(payment.refund_debits_total.0)
            .bind(payment.disputed.0)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn insert_payment(&mut self, purchase: &LedgerEntry) -> Result<(), StoreError> {
        sqlx::query(INSERT_PAYMENT_SQL)
            .bind(purchase.payment_id.as_deref())
            .bind(&purchase.user_id)
            .bind(purchase.amount.0)
            .bind(purchase.created_at_us)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn save_dispute(&mut self, dispute: &DisputeState) -> Result<(), StoreError> {
        sqlx::query(UPSERT_DISPUTE_SQL)
            .bind(&dispute.dispute_id)
            .bind(dispute.payment_id.as_deref())
            .bind(dispute.debited.0)
            .bind(dispute.reinstated)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn apply(
        &mut self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Option<Vec<WriteOutcome>>, StoreError> {
        apply_in(self.0, writes, now_us).await
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
        with_retries(|| self.try_apply(writes, now_us)).await
    }

    async fn record_payment_event(
        &self,
        event: &PaymentEvent,
        now_us: i64,
    ) -> Result<PaymentOutcome, StoreError> {
        if let Err(invalid) = event.validate() {
            return Ok(PaymentOutcome::Invalid(invalid));
        }
        with_retries(|| self.try_payment_event(event, now_us)).await
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
