//! The SQLite ledger: the embedded default, one database file and no server.
//!
//! Every call is one `BEGIN IMMEDIATE` transaction, so writers are serialised by
//! SQLite itself (across processes too) and a plan made from the balances it read
//! cannot be overtaken. Statements run in-process, so per-entry statements cost
//! microseconds, not network round trips.

use std::collections::HashMap;

use async_trait::async_trait;
use reeve_runtime::Micros;
use sqlx::SqliteConnection;
use sqlx::sqlite::SqlitePool;

// The store module's rows, SQL text and shared steps.
#[allow(clippy::wildcard_imports)]
use super::*;
use crate::ledger;

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
        super::outbox::migrate_sqlite(&pool).await?;
        Ok(SqliteLedger { pool })
    }
}

#[async_trait]
impl LedgerStore for SqliteLedger {
    async fn payment_entries(
        &self,
        payment_ids: &[String],
        since_us: i64,
        until_us: i64,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let rows = if payment_ids.is_empty() {
            sqlx::query_as::<_, EntryRow>(&format!(
                "SELECT {ENTRY_COLUMNS} FROM credit_ledger \
                 WHERE (key_source = 'stripe' OR payment_id IS NOT NULL) \
                 AND created_at_us >= ? AND created_at_us < ? AND id > ? ORDER BY id LIMIT ?"
            ))
            .bind(since_us)
            .bind(until_us)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
        } else {
            // Numbered parameters, each id bound once and used in both lists.
            let n = payment_ids.len();
            let list = (1..=n)
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT {ENTRY_COLUMNS} FROM credit_ledger \
                 WHERE (payment_id IN ({list}) OR idempotency_key IN ({list})) \
                 AND id > ?{} ORDER BY id LIMIT ?{}",
                n + 1,
                n + 2
            );
            let mut query = sqlx::query_as::<_, EntryRow>(&sql);
            for id in payment_ids {
                query = query.bind(id);
            }
            query
                .bind(after_id)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
        };
        entries(rows)
    }

    fn pool_stats(&self) -> reeve_runtime::telemetry::PoolStats {
        reeve_runtime::telemetry::PoolStats {
            open: self.pool.size(),
            idle: self.pool.num_idle(),
        }
    }

    async fn set_balance_alert(
        &self,
        user_id: &str,
        threshold: Option<Micros>,
        now_us: i64,
    ) -> Result<(), StoreError> {
        super::outbox::set_alert_sqlite(&self.pool, user_id, threshold, now_us).await
    }

    async fn warn_expiring(
        &self,
        now_us: i64,
        ahead_us: i64,
        limit: u32,
    ) -> Result<usize, StoreError> {
        super::outbox::warn_expiring_sqlite(&self.pool, now_us, ahead_us, limit).await
    }

    fn events(&self) -> reeve_events::EventStore {
        reeve_events::EventStore::Sqlite(self.pool.clone())
    }

    fn topups(&self) -> super::TopUpStore {
        super::TopUpStore::Sqlite(self.pool.clone())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn balance(&self, user_id: &str, now_us: i64) -> Result<BalanceDetails, StoreError> {
        let rows = sqlx::query_as::<_, BalanceRow>(BALANCE_SQL)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        balance_of(rows, now_us)
    }

    async fn lots(
        &self,
        user_id: &str,
        include_spent: bool,
        now_us: i64,
    ) -> Result<Vec<Lot>, StoreError> {
        let rows = sqlx::query_as::<_, LotRow>(&format!(
            "SELECT {LOT_COLUMNS} FROM credit_lots WHERE user_id = $1 AND (remaining_micros > 0 OR $2)"
        ))
        .bind(user_id)
        .bind(include_spent)
        .fetch_all(&self.pool)
        .await?;
        Ok(lots_in_order(lots_of(rows)?, include_spent, now_us))
    }

    async fn lot(&self, lot_id: i64) -> Result<Option<Lot>, StoreError> {
        let row = sqlx::query_as::<_, LotRow>(&format!(
            "SELECT {LOT_COLUMNS} FROM credit_lots WHERE id = $1"
        ))
        .bind(lot_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Lot::try_from).transpose()
    }

    async fn apply_holds(
        &self,
        ops: &[HoldOp],
        now_us: i64,
    ) -> Result<Vec<HoldOutcome>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let ops: Vec<Op> = ops.iter().cloned().map(Op::Hold).collect();
        with_retries(|| async {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let outcomes = apply_in(&mut tx, &ops, &[], now_us).await?;
            tx.commit().await?;
            Ok(Some(hold_outcomes(outcomes)))
        })
        .await
    }

    async fn hold(&self, hold_id: &str) -> Result<Option<Hold>, StoreError> {
        let row = sqlx::query_as::<_, HoldRow>(&format!(
            "SELECT {HOLD_COLUMNS} FROM credit_holds WHERE hold_id = $1"
        ))
        .bind(hold_id)
        .fetch_optional(&self.pool)
        .await?;
        let reservations: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT hold_id, lot_id, amount_micros FROM credit_hold_reservations \
             WHERE hold_id = $1 ORDER BY position",
        )
        .bind(hold_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(holds_of(row.into_iter().collect(), reservations)?.pop())
    }

    async fn holds(
        &self,
        user_id: &str,
        status: Option<HoldStatus>,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<Hold>, StoreError> {
        let (before_us, before_id) = before.unwrap_or((i64::MAX, String::new()));
        let rows = sqlx::query_as::<_, HoldRow>(&holds_page_sql(status))
            .bind(user_id)
            .bind(before_us)
            .bind(before_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        holds_of(rows, Vec::new())
    }

    async fn expire_due(&self, now_us: i64, limit: u32) -> Result<usize, StoreError> {
        with_retries(|| async {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let users: Vec<String> = sqlx::query_scalar(DUE_USERS_SQL)
                .bind(now_us)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
            if !users.is_empty() {
                apply_in(&mut tx, &[], &users, now_us).await?;
            }
            tx.commit().await?;
            Ok(Some(users.len()))
        })
        .await
    }

    async fn apply(
        &self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let ops: Vec<Op> = writes.iter().cloned().map(Op::Write).collect();
        with_retries(|| async {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let outcomes = apply_in(&mut tx, &ops, &[], now_us).await?;
            tx.commit().await?;
            Ok(Some(write_outcomes(outcomes)))
        })
        .await
    }

    async fn record_payment_event(
        &self,
        event: &PaymentEvent,
        now_us: i64,
    ) -> Result<PaymentOutcome, StoreError> {
        if let Err(invalid) = event.validate() {
            return Ok(PaymentOutcome::Invalid(invalid));
        }
        with_retries(|| async {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            // The transaction is exclusive: no key race can be lost.
            let outcome = run_payment_event(&mut SqliteTx(&mut tx), event, now_us).await?;
            tx.commit().await?;
            Ok(outcome)
        })
        .await
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

/// Applies `ops` inside an exclusive transaction (no other writer can overtake it);
/// `sweep` names users whose due lots and holds must expire even without an operation.
async fn apply_in(
    conn: &mut SqliteConnection,
    ops: &[Op],
    sweep: &[String],
    now_us: i64,
) -> Result<Vec<OpOutcome>, StoreError> {
    let writes = writes_of(ops);
    let hold_ids = hold_ids_of(ops);
    for user in ledger::users_to_create(&writes) {
        sqlx::query("INSERT OR IGNORE INTO credit_accounts (user_id, balance_micros, updated_at_us) VALUES (?, 0, ?)")
            .bind(user)
            .bind(now_us)
            .execute(&mut *conn)
            .await?;
    }
    let mut users = ledger::users_to_lock(&writes);
    users.extend(sweep.iter().cloned());
    users.extend(hold_users_of(ops));
    let mut holds_rows: Vec<HoldRow> = Vec::new();
    for chunk in hold_ids.chunks(IN_LIST_CHUNK) {
        let sql = format!(
            "SELECT {HOLD_COLUMNS} FROM credit_holds WHERE hold_id IN ({})",
            placeholders(chunk.len())
        );
        let mut query = sqlx::query_as::<_, HoldRow>(&sql);
        for id in chunk {
            query = query.bind(id);
        }
        holds_rows.extend(query.fetch_all(&mut *conn).await?);
    }
    users.extend(holds_rows.iter().map(|h| h.user_id.clone()));
    users.sort_unstable();
    users.dedup();
    let mut balances: HashMap<String, Micros> = HashMap::new();
    let mut lots = Vec::new();
    for chunk in users.chunks(IN_LIST_CHUNK) {
        let sql = format!(
            "SELECT user_id, balance_micros FROM credit_accounts WHERE user_id IN ({})",
            placeholders(chunk.len())
        );
        let mut query = sqlx::query_as::<_, (String, i64)>(&sql);
        for user in chunk {
            query = query.bind(user);
        }
        balances.extend(
            query
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .map(|(u, b)| (u, Micros(b))),
        );
        let sql = format!(
            "SELECT {LOT_COLUMNS} FROM credit_lots WHERE remaining_micros > 0 AND user_id IN ({})",
            placeholders(chunk.len())
        );
        let mut query = sqlx::query_as::<_, LotRow>(&sql);
        for user in chunk {
            query = query.bind(user);
        }
        lots.extend(lots_of(query.fetch_all(&mut *conn).await?)?);
    }
    let mut existing = ExistingEntries::new();
    for keys in keys_of_ops(ops).chunks(IN_LIST_CHUNK) {
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM credit_ledger WHERE idempotency_key IN ({})",
            placeholders(keys.len())
        );
        let mut query = sqlx::query_as::<_, EntryRow>(&sql);
        for key in keys {
            query = query.bind(key);
        }
        existing.extend(entries_by_key(query.fetch_all(&mut *conn).await?)?);
    }

    if !hold_ids.is_empty() || lots.iter().any(|lot| lot.held.0 > 0) {
        for chunk in users.chunks(IN_LIST_CHUNK) {
            let sql = format!(
                "SELECT {HOLD_COLUMNS} FROM credit_holds \
                 WHERE status = 'held' AND expires_at_us <= ? AND user_id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query_as::<_, HoldRow>(&sql).bind(now_us);
            for user in chunk {
                query = query.bind(user);
            }
            for row in query.fetch_all(&mut *conn).await? {
                if !holds_rows.iter().any(|h| h.hold_id == row.hold_id) {
                    holds_rows.push(row);
                }
            }
        }
    }
    let mut reservations: Vec<(String, i64, i64)> = Vec::new();
    let read: Vec<&str> = holds_rows.iter().map(|row| row.hold_id.as_str()).collect();
    for chunk in read.chunks(IN_LIST_CHUNK) {
        let sql = format!(
            "SELECT hold_id, lot_id, amount_micros FROM credit_hold_reservations \
             WHERE hold_id IN ({}) ORDER BY hold_id, position",
            placeholders(chunk.len())
        );
        let mut query = sqlx::query_as::<_, (String, i64, i64)>(&sql);
        for id in chunk {
            query = query.bind(*id);
        }
        reservations.extend(query.fetch_all(&mut *conn).await?);
    }
    let holds = holds_of(holds_rows, reservations)?;

    let plan = ledger::plan_ops(ops, &balances, &lots, &holds, &existing, now_us);
    // Lots the plan makes get their ids first, so entries drawing from them can say so
    // (lots are never deleted, and this transaction is the only writer).
    let lot_ids: Vec<i64> = if plan.new_lots.is_empty() {
        Vec::new()
    } else {
        let next: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) + 1 FROM credit_lots")
            .fetch_one(&mut *conn)
            .await?;
        (0..plan.new_lots.len() as i64).map(|k| next + k).collect()
    };
    let draws = planned_draws(&plan, &lot_ids);
    let mut ids = Vec::with_capacity(plan.inserts.len());
    for (entry, draws) in plan.inserts.iter().zip(&draws) {
        let write = &entry.write;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO credit_ledger \
                (user_id, kind, amount_micros, balance_after_micros, idempotency_key, key_source, payment_id, description, target_lot_id, draws, created_at_us) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&write.user_id)
        .bind(write.kind.as_str())
        .bind(write.amount.0)
        .bind(entry.balance_after.0)
        .bind(&write.idempotency_key)
        .bind(write.key_source.as_str())
        .bind(write.payment_id.as_deref())
        .bind(&write.description)
        .bind(write.target_lot_id)
        .bind(draws.as_deref())
        .bind(now_us)
        .fetch_one(&mut *conn)
        .await?;
        ids.push(id);
    }
    for (lot, id) in plan.new_lots.iter().zip(&lot_ids) {
        sqlx::query(
            "INSERT INTO credit_lots (id, user_id, category, priority, expires_at_us, source, \
             original_micros, remaining_micros, entry_id, created_at_us) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(&lot.user_id)
        .bind(lot.terms.category.as_str())
        .bind(lot.terms.priority)
        .bind(lot.terms.expires_at_us)
        .bind(&lot.source)
        .bind(lot.original.0)
        .bind(lot.remaining.0)
        .bind(ids[lot.entry])
        .bind(now_us)
        .execute(&mut *conn)
        .await?;
    }
    let spent = plan.spent();
    let mut moved: Vec<i64> = spent.keys().chain(plan.lot_moves.keys()).copied().collect();
    moved.sort_unstable();
    moved.dedup();
    for lot_id in moved {
        let lot_move = plan.lot_moves.get(&lot_id).copied().unwrap_or_default();
        sqlx::query(
            "UPDATE credit_lots SET remaining_micros = remaining_micros - ?, \
             held_micros = held_micros + ?, expired_micros = expired_micros + ? WHERE id = ?",
        )
        .bind(spent.get(&lot_id).copied().unwrap_or(0))
        .bind(lot_move.held)
        .bind(lot_move.expired)
        .bind(lot_id)
        .execute(&mut *conn)
        .await?;
    }
    save_holds(conn, &plan, &ids).await?;
    super::outbox::emit_sqlite(conn, &plan, &balances, &lots, now_us).await?;
    for (user, delta) in plan.deltas() {
        sqlx::query("UPDATE credit_accounts SET balance_micros = balance_micros + ?, updated_at_us = ? WHERE user_id = ?")
            .bind(delta)
            .bind(now_us)
            .bind(user)
            .execute(&mut *conn)
            .await?;
    }
    Ok(plan.finish_ops(&ids, &lot_ids))
}

/// Saves the plan's holds: new ones with their reservations, changed ones' state (a
/// resolved hold's reservations go).
async fn save_holds(
    conn: &mut SqliteConnection,
    plan: &ledger::Plan,
    entry_ids: &[i64],
) -> Result<(), StoreError> {
    let saved = plan.saved_holds(entry_ids);
    for (change, hold) in plan.holds.iter().zip(&saved) {
        if !change.dirty {
            continue;
        }
        if change.is_new {
            sqlx::query(&format!(
                "INSERT INTO credit_holds ({HOLD_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ))
            .bind(&hold.hold_id)
            .bind(&hold.user_id)
            .bind(hold.amount.0)
            .bind(hold.status.as_str())
            .bind(hold.settled.map(|m| m.0))
            .bind(hold.entry_id)
            .bind(hold.shortfall.0)
            .bind(hold.late)
            .bind(&hold.description)
            .bind(hold.created_at_us)
            .bind(hold.expires_at_us)
            .bind(hold.resolved_at_us)
            .execute(&mut *conn)
            .await?;
            if hold.status == HoldStatus::Held {
                for (position, (lot, amount)) in hold.reservations.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO credit_hold_reservations (hold_id, lot_id, amount_micros, position) \
                         VALUES (?, ?, ?, ?)",
                    )
                    .bind(&hold.hold_id)
                    .bind(lot)
                    .bind(amount.0)
                    .bind(i64::try_from(position).unwrap_or(i64::MAX))
                    .execute(&mut *conn)
                    .await?;
                }
            }
            continue;
        }
        sqlx::query(UPDATE_HOLD_SQL)
            .bind(&hold.hold_id)
            .bind(hold.status.as_str())
            .bind(hold.settled.map(|m| m.0))
            .bind(hold.entry_id)
            .bind(hold.shortfall.0)
            .bind(hold.late)
            .bind(hold.expires_at_us)
            .bind(hold.resolved_at_us)
            .execute(&mut *conn)
            .await?;
        if hold.status != HoldStatus::Held {
            sqlx::query(DELETE_RESERVATIONS_SQL)
                .bind(&hold.hold_id)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// The payment-event steps on an open SQLite transaction.
struct SqliteTx<'a>(&'a mut SqliteConnection);

payment_tx_impl! {
    SqliteTx<'_>;
    async fn lock_user(&mut self, _user_id: &str) -> Result<(), StoreError> {
        // BEGIN IMMEDIATE already holds the database's write lock.
        Ok(())
    }

    async fn apply(
        &mut self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Option<Vec<WriteOutcome>>, StoreError> {
        let ops: Vec<Op> = writes.iter().cloned().map(Op::Write).collect();
        apply_in(self.0, &ops, &[], now_us)
            .await
            .map(|outcomes| Some(write_outcomes(outcomes)))
    }
}
