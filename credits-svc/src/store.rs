//! What credits-svc needs of storage, and where it lives: PostgreSQL in production,
//! SQLite (one file) as the embedded default. Both run the same [`crate::ledger::plan`]
//! inside one transaction per call and must pass the same test suite.
//!
//! The ledger tables are append-only (a trigger refuses UPDATE and DELETE); the cached
//! balance in `credit_accounts` changes only in the transaction that appends entries.

use std::sync::Arc;

use async_trait::async_trait;
use reeve_runtime::Micros;

use crate::holds::{Hold, HoldOp, HoldOutcome, HoldStatus};
use crate::ledger::{
    EntryKind, ExistingEntries, KeySource, LedgerEntry, LotDraw, WriteOutcome, WriteRequest,
};
use crate::ledger::{Op, OpOutcome};
use crate::lots::{Category, Lot};
use crate::payments::{DisputeState, PaymentEvent, PaymentState};

mod outbox;
pub mod postgres;
pub mod sqlite;
pub mod topup;

pub use topup::{TopUpStore, TopUpView};

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
    /// The database refused for load, not for the request: a deadlock broken, a
    /// serialization failure, a lock not granted in time, SQLite busy. Retryable.
    #[error("database busy: {0}")]
    Busy(Arc<sqlx::Error>),
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
            sqlx::Error::Database(ref db) => match classify(db.as_ref()) {
                Refusal::Busy => StoreError::Busy(Arc::new(error)),
                Refusal::Unavailable => StoreError::Unavailable(Arc::new(error)),
                Refusal::Other => StoreError::Database(Arc::new(error)),
            },
            other => StoreError::Database(Arc::new(other)),
        }
    }
}

enum Refusal {
    Busy,
    Unavailable,
    Other,
}

/// What a database error says: SQLite's (extended) result codes, whose low byte is the
/// primary code, or PostgreSQL's SQLSTATEs.
fn classify(error: &dyn sqlx::error::DatabaseError) -> Refusal {
    let Some(code) = error.code() else {
        return Refusal::Other;
    };
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        return match code.parse::<u32>().map(|c| c & 0xff) {
            // SQLITE_BUSY, SQLITE_LOCKED
            Ok(5) | Ok(6) => Refusal::Busy,
            _ => Refusal::Other,
        };
    }
    let code = code.as_ref();
    match code {
        // deadlock_detected, serialization_failure, lock_not_available, query_canceled
        // (statement or lock timeout)
        "40P01" | "40001" | "55P03" | "57014" => return Refusal::Busy,
        // admin/crash shutdown, cannot connect now, too many connections
        "57P01" | "57P02" | "57P03" | "53300" => return Refusal::Unavailable,
        _ => {}
    }
    if code.starts_with("08") {
        return Refusal::Unavailable;
    }
    Refusal::Other
}

impl StoreError {
    /// Whether running the same writes again may succeed (load, not the request).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Busy(_)
                | StoreError::Unavailable(_)
                | StoreError::Contention
                | StoreError::ShuttingDown
        )
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
    /// The user's balance at `now_us` (lots expired by then no longer count, swept or
    /// not) with its paid and promotional parts; zero for an unknown user.
    async fn balance(&self, user_id: &str, now_us: i64) -> Result<BalanceDetails, StoreError>;
    /// The user's lots in spending order: the live ones at `now_us`, or all of them.
    async fn lots(
        &self,
        user_id: &str,
        include_spent: bool,
        now_us: i64,
    ) -> Result<Vec<Lot>, StoreError>;
    /// One lot by id.
    async fn lot(&self, lot_id: i64) -> Result<Option<Lot>, StoreError>;
    /// Writes the `expiration` entries of up to `limit` users' lots whose expiry instant
    /// has come (safe to run on every replica at once); the number of users swept.
    async fn expire_due(&self, now_us: i64, limit: u32) -> Result<usize, StoreError>;
    /// Applies `writes` in order, atomically, in a constant number of round trips:
    /// one outcome per write.
    async fn apply(
        &self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Vec<WriteOutcome>, StoreError>;
    /// Applies a caller's batch of independent `writes` (`DeductBatch`): one outcome
    /// per write, each user's writes in order, but not atomically. A store may commit
    /// them in more than one transaction (PostgreSQL: the writes of users another
    /// transaction holds, or without a balance row, in a second one beside the
    /// first), so an error may follow some writes applied; a retry with the same keys
    /// answers those as duplicates. By default, [`LedgerStore::apply`].
    async fn apply_independent(
        &self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        self.apply(writes, now_us).await
    }
    /// Up to `limit` of the user's entries with an id below `before_id`, newest first.
    async fn history(
        &self,
        user_id: &str,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError>;
    /// The cached balance beside the sum of the user's entries.
    async fn audit(&self, user_id: &str) -> Result<BalanceAudit, StoreError>;
    /// Applies hold operations in order, in one transaction per call (coalesced with
    /// concurrent ones by the hold group commit): one outcome per operation.
    async fn apply_holds(
        &self,
        ops: &[HoldOp],
        now_us: i64,
    ) -> Result<Vec<HoldOutcome>, StoreError>;
    /// One hold by id, as stored (its status not yet moved past its instant).
    async fn hold(&self, hold_id: &str) -> Result<Option<Hold>, StoreError>;
    /// Up to `limit` of the user's holds (of one status, or all), newest first, created
    /// before `before_us` (and with a smaller id at that instant).
    async fn holds(
        &self,
        user_id: &str,
        status: Option<HoldStatus>,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<Hold>, StoreError>;
    /// Applies one Stripe money event (see [`crate::payments`]) in one transaction.
    async fn record_payment_event(
        &self,
        event: &PaymentEvent,
        now_us: i64,
    ) -> Result<PaymentOutcome, StoreError>;
    /// Up to `limit` entries with an id above `after_id`, oldest first, that belong to
    /// Stripe payments: those naming one of `payment_ids` (as payment or key, any key
    /// source) when given, else those in the Stripe key source or naming a payment,
    /// created in `[since_us, until_us)`. Read-only (reconciliation).
    async fn payment_entries(
        &self,
        payment_ids: &[String],
        since_us: i64,
        until_us: i64,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError>;
    /// Connections of the pool, for metrics.
    fn pool_stats(&self) -> reeve_runtime::telemetry::PoolStats;
    /// Sets a user's low-balance alert threshold (armed), or removes it (`None`).
    async fn set_balance_alert(
        &self,
        user_id: &str,
        threshold: Option<Micros>,
        now_us: i64,
    ) -> Result<(), StoreError>;
    /// Writes `lot.expiring` for up to `limit` lots expiring within `ahead_us` of
    /// `now_us`, once per lot; the number written.
    async fn warn_expiring(
        &self,
        now_us: i64,
        ahead_us: i64,
        limit: u32,
    ) -> Result<usize, StoreError>;
    /// The outbox in this store's database (for the webhook dispatcher).
    fn events(&self) -> reeve_events::EventStore;
    /// The auto top-up tables in this store's database (settings, cards, attempts).
    fn topups(&self) -> TopUpStore;
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

/// A balance as the API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BalanceDetails {
    pub balance: Micros,
    /// What active holds reserve of the balance.
    pub held: Micros,
    pub paid: Micros,
    pub promotional: Micros,
    /// The earliest expiring live lot (in spending order among ties): when and how much.
    pub next_expiry: Option<(i64, Micros)>,
}

impl BalanceDetails {
    /// What may be spent or held now.
    pub fn available(&self) -> Micros {
        Micros(self.balance.0 - self.held.0)
    }

    /// From the cached balance, the user's lots with a remainder and what holds
    /// active at `now_us` reserve of each lot: what no active hold reserves of a lot
    /// whose expiry instant has come leaves the balance now, swept or not.
    pub fn at(
        cached: Micros,
        mut lots: Vec<Lot>,
        active_reserved: &std::collections::HashMap<i64, i64>,
        now_us: i64,
    ) -> BalanceDetails {
        lots.sort_by(crate::lots::spending_order);
        let mut details = BalanceDetails {
            balance: cached,
            ..BalanceDetails::default()
        };
        for lot in &lots {
            let reserved = active_reserved.get(&lot.id).copied().unwrap_or(0);
            details.held = Micros(details.held.0 + reserved);
            let counted = if lot.is_expired(now_us) {
                details.balance = Micros(details.balance.0 - (lot.remaining.0 - reserved));
                reserved
            } else {
                lot.remaining.0
            };
            match lot.category {
                Category::Paid => details.paid = Micros(details.paid.0 + counted),
                Category::Promotional => {
                    details.promotional = Micros(details.promotional.0 + counted)
                }
            }
            if !lot.is_live(now_us) {
                continue;
            }
            if let Some(at) = lot.expires_at_us
                && details.next_expiry.is_none_or(|(next, _)| at < next)
            {
                details.next_expiry = Some((at, lot.remaining));
            }
        }
        details
    }
}

/// Lots in spending order; the live ones at `now_us` unless `include_spent`.
fn lots_in_order(mut lots: Vec<Lot>, include_spent: bool, now_us: i64) -> Vec<Lot> {
    lots.retain(|lot| include_spent || lot.is_live(now_us));
    lots.sort_by(crate::lots::spending_order);
    lots
}

/// One `credit_lots` row as both stores select it.
#[derive(sqlx::FromRow)]
struct LotRow {
    id: i64,
    user_id: String,
    category: String,
    priority: i32,
    expires_at_us: Option<i64>,
    source: String,
    original_micros: i64,
    remaining_micros: i64,
    created_at_us: i64,
    held_micros: i64,
    expired_micros: i64,
}

const LOT_COLUMNS: &str = "id, user_id, category, priority, expires_at_us, source, original_micros, remaining_micros, created_at_us, held_micros, expired_micros";

impl TryFrom<LotRow> for Lot {
    type Error = StoreError;

    fn try_from(row: LotRow) -> Result<Lot, StoreError> {
        let category = Category::parse(&row.category).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "lot {} has unknown category {:?}",
                row.id, row.category
            ))
        })?;
        Ok(Lot {
            id: row.id,
            user_id: row.user_id,
            category,
            priority: row.priority,
            expires_at_us: row.expires_at_us,
            source: row.source,
            original: Micros(row.original_micros),
            remaining: Micros(row.remaining_micros),
            created_at_us: row.created_at_us,
            held: Micros(row.held_micros),
            expired: Micros(row.expired_micros),
        })
    }
}

/// The cached balance and the lots with a remainder, read in one statement so a sweep
/// committing in between cannot be half seen (SQLite; PostgreSQL keeps a hold's
/// reservations in its row and has its own).
const BALANCE_SQL: &str = "SELECT a.balance_micros, l.id, l.user_id, l.category, l.priority, \
     l.expires_at_us, l.source, l.original_micros, l.remaining_micros, l.created_at_us, \
     l.held_micros, l.expired_micros, r.amount_micros AS reserved_micros, \
     h.expires_at_us AS hold_expires_at_us \
     FROM (SELECT $1 AS user_id) AS u \
     LEFT JOIN credit_accounts AS a ON a.user_id = u.user_id \
     LEFT JOIN credit_lots AS l ON l.user_id = u.user_id AND l.remaining_micros > 0 AND l.live \
     LEFT JOIN credit_hold_reservations AS r ON r.lot_id = l.id AND l.held_micros > 0 \
     LEFT JOIN credit_holds AS h ON h.hold_id = r.hold_id AND h.status = 'held'";

#[derive(sqlx::FromRow)]
struct BalanceRow {
    balance_micros: Option<i64>,
    id: Option<i64>,
    user_id: Option<String>,
    category: Option<String>,
    priority: Option<i32>,
    expires_at_us: Option<i64>,
    source: Option<String>,
    original_micros: Option<i64>,
    remaining_micros: Option<i64>,
    created_at_us: Option<i64>,
    held_micros: Option<i64>,
    expired_micros: Option<i64>,
    reserved_micros: Option<i64>,
    hold_expires_at_us: Option<i64>,
}

/// The balance answer from the rows of a balance statement (a lot appears once per
/// reservation on it).
fn balance_of(rows: Vec<BalanceRow>, now_us: i64) -> Result<BalanceDetails, StoreError> {
    let cached = rows.first().and_then(|r| r.balance_micros).unwrap_or(0);
    let mut lots: Vec<Lot> = Vec::new();
    let mut active: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
    for row in rows {
        let (Some(id), Some(user_id), Some(category), Some(priority), Some(source)) =
            (row.id, row.user_id, row.category, row.priority, row.source)
        else {
            continue;
        };
        if let (Some(reserved), Some(until)) = (row.reserved_micros, row.hold_expires_at_us)
            && now_us < until
        {
            *active.entry(id).or_default() += reserved;
        }
        if lots.iter().any(|lot| lot.id == id) {
            continue;
        }
        lots.push(Lot::try_from(LotRow {
            id,
            user_id,
            category,
            priority,
            expires_at_us: row.expires_at_us,
            source,
            original_micros: row.original_micros.unwrap_or(0),
            remaining_micros: row.remaining_micros.unwrap_or(0),
            created_at_us: row.created_at_us.unwrap_or(0),
            held_micros: row.held_micros.unwrap_or(0),
            expired_micros: row.expired_micros.unwrap_or(0),
        })?);
    }
    Ok(BalanceDetails::at(Micros(cached), lots, &active, now_us))
}

fn lots_of(rows: Vec<LotRow>) -> Result<Vec<Lot>, StoreError> {
    rows.into_iter().map(Lot::try_from).collect()
}

/// One `credit_holds` row as both stores select it.
#[derive(sqlx::FromRow)]
struct HoldRow {
    hold_id: String,
    user_id: String,
    amount_micros: i64,
    status: String,
    settled_micros: Option<i64>,
    entry_id: Option<i64>,
    shortfall_micros: i64,
    late: bool,
    description: String,
    created_at_us: i64,
    expires_at_us: i64,
    resolved_at_us: Option<i64>,
}

/// The columns of [`HoldRow`], as a macro so a store can `concat!` its own after them.
macro_rules! hold_columns {
    () => {
        "hold_id, user_id, amount_micros, status, settled_micros, entry_id, shortfall_micros, late, description, created_at_us, expires_at_us, resolved_at_us"
    };
}
use hold_columns;

const HOLD_COLUMNS: &str = hold_columns!();

impl TryFrom<HoldRow> for Hold {
    type Error = StoreError;

    fn try_from(row: HoldRow) -> Result<Hold, StoreError> {
        let status = HoldStatus::parse(&row.status).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "hold {:?} has unknown status {:?}",
                row.hold_id, row.status
            ))
        })?;
        Ok(Hold {
            hold_id: row.hold_id,
            user_id: row.user_id,
            amount: Micros(row.amount_micros),
            status,
            settled: row.settled_micros.map(Micros),
            entry_id: row.entry_id,
            shortfall: Micros(row.shortfall_micros),
            late: row.late,
            description: row.description,
            created_at_us: row.created_at_us,
            expires_at_us: row.expires_at_us,
            resolved_at_us: row.resolved_at_us,
            reservations: Vec::new(),
        })
    }
}

/// Holds with their reservations (`(hold_id, lot_id, amount)` rows in order).
fn holds_of(
    rows: Vec<HoldRow>,
    reservations: Vec<(String, i64, i64)>,
) -> Result<Vec<Hold>, StoreError> {
    let mut holds: Vec<Hold> = rows
        .into_iter()
        .map(Hold::try_from)
        .collect::<Result<_, _>>()?;
    // By id, not a scan per reservation: a batch of a thousand settles has a thousand
    // of each.
    let index: std::collections::HashMap<String, usize> = holds
        .iter()
        .enumerate()
        .map(|(i, hold)| (hold.hold_id.clone(), i))
        .collect();
    for (hold_id, lot_id, amount) in reservations {
        if let Some(&i) = index.get(&hold_id) {
            holds[i].reservations.push((lot_id, Micros(amount)));
        }
    }
    Ok(holds)
}

/// What an operation list needs loaded: the users to lock besides the writers (the
/// owners of the holds it names, found first), and the keys it may have used.
fn keys_of_ops(ops: &[Op]) -> Vec<String> {
    let mut keys: Vec<String> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Write(write) if write.validate().is_ok() => Some(write.idempotency_key.clone()),
            Op::Hold(op @ HoldOp::Settle { hold_id, .. }) if op.validate().is_ok() => {
                Some(crate::holds::settle_key(hold_id))
            }
            _ => None,
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn writes_of(ops: &[Op]) -> Vec<WriteRequest> {
    ops.iter()
        .filter_map(|op| match op {
            Op::Write(write) => Some(write.clone()),
            Op::Hold(_) => None,
        })
        .collect()
}

/// The hold ids the operations name.
fn hold_ids_of(ops: &[Op]) -> Vec<String> {
    let mut ids: Vec<String> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Hold(op) if op.validate().is_ok() => Some(op.hold_id().to_owned()),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The users of `Hold` requests (the other hold operations name holds, whose owners
/// are looked up).
fn hold_users_of(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .filter_map(|op| match op {
            Op::Hold(HoldOp::Hold(request)) if request.user_id.chars().count() > 0 => {
                reeve_runtime::ids::check_user_id(&request.user_id)
                    .is_ok()
                    .then(|| request.user_id.clone())
            }
            _ => None,
        })
        .collect()
}

/// Saves a changed hold's state.
const UPDATE_HOLD_SQL: &str = "UPDATE credit_holds SET status = $2, settled_micros = $3, \
     entry_id = $4, shortfall_micros = $5, late = $6, expires_at_us = $7, resolved_at_us = $8 \
     WHERE hold_id = $1";
/// A resolved hold reserves nothing: its reservation rows go.
const DELETE_RESERVATIONS_SQL: &str = "DELETE FROM credit_hold_reservations WHERE hold_id = $1";
/// Users with lots past their instant or held holds past theirs (the sweeper's work).
const DUE_USERS_SQL: &str = "SELECT user_id FROM ( \
     SELECT user_id FROM credit_lots WHERE remaining_micros > 0 AND live AND expires_at_us <= $1 \
     UNION SELECT user_id FROM credit_holds WHERE status = 'held' AND expires_at_us <= $1 \
     ) AS due ORDER BY user_id LIMIT $2";
/// A page of a user's holds, newest first, before a (created_at_us, hold_id) cursor:
/// binds the user, the cursor's instant and id, and the page size. PostgreSQL runs it
/// on a generic plan, so nothing may hang on a parameter's value: the status is a
/// literal of the text (one of four fixed words, never input), which lets a page of
/// held holds use the partial index of held holds, and the cursor's instant bounds the
/// index scan on its own (`created_at_us < $2 OR ...` alone would read every newer
/// hold of the user before the page).
fn holds_page_sql(status: Option<HoldStatus>) -> String {
    let status = status.map_or(String::new(), |status| {
        format!(" AND status = '{}'", status.as_str())
    });
    format!(
        "SELECT {HOLD_COLUMNS} FROM credit_holds WHERE user_id = $1{status} \
         AND created_at_us <= $2 AND (created_at_us < $2 OR hold_id < $3) \
         ORDER BY created_at_us DESC, hold_id DESC LIMIT $4"
    )
}

/// What a payment event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// An entry was written now (`capped`: what the per-payment cap withheld).
    Applied { entry: LedgerEntry, capped: Micros },
    /// Written before: the original entry.
    Duplicate(LedgerEntry),
    /// Nothing to write; `user_id` is the payment's user.
    Nothing {
        user_id: String,
        detail: String,
        capped: Micros,
    },
    /// No payment with this id was credited: nothing written.
    UnknownPayment,
    /// The event cannot be applied as asked (e.g. a payment id credited for another
    /// user or amount): nothing written.
    Invalid(crate::ledger::InvalidWrite),
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
    key_source: String,
    payment_id: Option<String>,
    description: String,
    created_at_us: i64,
    target_lot_id: Option<i64>,
    draws: Option<String>,
}

/// The column list matching [`EntryRow`].
const ENTRY_COLUMNS: &str = "id, user_id, kind, amount_micros, balance_after_micros, idempotency_key, key_source, payment_id, description, created_at_us, target_lot_id, draws";

/// An entry's draws as stored: a JSON array of `[lot_id, amount_micros]` pairs, in the
/// order drawn; `None` when it drew nothing.
fn draws_text(draws: &[(i64, i64)]) -> Option<String> {
    (!draws.is_empty()).then(|| serde_json::json!(draws).to_string())
}

fn draws_of(text: Option<&str>, entry_id: i64) -> Result<Vec<LotDraw>, StoreError> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let pairs: Vec<(i64, i64)> = serde_json::from_str(text).map_err(|_| {
        StoreError::Corrupt(format!("ledger entry {entry_id} has unreadable draws"))
    })?;
    Ok(pairs
        .into_iter()
        .map(|(lot_id, amount)| LotDraw {
            lot_id,
            amount: Micros(amount),
        })
        .collect())
}

/// The stored draws of each planned entry, with the ids of lots made by the plan.
pub(crate) fn planned_draws(plan: &crate::ledger::Plan, lot_ids: &[i64]) -> Vec<Option<String>> {
    plan.inserts
        .iter()
        .map(|entry| {
            let pairs: Vec<(i64, i64)> = entry
                .draws
                .iter()
                .map(|(lot, amount)| {
                    let id = match lot {
                        crate::ledger::LotRef::Existing(id) => *id,
                        crate::ledger::LotRef::New(index) => lot_ids[*index],
                    };
                    (id, amount.0)
                })
                .collect();
            draws_text(&pairs)
        })
        .collect()
}

/// One `credit_payments` row as both stores select it.
#[derive(sqlx::FromRow)]
struct PaymentRow {
    payment_id: String,
    user_id: String,
    credited_micros: i64,
    refunded_micros: i64,
    refund_debits_total_micros: i64,
    disputed_micros: i64,
}

const PAYMENT_COLUMNS: &str = "payment_id, user_id, credited_micros, refunded_micros, refund_debits_total_micros, disputed_micros";

impl From<PaymentRow> for PaymentState {
    fn from(row: PaymentRow) -> PaymentState {
        PaymentState {
            payment_id: row.payment_id,
            user_id: row.user_id,
            credited: Micros(row.credited_micros),
            refunded: Micros(row.refunded_micros),
            refund_debits_total: Micros(row.refund_debits_total_micros),
            disputed: Micros(row.disputed_micros),
        }
    }
}

/// Saves a payment's tallies (the row exists: it was created with its purchase).
const UPDATE_PAYMENT_SQL: &str = "UPDATE credit_payments SET refunded_micros = $2,      refund_debits_total_micros = $3, disputed_micros = $4 WHERE payment_id = $1";
const INSERT_PAYMENT_SQL: &str = "INSERT INTO credit_payments      (payment_id, user_id, credited_micros, created_at_us) VALUES ($1, $2, $3, $4)      ON CONFLICT (payment_id) DO NOTHING";
const SELECT_DISPUTE_SQL: &str = "SELECT dispute_id, payment_id, debited_micros, reinstated      FROM credit_disputes WHERE dispute_id = $1";
const UPSERT_DISPUTE_SQL: &str = "INSERT INTO credit_disputes      (dispute_id, payment_id, debited_micros, reinstated) VALUES ($1, $2, $3, $4)      ON CONFLICT (dispute_id) DO UPDATE SET payment_id = excluded.payment_id,      debited_micros = excluded.debited_micros, reinstated = excluded.reinstated";
/// Takes a charge's pre-tracking refund debits (once: the row goes with it).
const TAKE_LEGACY_REFUNDS_SQL: &str =
    "DELETE FROM credit_legacy_refunds WHERE charge_id = $1 RETURNING debited_micros";

#[derive(sqlx::FromRow)]
struct DisputeRow {
    dispute_id: String,
    payment_id: Option<String>,
    debited_micros: i64,
    reinstated: bool,
}

impl From<DisputeRow> for DisputeState {
    fn from(row: DisputeRow) -> DisputeState {
        DisputeState {
            dispute_id: row.dispute_id,
            payment_id: row.payment_id,
            debited: Micros(row.debited_micros),
            reinstated: row.reinstated,
        }
    }
}

impl TryFrom<EntryRow> for LedgerEntry {
    type Error = StoreError;

    fn try_from(row: EntryRow) -> Result<LedgerEntry, StoreError> {
        let kind = EntryKind::parse(&row.kind).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "ledger entry {} has unknown kind {:?}",
                row.id, row.kind
            ))
        })?;
        let key_source = KeySource::parse(&row.key_source).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "ledger entry {} has unknown key source {:?}",
                row.id, row.key_source
            ))
        })?;
        Ok(LedgerEntry {
            id: row.id,
            user_id: row.user_id,
            kind,
            amount: Micros(row.amount_micros),
            balance_after: Micros(row.balance_after_micros),
            idempotency_key: row.idempotency_key,
            key_source,
            payment_id: row.payment_id,
            description: row.description,
            created_at_us: row.created_at_us,
            target_lot_id: row.target_lot_id,
            draws: draws_of(row.draws.as_deref(), row.id)?,
        })
    }
}

fn entries_by_key(rows: Vec<EntryRow>) -> Result<ExistingEntries, StoreError> {
    rows.into_iter()
        .map(|row| {
            LedgerEntry::try_from(row)
                .map(|entry| ((entry.key_source, entry.idempotency_key.clone()), entry))
        })
        .collect()
}

/// The writes a payment event leads to, once its state is known: shared by both
/// stores so they follow one path.
pub(crate) enum PaymentStep {
    /// Answer without writing.
    Answer(PaymentOutcome),
    /// Apply `write` through the ledger plan, then save the states.
    Write {
        write: WriteRequest,
        payment: Option<PaymentState>,
        dispute: Option<DisputeState>,
        capped: Micros,
    },
    /// Save a dispute state without an entry (a reinstatement seen first).
    SaveDispute {
        dispute: DisputeState,
        outcome: PaymentOutcome,
    },
}

/// Turns the loaded state into the next step (see [`crate::payments::decide`]).
/// `existing` is the entry holding the event's fixed key, if any; `payment` has the
/// legacy refunds of the event's charge folded in already.
pub(crate) fn payment_step(
    event: &PaymentEvent,
    payment: Option<PaymentState>,
    dispute: Option<DisputeState>,
    existing: Option<LedgerEntry>,
) -> PaymentStep {
    use crate::payments::{Decision, PaymentEventKind, decide};
    if event.kind == PaymentEventKind::PaymentSucceeded {
        let write = event.purchase();
        if let Some(entry) = existing {
            return PaymentStep::Answer(if write.same_request_as(&entry) {
                PaymentOutcome::Duplicate(entry)
            } else {
                PaymentOutcome::Invalid(crate::ledger::InvalidWrite::new(
                    crate::ledger::IDEMPOTENCY_KEY_REUSED,
                    format!(
                        "payment {} was already credited for a different request (another user or amount)",
                        event.payment_id
                    ),
                ))
            });
        }
        return PaymentStep::Write {
            write,
            payment: None,
            dispute: None,
            capped: Micros::ZERO,
        };
    }
    if let Some(entry) = existing {
        return PaymentStep::Answer(PaymentOutcome::Duplicate(entry));
    }
    let Some(payment) = payment else {
        return PaymentStep::Answer(PaymentOutcome::UnknownPayment);
    };
    match decide(event, &payment, dispute.as_ref()) {
        Decision::Write {
            write,
            payment,
            dispute,
            capped,
        } => PaymentStep::Write {
            write,
            payment: Some(payment),
            dispute,
            capped,
        },
        Decision::Nothing {
            detail,
            capped,
            dispute,
        } => {
            let outcome = PaymentOutcome::Nothing {
                user_id: payment.user_id,
                detail,
                capped,
            };
            match dispute {
                Some(dispute) => PaymentStep::SaveDispute { dispute, outcome },
                None => PaymentStep::Answer(outcome),
            }
        }
    }
}

/// How often a call is replanned after losing a key race (or being refused for load)
/// before giving up.
const MAX_ATTEMPTS: usize = 8;

/// A refusal for load that came after waiting this long, and is not a race (see
/// [`is_race`]), means a database held by someone else (SQLite's busy timeout, a lock
/// or statement timeout): it is answered as unavailable at once, instead of waiting as
/// long again for each of [`MAX_ATTEMPTS`].
const WAITED_TOO_LONG: std::time::Duration = std::time::Duration::from_secs(5);

/// A deadlock broken or a serialization failure: a race with a neighbour, worth
/// replanning however long it took to be told.
fn is_race(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// Runs `attempt` until it is not overtaken: a lost key race (`None`) or a refusal for
/// load (deadlock, serialization failure, lock timeout) is rolled back and replanned,
/// with a short growing pause; after [`MAX_ATTEMPTS`] the caller gets `Contention`
/// (ABORTED, retryable), never an internal error. A refusal after a long wait
/// ([`WAITED_TOO_LONG`]) is `Unavailable` at once (UNAVAILABLE, retryable).
pub(crate) async fn with_retries<T, F, Fut>(mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, StoreError>>,
{
    for round in 0..MAX_ATTEMPTS {
        let started = std::time::Instant::now();
        match attempt().await {
            Ok(Some(done)) => return Ok(done),
            Ok(None) => {}
            Err(StoreError::Busy(error))
                if started.elapsed() >= WAITED_TOO_LONG && !is_race(&error) =>
            {
                tracing::warn!(%error, waited_ms = started.elapsed().as_millis() as u64,
                    "ledger transaction refused after a long wait: the database is held");
                return Err(StoreError::Unavailable(error));
            }
            Err(StoreError::Busy(error)) => {
                tracing::debug!(%error, round, "ledger transaction refused for load; replanning");
            }
            Err(other) => return Err(other),
        }
        let pause_us = 500 * (round as u64 + 1) + u64::from(rand::random::<u16>() % 1000);
        tokio::time::sleep(std::time::Duration::from_micros(pause_us)).await;
    }
    Err(StoreError::Contention)
}

/// The steps of a payment event on an open transaction, one SQL statement each, so
/// both stores run the one flow of [`run_payment_event`].
#[async_trait]
pub(crate) trait PaymentTx: Send {
    async fn payment(&mut self, payment_id: &str) -> Result<Option<PaymentState>, StoreError>;
    /// Locks the user's balance row (PostgreSQL; SQLite's transaction is exclusive).
    async fn lock_user(&mut self, user_id: &str) -> Result<(), StoreError>;
    async fn stripe_entry(&mut self, key: &str) -> Result<Option<LedgerEntry>, StoreError>;
    async fn dispute(&mut self, dispute_id: &str) -> Result<Option<DisputeState>, StoreError>;
    /// Removes and returns a charge's refund debits from before payments were tracked.
    async fn take_legacy_refunds(&mut self, charge_id: &str) -> Result<Micros, StoreError>;
    async fn save_payment(&mut self, payment: &PaymentState) -> Result<(), StoreError>;
    async fn insert_payment(&mut self, purchase: &LedgerEntry) -> Result<(), StoreError>;
    async fn save_dispute(&mut self, dispute: &DisputeState) -> Result<(), StoreError>;
    /// The ledger plan inside this transaction; `None` when a key race was lost.
    async fn apply(
        &mut self,
        writes: &[WriteRequest],
        now_us: i64,
    ) -> Result<Option<Vec<WriteOutcome>>, StoreError>;
}

/// `PaymentTx` for a store's transaction (a tuple struct over its connection): the
/// steps both stores take with the same SQL, then the store's own `lock_user` and
/// `apply`, given as the macro's further tokens.
macro_rules! payment_tx_impl {
    ($tx:ty; $($own:tt)*) => {
        #[async_trait]
        impl PaymentTx for $tx {
            async fn payment(&mut self, payment_id: &str) -> Result<Option<PaymentState>, StoreError> {
                let row = sqlx::query_as::<_, PaymentRow>(&format!(
                    "SELECT {PAYMENT_COLUMNS} FROM credit_payments WHERE payment_id = $1"
                ))
                .bind(payment_id)
                .fetch_optional(&mut *self.0)
                .await?;
                Ok(row.map(PaymentState::from))
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

            $($own)*
        }
    };
}
use payment_tx_impl;

/// One payment event inside one transaction: find the payment and lock its user, load
/// what the rules need, decide, write. `None`: a key race was lost; roll back, retry.
pub(crate) async fn run_payment_event(
    tx: &mut dyn PaymentTx,
    event: &PaymentEvent,
    now_us: i64,
) -> Result<Option<PaymentOutcome>, StoreError> {
    use crate::payments::{PaymentEventKind, fixed_key};
    let mut payment = None;
    if event.kind != PaymentEventKind::PaymentSucceeded {
        // The user is the payment's, from our own record; its row only changes under
        // that user's lock, so it is read again once the lock is held.
        let Some(found) = tx.payment(&event.payment_id).await? else {
            return Ok(Some(PaymentOutcome::UnknownPayment));
        };
        tx.lock_user(&found.user_id).await?;
        let Some(mut locked) = tx.payment(&event.payment_id).await? else {
            return Ok(Some(PaymentOutcome::UnknownPayment));
        };
        if event.kind == PaymentEventKind::Refunded {
            let legacy = tx.take_legacy_refunds(&event.object_id).await?;
            if legacy.0 > 0 {
                let room = locked.credited.0 - locked.disputed.0;
                locked.refunded = Micros((locked.refunded.0 + legacy.0).min(room).max(0));
                locked.refund_debits_total = Micros(locked.refund_debits_total.0 + legacy.0);
                tx.save_payment(&locked).await?;
            }
        }
        payment = Some(locked);
    }
    let existing = match fixed_key(event) {
        Some(key) => tx.stripe_entry(&key).await?,
        None => None,
    };
    let dispute = match event.kind {
        PaymentEventKind::DisputeFundsWithdrawn | PaymentEventKind::DisputeFundsReinstated => {
            tx.dispute(&event.object_id).await?
        }
        _ => None,
    };
    match payment_step(event, payment, dispute, existing) {
        PaymentStep::Answer(outcome) => Ok(Some(outcome)),
        PaymentStep::SaveDispute { dispute, outcome } => {
            tx.save_dispute(&dispute).await?;
            Ok(Some(outcome))
        }
        PaymentStep::Write {
            write,
            payment,
            dispute,
            capped,
        } => {
            let Some(mut outcomes) = tx.apply(std::slice::from_ref(&write), now_us).await? else {
                return Ok(None);
            };
            let outcome = outcomes.pop().ok_or_else(|| {
                StoreError::Corrupt("the ledger plan returned no outcome".to_owned())
            })?;
            if let WriteOutcome::Applied(entry) = &outcome {
                match &payment {
                    None => tx.insert_payment(entry).await?,
                    Some(payment) => tx.save_payment(payment).await?,
                }
                if let Some(dispute) = &dispute {
                    tx.save_dispute(dispute).await?;
                }
            }
            Ok(Some(payment_outcome(outcome, capped)))
        }
    }
}

/// Hold outcomes of an operation list's outcomes.
pub(crate) fn hold_outcomes(outcomes: Vec<OpOutcome>) -> Vec<HoldOutcome> {
    outcomes
        .into_iter()
        .map(|outcome| match outcome {
            OpOutcome::Hold(outcome) => outcome,
            OpOutcome::Write(_) => HoldOutcome::Invalid(crate::ledger::InvalidWrite::new(
                "internal",
                "a write outcome in a plan of holds",
            )),
        })
        .collect()
}

pub(crate) fn write_outcomes(outcomes: Vec<OpOutcome>) -> Vec<WriteOutcome> {
    outcomes
        .into_iter()
        .map(|outcome| match outcome {
            OpOutcome::Write(outcome) => outcome,
            OpOutcome::Hold(_) => WriteOutcome::Invalid(crate::ledger::InvalidWrite::new(
                "internal",
                "a hold outcome in a plan of writes",
            )),
        })
        .collect()
}

/// The outcome of a payment write once the plan ran.
pub(crate) fn payment_outcome(outcome: WriteOutcome, capped: Micros) -> PaymentOutcome {
    match outcome {
        WriteOutcome::Applied(entry) => PaymentOutcome::Applied { entry, capped },
        WriteOutcome::Duplicate(entry) => PaymentOutcome::Duplicate(entry),
        WriteOutcome::Invalid(invalid) => PaymentOutcome::Invalid(invalid),
        // Adjustments and purchases are never refused for want of credits.
        WriteOutcome::Insufficient { .. } => {
            PaymentOutcome::Invalid(crate::ledger::InvalidWrite::new(
                "internal",
                "a payment write was refused as insufficient",
            ))
        }
    }
}

fn entries(rows: Vec<EntryRow>) -> Result<Vec<LedgerEntry>, StoreError> {
    rows.into_iter().map(LedgerEntry::try_from).collect()
}
