//! The PostgreSQL ledger: production store, safe for many credits-svc replicas.
//!
//! One call is one transaction of five round trips whatever the number of writes:
//! lock the users' balance rows in user order (so concurrent batches never deadlock),
//! read their lots and the entries already holding the writes' keys, plan in Rust,
//! then append all entries and draws, move all balances and lot remainders in one
//! UNNEST statement (credits that make lots add one statement per lot). A key claimed concurrently
//! by a different user's transaction shows up as a missing row of that statement; the
//! transaction is then rolled back and replanned, never half applied. A deadlock or
//! serialization failure (two batches of different users inserting the same keys in
//! different orders) is replanned the same way: load never answers INTERNAL.
//!
//! A caller's batch of independent writes (`DeductBatch`, not the group commit of
//! single calls) locks with `SKIP LOCKED`: the writes of users another transaction
//! holds (or without a balance row) go to a second transaction beside the first, which
//! waits for them, so one shared user does not keep a whole batch (and the batches
//! queued behind its locks) waiting. Such a call can end half applied on an error.

use std::collections::HashMap;

use async_trait::async_trait;
use reeve_runtime::Micros;
use sqlx::PgConnection;
use sqlx::postgres::PgPool;

// The store module's rows, SQL text and shared steps.
#[allow(clippy::wildcard_imports)]
use super::*;
use crate::ledger;

/// A page of a user's history, newest first, below an entry id ($2; `i64::MAX` for the
/// first page). Ordered on `-id`, which only the index `credit_ledger_user_newest`
/// (user_id, -id) provides: on `id DESC` the planner could take a backward scan of the
/// primary key for a user with many entries and walk every other user's newer ones
/// (migration 1006).
pub const HISTORY_FILTER: &str = "WHERE user_id = $1 AND -id > -$2 ORDER BY -id LIMIT $3";

/// The hold columns with the reservations, kept in the hold's row on PostgreSQL
/// (migration 1009): lot ids and amounts in position order.
const PG_HOLD_COLUMNS: &str = concat!(hold_columns!(), ", reserved_lot_ids, reserved_micros");

/// A hold with its reservations in one row.
#[derive(sqlx::FromRow)]
struct PgHoldRow {
    #[sqlx(flatten)]
    hold: HoldRow,
    reserved_lot_ids: Vec<i64>,
    reserved_micros: Vec<i64>,
}

impl TryFrom<PgHoldRow> for Hold {
    type Error = StoreError;

    fn try_from(row: PgHoldRow) -> Result<Hold, StoreError> {
        let mut hold = Hold::try_from(row.hold)?;
        if row.reserved_lot_ids.len() != row.reserved_micros.len() {
            return Err(StoreError::Corrupt(format!(
                "hold {:?} has {} reserved lots and {} amounts",
                hold.hold_id,
                row.reserved_lot_ids.len(),
                row.reserved_micros.len()
            )));
        }
        hold.reservations = row
            .reserved_lot_ids
            .into_iter()
            .zip(row.reserved_micros)
            .map(|(lot, amount)| (lot, Micros(amount)))
            .collect();
        Ok(hold)
    }
}

/// The cached balances and the lots with a remainder of many users, with what their
/// held holds reserve from each, in one statement (a sweep committing in between cannot
/// be half seen); each row starts with the 1-based position of the user it belongs to,
/// and a lot appears once per reservation on it. The holds are read only for lots
/// that carry reservations.
const PG_BALANCE_BATCH_SQL: &str = "SELECT u.ord, a.balance_micros, l.id, l.user_id, l.category, \
     l.priority, l.expires_at_us, l.source, l.original_micros, l.remaining_micros, \
     l.created_at_us, l.held_micros, l.expired_micros, r.amount_micros AS reserved_micros, \
     r.hold_expires_at_us \
     FROM UNNEST($1::text[]) WITH ORDINALITY AS u(user_id, ord) \
     LEFT JOIN credit_accounts AS a ON a.user_id = u.user_id \
     LEFT JOIN credit_lots AS l ON l.user_id = u.user_id AND l.remaining_micros > 0 AND l.live \
     LEFT JOIN LATERAL ( \
         SELECT r.lot_id, r.amount_micros, h.expires_at_us AS hold_expires_at_us \
         FROM credit_holds AS h, UNNEST(h.reserved_lot_ids, h.reserved_micros) AS r(lot_id, amount_micros) \
         WHERE h.user_id = l.user_id AND h.status = 'held' AND l.held_micros > 0 \
     ) AS r ON r.lot_id = l.id";

/// One balance question waiting for its batch: the user and the instant it was asked.
#[derive(Debug, Clone)]
struct BalanceRead {
    user_id: String,
    now_us: i64,
}

/// Concurrent balance questions coalesced into one statement (a question sees data at
/// least as fresh as when it arrived: its batch starts after it).
type BalanceReads =
    reeve_runtime::group_commit::GroupCommit<BalanceRead, BalanceDetails, StoreError>;

/// Concurrent balance batches, and the most questions one carries.
const BALANCE_READ_WORKERS: usize = 2;
const BALANCE_READ_MAX_BATCH: usize = 256;

#[derive(Clone)]
pub struct PgLedger {
    pool: PgPool,
    balances: BalanceReads,
}

impl std::fmt::Debug for PgLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLedger")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// The balances of a batch of questions, in one statement, each planned with its own
/// instant.
async fn read_balances(
    pool: &PgPool,
    reads: Vec<BalanceRead>,
) -> Result<Vec<BalanceDetails>, StoreError> {
    let users: Vec<&str> = reads.iter().map(|r| r.user_id.as_str()).collect();
    let rows: Vec<(i64, BalanceRow)> = sqlx::query(PG_BALANCE_BATCH_SQL)
        .bind(&users)
        .try_map(|row: sqlx::postgres::PgRow| {
            let ord: i64 = sqlx::Row::try_get(&row, 0)?;
            Ok((ord, <BalanceRow as sqlx::FromRow<_>>::from_row(&row)?))
        })
        .fetch_all(pool)
        .await?;
    let mut per_read: Vec<Vec<BalanceRow>> = Vec::new();
    per_read.resize_with(reads.len(), Vec::new);
    for (ord, row) in rows {
        let slot = usize::try_from(ord)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| per_read.get_mut(i))
            .ok_or_else(|| StoreError::Corrupt(format!("a balance row for position {ord}")))?;
        slot.push(row);
    }
    reads
        .iter()
        .zip(per_read)
        .map(|(read, rows)| balance_of(rows, read.now_us))
        .collect()
}

impl PgLedger {
    pub async fn connect(url: &str) -> Result<PgLedger, StoreError> {
        // Generic plans: the ledger's statements take arrays whose sizes a custom plan
        // would look at, and re-planning the hold statements on every call cost more
        // (0.23 ms each in pg_stat_statements) than the plans saved.
        let pool = reeve_runtime::db::postgres_pool_with(
            url,
            16,
            &[("plan_cache_mode", "force_generic_plan")],
        )
        .await?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        // Other services keep their own migrations in the same database.
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        super::outbox::migrate_pg(&pool).await?;
        let read_pool = pool.clone();
        let balances = BalanceReads::start(
            BALANCE_READ_WORKERS,
            BALANCE_READ_MAX_BATCH,
            std::sync::Arc::new(move |reads| {
                let pool = read_pool.clone();
                Box::pin(async move { read_balances(&pool, reads).await })
            }),
        );
        Ok(PgLedger { pool, balances })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `writes` in one transaction, or (`independent`) as a caller's batch of
    /// independent writes that may skip busy users.
    async fn apply_writes(
        &self,
        writes: &[WriteRequest],
        now_us: i64,
        independent: bool,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let ops: Vec<Op> = writes.iter().cloned().map(Op::Write).collect();
        let outcomes = if independent {
            self.apply_skipping_busy(&ops, now_us).await?
        } else {
            apply_blocking(&self.pool, &ops, now_us).await?
        };
        Ok(write_outcomes(outcomes))
    }

    /// A caller's batch of independent writes ([`LedgerStore::apply_independent`]).
    /// When it may ([`skips_busy_users`]), it first skips the users whose balances
    /// another transaction holds. Their writes go to a second transaction, started as
    /// soon as the first one's lock finds them busy: it waits for those users while
    /// the first one applies and commits the rest. A batch that shares one user with a
    /// batch in flight then no longer waits for that whole transaction with all its
    /// other users locked, holding up the batches behind it.
    async fn apply_skipping_busy(
        &self,
        ops: &[Op],
        now_us: i64,
    ) -> Result<Vec<OpOutcome>, StoreError> {
        if !skips_busy_users(ops) {
            return apply_blocking(&self.pool, ops, now_us).await;
        }
        let (hand_on, handed) = tokio::sync::oneshot::channel();
        let mut positions = Vec::new();
        let first = async {
            let skip = SkipBusy {
                hand_on,
                positions: &mut positions,
            };
            if let Some(outcomes) = self.try_skipping_busy(ops, now_us, skip).await? {
                return Ok(outcomes);
            }
            // Refused or failed: everything not handed on goes the blocking way.
            let kept: Vec<Op> = ops
                .iter()
                .enumerate()
                .filter(|(at, _)| positions.binary_search(at).is_err())
                .map(|(_, op)| op.clone())
                .collect();
            apply_blocking(&self.pool, &kept, now_us).await
        };
        let second = async {
            // Nothing handed on: the first transaction locked every user, or failed
            // before its lock.
            let Ok(later) = handed.await else {
                return Ok(Vec::new());
            };
            apply_blocking(&self.pool, &later, now_us).await
        };
        let (now, later) = tokio::join!(first, second);
        merge_outcomes(ops.len(), &positions, now?, later?)
    }

    /// The first transaction of a batch that skips busy users: the outcomes of the
    /// operations it applied (all but those handed on), or `None` when it was rolled
    /// back for a key taken concurrently or an error worth a blocking attempt. The
    /// database being unreachable, or the ledger shutting down, is an error.
    async fn try_skipping_busy(
        &self,
        ops: &[Op],
        now_us: i64,
        skip: SkipBusy<'_>,
    ) -> Result<Option<Vec<OpOutcome>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let applied = apply_in(&mut tx, ops, &[], now_us, true, Some(skip)).await;
        let outcomes = match applied {
            Ok(Some(outcomes)) => outcomes,
            Ok(None) => {
                tx.rollback().await?;
                return Ok(None);
            }
            Err(error @ (StoreError::Unavailable(_) | StoreError::ShuttingDown)) => {
                return Err(error);
            }
            Err(_) => {
                // Rolled back now, so the blocking attempt does not wait on our locks.
                let _ = tx.rollback().await;
                return Ok(None);
            }
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

/// One attempt in a transaction of its own; `None` when a concurrent transaction took
/// one of our keys first (or, `optimistic`, when a key turned out to be taken already).
async fn try_apply(
    pool: &PgPool,
    ops: &[Op],
    sweep: &[String],
    now_us: i64,
    optimistic: bool,
) -> Result<Option<Vec<OpOutcome>>, StoreError> {
    let mut tx = pool.begin().await?;
    let Some(outcomes) = apply_in(&mut tx, ops, sweep, now_us, optimistic, None).await? else {
        tx.rollback().await?;
        return Ok(None);
    };
    tx.commit().await?;
    Ok(Some(outcomes))
}

/// Writes and hold operations alike, in one transaction that waits for the locks it
/// needs: first without reading the keys they use (fresh keys, settles of holds still
/// held), then, on any conflict or error, with them read and retried.
async fn apply_blocking(
    pool: &PgPool,
    ops: &[Op],
    now_us: i64,
) -> Result<Vec<OpOutcome>, StoreError> {
    if let Some(outcomes) = try_apply(pool, ops, &[], now_us, true).await.ok().flatten() {
        return Ok(outcomes);
    }
    with_retries(|| try_apply(pool, ops, &[], now_us, false)).await
}

/// Locking with `SKIP LOCKED`: where to hand on the writes of the users found busy,
/// for a transaction of their own that runs beside the first one, and where to note
/// their positions in the batch (ascending).
struct SkipBusy<'a> {
    hand_on: tokio::sync::oneshot::Sender<Vec<Op>>,
    positions: &'a mut Vec<usize>,
}

/// The outcomes of a batch in its order, from those of the operations applied first
/// (`now`) and of those at `deferred` positions (`later`).
fn merge_outcomes(
    count: usize,
    deferred: &[usize],
    now: Vec<OpOutcome>,
    later: Vec<OpOutcome>,
) -> Result<Vec<OpOutcome>, StoreError> {
    let mut now = now.into_iter();
    let mut later = later.into_iter();
    let mut deferred = deferred.iter().peekable();
    let mut outcomes = Vec::with_capacity(count);
    for at in 0..count {
        let next = if deferred.next_if(|&&d| d == at).is_some() {
            later.next()
        } else {
            now.next()
        };
        outcomes.push(
            next.ok_or_else(|| StoreError::Corrupt("an operation lost its outcome".to_owned()))?,
        );
    }
    if now.next().is_some() || later.next().is_some() {
        return Err(StoreError::Corrupt(
            "a batch got more outcomes than operations".to_owned(),
        ));
    }
    Ok(outcomes)
}

/// Applies `ops` inside an open transaction: find the owners of the holds they name,
/// create missing accounts, lock the balances in user order (with `sweep`: users whose
/// due lots and holds must expire), read their lots (and holds when any are involved)
/// and the used keys, plan, then append entries and draws, move balances and lots in
/// one statement, and save holds. `None` when a concurrent transaction claimed one of
/// the keys or hold ids first (roll back and replan).
///
/// `optimistic`: the used keys are not read first when the plan stands without them
/// (the common case: fresh keys, enough credits, settles of holds still held); a key
/// already taken then shows up as a conflict of the append, and the caller replans
/// with the keys read. A plan that refuses a write always reads them, since a refused
/// write may be a duplicate; so does one that settles a hold settled before.
async fn apply_in(
    conn: &mut PgConnection,
    ops: &[Op],
    sweep: &[String],
    now_us: i64,
    optimistic: bool,
    skip_busy: Option<SkipBusy<'_>>,
) -> Result<Option<Vec<OpOutcome>>, StoreError> {
    let writes = writes_of(ops);
    let hold_ids = hold_ids_of(ops);
    let mut users = ledger::users_to_lock(&writes);
    users.extend(sweep.iter().cloned());
    users.extend(hold_users_of(ops));
    // Settles, releases and extensions name holds whose owners must be locked too; a
    // `Hold` names its user (a hold id already taken by another user is only answered).
    // Only valid ones: an id PostgreSQL cannot take (a NUL) would fail the lock
    // statement, and with it every other operation of the batch; its own operation is
    // refused by the plan.
    let named: Vec<&str> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Hold(HoldOp::Hold(_)) => None,
            Op::Hold(op) if op.validate().is_ok() => Some(op.hold_id()),
            Op::Hold(_) | Op::Write(_) => None,
        })
        .collect();
    users.sort_unstable();
    users.dedup();
    let to_create = ledger::users_to_create(&writes);
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
    // Lock the balances in user order (with the owners of the holds named, found in the
    // same statement: a hold's owner never changes), then read their lots in a
    // statement of its own: rows joined to a locked row would come from the snapshot
    // taken before the lock wait, stale if a concurrent transaction moved them
    // meanwhile.
    let lock_sql = if skip_busy.is_some() {
        "SELECT user_id, balance_micros FROM credit_accounts \
         WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE SKIP LOCKED"
    } else if named.is_empty() {
        "SELECT user_id, balance_micros FROM credit_accounts \
         WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE"
    } else {
        "SELECT user_id, balance_micros FROM credit_accounts \
         WHERE user_id = ANY(ARRAY(SELECT UNNEST($1::text[]) \
             UNION SELECT user_id FROM credit_holds WHERE hold_id = ANY($2::text[]))) \
         ORDER BY user_id FOR UPDATE"
    };
    let balances: HashMap<String, Micros> = sqlx::query_as::<_, (String, i64)>(lock_sql)
        .bind(&users)
        .bind(&named)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(user, balance)| (user, Micros(balance)))
        .collect();
    if !named.is_empty() {
        users.extend(balances.keys().cloned());
        users.sort_unstable();
        users.dedup();
    }
    // Skipping busy users: the writes of users not locked (held by another transaction,
    // or without a balance row) go to a transaction of their own, started now.
    let kept: Vec<Op>;
    let ops = match skip_busy {
        None => ops,
        Some(SkipBusy { hand_on, positions }) => {
            users.retain(|user| balances.contains_key(user));
            let mut now = Vec::with_capacity(ops.len());
            let mut later = Vec::new();
            for (at, op) in ops.iter().enumerate() {
                match op {
                    // An invalid write is refused without a lock: it stays.
                    Op::Write(write)
                        if write.validate().is_ok() && !balances.contains_key(&write.user_id) =>
                    {
                        positions.push(at);
                        later.push(op.clone());
                    }
                    op => now.push(op.clone()),
                }
            }
            if later.is_empty() {
                ops
            } else {
                // The receiver is gone only with the whole call.
                hand_on.send(later).map_err(|_| StoreError::ShuttingDown)?;
                if now.is_empty() {
                    return Ok(Some(Vec::new()));
                }
                kept = now;
                &kept
            }
        }
    };
    let lots = lots_of(
        sqlx::query_as::<_, LotRow>(&format!(
            "SELECT {LOT_COLUMNS} FROM credit_lots \
             WHERE user_id = ANY($1::text[]) AND remaining_micros > 0 AND live"
        ))
        .bind(&users)
        .fetch_all(&mut *conn)
        .await?,
    )?;
    let holds = if hold_ids.is_empty() && lots.iter().all(|lot| lot.held.0 == 0) {
        Vec::new()
    } else {
        // The holds named and the users' held holds past their instant (to expire), with
        // their reservations (in the row). What other held holds reserve is in their
        // lots' `held`. The second part leaves the named ones out, so the two parts need
        // no deduplication (`UNION` hashed every column of every row); the index on
        // (user, instant) of held holds (migration 1011) finds only the due ones, one
        // user at a time (`LATERAL`, kept apart by `OFFSET 0`). A generic plan made
        // while the table was small otherwise scanned an index by instant for every
        // user at once, and such an index keeps an entry for every hold resolved since
        // the last vacuum: one look at the start of `credit_holds_due` walked ~1,400
        // pages (1.4 ms) with 500,000 resolved holds unvacuumed.
        let rows = sqlx::query_as::<_, PgHoldRow>(&format!(
            "SELECT {PG_HOLD_COLUMNS} FROM credit_holds WHERE hold_id = ANY($2::text[]) \
             UNION ALL SELECT h.* FROM UNNEST($1::text[]) AS u(uid) \
             CROSS JOIN LATERAL (SELECT {PG_HOLD_COLUMNS} FROM credit_holds \
                 WHERE user_id = u.uid AND status = 'held' AND expires_at_us <= $3 \
                     AND hold_id <> ALL($2::text[]) OFFSET 0) AS h"
        ))
        .bind(&users)
        .bind(&hold_ids)
        .bind(now_us)
        .fetch_all(&mut *conn)
        .await?;
        let mut holds = rows
            .into_iter()
            .map(Hold::try_from)
            .collect::<Result<Vec<Hold>, StoreError>>()?;
        holds.sort_unstable_by(|a, b| a.hold_id.cmp(&b.hold_id));
        holds
    };
    // A hold named by a settle, release or extension whose owner is not locked was
    // made after the lock statement looked for it (its `Hold` committed in between):
    // planning without its owner's balance and lots would draw from nothing. Again.
    let named_ids: std::collections::HashSet<&str> = named.iter().copied().collect();
    if holds.iter().any(|hold| {
        named_ids.contains(hold.hold_id.as_str()) && !balances.contains_key(&hold.user_id)
    }) {
        return Ok(None);
    }
    let keys = keys_of_ops(ops);
    let mut plan = None;
    if optimistic || keys.is_empty() {
        let first = ledger::plan_ops(
            ops,
            &balances,
            &lots,
            &holds,
            &ExistingEntries::new(),
            now_us,
        );
        if keys.is_empty() || first.stands_without_existing() {
            plan = Some(first);
        }
    }
    let plan = match plan {
        Some(plan) => plan,
        None => {
            let existing = entries_by_key(
                sqlx::query_as::<_, EntryRow>(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM credit_ledger WHERE idempotency_key = ANY($1::text[])"
                ))
                .bind(keys)
                .fetch_all(&mut *conn)
                .await?,
            )?;
            ledger::plan_ops(ops, &balances, &lots, &holds, &existing, now_us)
        }
    };
    // Lots the plan makes get their ids first, so entries drawing from them can say so.
    let lot_ids: Vec<i64> = if plan.new_lots.is_empty() {
        Vec::new()
    } else {
        sqlx::query_scalar(
            "SELECT nextval(pg_get_serial_sequence('credit_lots', 'id')) FROM generate_series(1, $1)",
        )
        .bind(i64::try_from(plan.new_lots.len()).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await?
    };
    let Some(ids) = append_entries(conn, &plan, &lot_ids, now_us).await? else {
        return Ok(None);
    };
    make_lots(conn, &plan, &ids, &lot_ids, now_us).await?;
    if !save_holds(conn, &plan, &ids).await? {
        return Ok(None);
    }
    super::outbox::emit_pg(conn, &plan, &balances, &lots, now_us).await?;
    Ok(Some(plan.finish_ops(&ids, &lot_ids)))
}

/// Whether a batch may skip its busy users: two or more plain writes with distinct
/// keys. Hold operations find their owners while locking, and a key written twice must
/// be planned in one transaction (its first use wins, in the order given).
fn skips_busy_users(ops: &[Op]) -> bool {
    if ops.len() < 2 {
        return false;
    }
    let mut keys = std::collections::HashSet::with_capacity(ops.len());
    ops.iter().all(|op| match op {
        Op::Write(write) => keys.insert(write.idempotency_key.as_str()),
        Op::Hold(_) => false,
    })
}

/// Appends the plan's entries with their draws, moves balances and existing lots, in
/// one statement; the entries' ids in plan order, or `None` when a key was taken
/// concurrently.
async fn append_entries(
    conn: &mut PgConnection,
    plan: &ledger::Plan,
    lot_ids: &[i64],
    now_us: i64,
) -> Result<Option<Vec<i64>>, StoreError> {
    let LotMoves {
        ids: moved,
        spent: lot_spent,
        held: lot_held,
        expired: lot_expired,
    } = LotMoves::of(plan);
    if plan.inserts.is_empty() {
        // A plan that changes holds moves its lots in the statement saving them.
        if !moved.is_empty() && !plan.holds.iter().any(|change| change.dirty) {
            sqlx::query(LOT_MOVES_SQL)
                .bind(&moved)
                .bind(&lot_spent)
                .bind(&lot_held)
                .bind(&lot_expired)
                .execute(&mut *conn)
                .await?;
        }
        return Ok(Some(Vec::new()));
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
    let mut targets = Vec::with_capacity(count);
    let draws = planned_draws(plan, lot_ids);
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
        targets.push(write.target_lot_id);
    }
    let inserted: Vec<(i64, String, String)> = sqlx::query_as(
        "WITH new_entries AS ( \
            INSERT INTO credit_ledger \
                (user_id, kind, amount_micros, balance_after_micros, idempotency_key, key_source, payment_id, description, target_lot_id, draws, created_at_us) \
            SELECT user_id, kind, amount_micros, balance_after_micros, idempotency_key, key_source, payment_id, description, target_lot_id, draws, $10 \
            FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[], $9::int8[], $11::text[]) \
                WITH ORDINALITY AS w(user_id, kind, amount_micros, balance_after_micros, idempotency_key, key_source, payment_id, description, target_lot_id, draws, position) \
            ORDER BY position \
            ON CONFLICT (idempotency_key, key_source) DO NOTHING \
            RETURNING id, idempotency_key, key_source, user_id, amount_micros \
         ), moved AS ( \
            UPDATE credit_accounts AS a \
            SET balance_micros = a.balance_micros + d.delta_micros, updated_at_us = $10 \
            FROM (SELECT user_id, SUM(amount_micros)::int8 AS delta_micros FROM new_entries GROUP BY user_id) AS d \
            WHERE a.user_id = d.user_id \
         ), lots_moved AS ( \
            UPDATE credit_lots AS l \
            SET remaining_micros = l.remaining_micros - m.spent, \
                held_micros = l.held_micros + m.held, \
                expired_micros = l.expired_micros + m.expired \
            FROM UNNEST($12::int8[], $13::int8[], $14::int8[], $15::int8[]) AS m(id, spent, held, expired) \
            WHERE l.id = m.id \
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
    .bind(&targets)
    .bind(now_us)
    .bind(&draws)
    .bind(&moved)
    .bind(&lot_spent)
    .bind(&lot_held)
    .bind(&lot_expired)
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
    Ok(Some(ids))
}

/// Every existing lot a plan moves, as (id, spent, held, expired) arrays: remainder,
/// reserved and expired amounts.
#[derive(Default)]
struct LotMoves {
    ids: Vec<i64>,
    spent: Vec<i64>,
    held: Vec<i64>,
    expired: Vec<i64>,
}

impl LotMoves {
    fn of(plan: &ledger::Plan) -> LotMoves {
        let spent = plan.spent();
        let mut ids: Vec<i64> = spent.keys().chain(plan.lot_moves.keys()).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        LotMoves {
            spent: ids
                .iter()
                .map(|id| spent.get(id).copied().unwrap_or(0))
                .collect(),
            held: ids
                .iter()
                .map(|id| plan.lot_moves.get(id).map_or(0, |m| m.held))
                .collect(),
            expired: ids
                .iter()
                .map(|id| plan.lot_moves.get(id).map_or(0, |m| m.expired))
                .collect(),
            ids,
        }
    }
}

/// Moves existing lots by (id, spent, held, expired) arrays.
const LOT_MOVES_SQL: &str = "UPDATE credit_lots AS l \
     SET remaining_micros = l.remaining_micros - m.spent, \
         held_micros = l.held_micros + m.held, \
         expired_micros = l.expired_micros + m.expired \
     FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[]) AS m(id, spent, held, expired) \
     WHERE l.id = m.id";

/// Saves the plan's holds in one statement whatever their number: new ones with their
/// reservations, changed ones' state (a resolved hold reserves nothing) and, for a plan
/// without entries, its lot moves (a plan with entries moved them when appending).
/// `false` when a new hold id was taken concurrently (the caller rolls back).
async fn save_holds(
    conn: &mut PgConnection,
    plan: &ledger::Plan,
    entry_ids: &[i64],
) -> Result<bool, StoreError> {
    let saved = plan.saved_holds(entry_ids);
    let dirty: Vec<(&ledger::HoldChange, &Hold)> = plan
        .holds
        .iter()
        .zip(&saved)
        .filter(|(change, _)| change.dirty)
        .collect();
    if dirty.is_empty() {
        return Ok(true);
    }
    let columns = |is_new: bool| {
        let holds: Vec<&Hold> = dirty
            .iter()
            .filter(|(change, _)| change.is_new == is_new)
            .map(|(_, hold)| *hold)
            .collect();
        HoldColumns::of(&holds)
    };
    let new = columns(true);
    let changed = columns(false);
    // The new holds' reservations as flat (hold, lot, amount, position) rows, gathered
    // into each hold's arrays by the statement (UNNEST takes no ragged arrays).
    let mut reserving = Vec::new();
    let mut lots = Vec::new();
    let mut amounts = Vec::new();
    let mut positions: Vec<i32> = Vec::new();
    for (_, hold) in dirty
        .iter()
        .filter(|(c, h)| c.is_new && h.status == HoldStatus::Held)
    {
        for (position, (lot, amount)) in hold.reservations.iter().enumerate() {
            reserving.push(hold.hold_id.as_str());
            lots.push(*lot);
            amounts.push(amount.0);
            positions.push(i32::try_from(position).unwrap_or(i32::MAX));
        }
    }
    let moves = if plan.inserts.is_empty() {
        LotMoves::of(plan)
    } else {
        LotMoves::default()
    };
    // A hold no longer held reserves nothing: its arrays are emptied with its state.
    let inserted: i64 = sqlx::query_scalar(&format!(
        "WITH new_holds AS ( \
            INSERT INTO credit_holds ({PG_HOLD_COLUMNS}) \
            SELECT n.*, COALESCE(r.lot_ids, '{{}}'), COALESCE(r.amounts, '{{}}') \
            FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[], \
                $6::int8[], $7::int8[], $8::bool[], $9::text[], $10::int8[], $11::int8[], $12::int8[]) \
                AS n({HOLD_COLUMNS}) \
            LEFT JOIN ( \
                SELECT hold_id, array_agg(lot_id ORDER BY position) AS lot_ids, \
                       array_agg(amount_micros ORDER BY position) AS amounts \
                FROM UNNEST($13::text[], $14::int8[], $15::int8[], $16::int4[]) \
                    AS r(hold_id, lot_id, amount_micros, position) \
                GROUP BY hold_id \
            ) AS r USING (hold_id) \
            ON CONFLICT (hold_id) DO NOTHING RETURNING hold_id \
         ), changed AS ( \
            UPDATE credit_holds AS h SET status = c.status, settled_micros = c.settled, \
                entry_id = c.entry_id, shortfall_micros = c.shortfall, late = c.late, \
                expires_at_us = c.expires, resolved_at_us = c.resolved, \
                reserved_lot_ids = CASE WHEN c.status = 'held' THEN h.reserved_lot_ids ELSE '{{}}' END, \
                reserved_micros = CASE WHEN c.status = 'held' THEN h.reserved_micros ELSE '{{}}' END \
            FROM UNNEST($17::text[], $18::text[], $19::int8[], $20::int8[], $21::int8[], $22::bool[], \
                $23::int8[], $24::int8[]) AS c(hold_id, status, settled, entry_id, shortfall, late, expires, resolved) \
            WHERE h.hold_id = c.hold_id \
         ), lots_moved AS ( \
            UPDATE credit_lots AS l \
            SET remaining_micros = l.remaining_micros - m.spent, \
                held_micros = l.held_micros + m.held, \
                expired_micros = l.expired_micros + m.expired \
            FROM UNNEST($25::int8[], $26::int8[], $27::int8[], $28::int8[]) AS m(id, spent, held, expired) \
            WHERE l.id = m.id \
         ) \
         SELECT count(*) FROM new_holds"
    ))
    .bind(&new.ids)
    .bind(&new.users)
    .bind(&new.amounts)
    .bind(&new.statuses)
    .bind(&new.settled)
    .bind(&new.entries)
    .bind(&new.shortfalls)
    .bind(&new.late)
    .bind(&new.descriptions)
    .bind(&new.created)
    .bind(&new.expires)
    .bind(&new.resolved)
    .bind(&reserving)
    .bind(&lots)
    .bind(&amounts)
    .bind(&positions)
    .bind(&changed.ids)
    .bind(&changed.statuses)
    .bind(&changed.settled)
    .bind(&changed.entries)
    .bind(&changed.shortfalls)
    .bind(&changed.late)
    .bind(&changed.expires)
    .bind(&changed.resolved)
    .bind(&moves.ids)
    .bind(&moves.spent)
    .bind(&moves.held)
    .bind(&moves.expired)
    .fetch_one(&mut *conn)
    .await?;
    Ok(usize::try_from(inserted).ok() == Some(new.ids.len()))
}

/// Holds as column arrays for UNNEST.
#[derive(Default)]
struct HoldColumns<'a> {
    ids: Vec<&'a str>,
    users: Vec<&'a str>,
    amounts: Vec<i64>,
    statuses: Vec<&'static str>,
    settled: Vec<Option<i64>>,
    entries: Vec<Option<i64>>,
    shortfalls: Vec<i64>,
    late: Vec<bool>,
    descriptions: Vec<&'a str>,
    created: Vec<i64>,
    expires: Vec<i64>,
    resolved: Vec<Option<i64>>,
}

impl<'a> HoldColumns<'a> {
    fn of(holds: &[&'a Hold]) -> HoldColumns<'a> {
        let mut columns = HoldColumns::default();
        for hold in holds {
            columns.ids.push(&hold.hold_id);
            columns.users.push(&hold.user_id);
            columns.amounts.push(hold.amount.0);
            columns.statuses.push(hold.status.as_str());
            columns.settled.push(hold.settled.map(|m| m.0));
            columns.entries.push(hold.entry_id);
            columns.shortfalls.push(hold.shortfall.0);
            columns.late.push(hold.late);
            columns.descriptions.push(&hold.description);
            columns.created.push(hold.created_at_us);
            columns.expires.push(hold.expires_at_us);
            columns.resolved.push(hold.resolved_at_us);
        }
        columns
    }
}

/// Makes the lots of the plan's credits under the ids taken for them.
async fn make_lots(
    conn: &mut PgConnection,
    plan: &ledger::Plan,
    entry_ids: &[i64],
    lot_ids: &[i64],
    now_us: i64,
) -> Result<(), StoreError> {
    for (lot, id) in plan.new_lots.iter().zip(lot_ids) {
        sqlx::query(
            "INSERT INTO credit_lots (id, user_id, category, priority, expires_at_us, source, \
             original_micros, remaining_micros, entry_id, created_at_us) \
             OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(id)
        .bind(&lot.user_id)
        .bind(lot.terms.category.as_str())
        .bind(lot.terms.priority)
        .bind(lot.terms.expires_at_us)
        .bind(&lot.source)
        .bind(lot.original.0)
        .bind(lot.remaining.0)
        .bind(entry_ids[lot.entry])
        .bind(now_us)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The payment-event steps on an open PostgreSQL transaction.
struct PgTx<'a>(&'a mut PgConnection);

payment_tx_impl! {
    PgTx<'_>;
    async fn lock_user(&mut self, user_id: &str) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 FROM credit_accounts WHERE user_id = $1 FOR UPDATE")
            .bind(user_id)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn apply(
        &mut self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Option<Vec<WriteOutcome>>, StoreError> {
        let ops: Vec<Op> = writes.iter().cloned().map(Op::Write).collect();
        Ok(apply_in(self.0, &ops, &[], now_us, false, None)
            .await?
            .map(write_outcomes))
    }
}

#[async_trait]
impl LedgerStore for PgLedger {
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
                 AND created_at_us >= $1 AND created_at_us < $2 AND id > $3 ORDER BY id LIMIT $4"
            ))
            .bind(since_us)
            .bind(until_us)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
        } else {
            sqlx::query_as::<_, EntryRow>(&format!(
                "SELECT {ENTRY_COLUMNS} FROM credit_ledger \
                 WHERE (payment_id = ANY($1::text[]) OR idempotency_key = ANY($1::text[])) \
                 AND id > $2 ORDER BY id LIMIT $3"
            ))
            .bind(payment_ids)
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
        super::outbox::set_alert_pg(&self.pool, user_id, threshold, now_us).await
    }

    async fn warn_expiring(
        &self,
        now_us: i64,
        ahead_us: i64,
        limit: u32,
    ) -> Result<usize, StoreError> {
        super::outbox::warn_expiring_pg(&self.pool, now_us, ahead_us, limit).await
    }

    fn events(&self) -> reeve_events::EventStore {
        reeve_events::EventStore::Postgres(self.pool.clone())
    }

    fn topups(&self) -> super::TopUpStore {
        super::TopUpStore::Postgres(self.pool.clone())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn balance(&self, user_id: &str, now_us: i64) -> Result<BalanceDetails, StoreError> {
        let read = BalanceRead {
            user_id: user_id.to_owned(),
            now_us,
        };
        self.balances
            .submit(read)
            .await
            .map_err(|_| StoreError::ShuttingDown)?
    }

    async fn lots(
        &self,
        user_id: &str,
        include_spent: bool,
        now_us: i64,
    ) -> Result<Vec<Lot>, StoreError> {
        // The live lots through the partial index on `live` (a generic plan could not
        // fold `OR $2` away); spent ones too only when asked.
        let filter = if include_spent {
            "user_id = $1"
        } else {
            "user_id = $1 AND remaining_micros > 0 AND live"
        };
        let rows = sqlx::query_as::<_, LotRow>(&format!(
            "SELECT {LOT_COLUMNS} FROM credit_lots WHERE {filter}"
        ))
        .bind(user_id)
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

    async fn expire_due(&self, now_us: i64, limit: u32) -> Result<usize, StoreError> {
        let users: Vec<String> = sqlx::query_scalar(DUE_USERS_SQL)
            .bind(now_us)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        if users.is_empty() {
            return Ok(0);
        }
        with_retries(|| try_apply(&self.pool, &[], &users, now_us, false)).await?;
        Ok(users.len())
    }

    async fn apply(
        &self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        self.apply_writes(writes, now_us, false).await
    }

    async fn apply_independent(
        &self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        self.apply_writes(writes, now_us, true).await
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
        Ok(hold_outcomes(
            apply_blocking(&self.pool, &ops, now_us).await?,
        ))
    }

    async fn hold(&self, hold_id: &str) -> Result<Option<Hold>, StoreError> {
        sqlx::query_as::<_, PgHoldRow>(&format!(
            "SELECT {PG_HOLD_COLUMNS} FROM credit_holds WHERE hold_id = $1"
        ))
        .bind(hold_id)
        .fetch_optional(&self.pool)
        .await?
        .map(Hold::try_from)
        .transpose()
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
            "SELECT {ENTRY_COLUMNS} FROM credit_ledger {HISTORY_FILTER}"
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
