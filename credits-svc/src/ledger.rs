//! The ledger's rules, free of I/O: what a write is, when it is valid, and how a list
//! of writes turns into appended entries given the balances and the keys already used.
//!
//! Both stores call [`plan`] inside their transaction, after locking the users'
//! balances, so PostgreSQL and SQLite apply exactly the same rules. This module never
//! talks to a database and never decides anything from a clock.

use std::collections::HashMap;

use reeve_runtime::Micros;

/// The largest amount one write may move: one billion credits.
pub const MAX_WRITE_MICROS: i64 = 1_000_000_000 * reeve_runtime::money::MICROS_PER_CREDIT;

/// Who chose an idempotency key. Keys are unique per source, so a key a caller picks
/// (`pi_…`, `stripe:refund:…`, anything) can never collide with a key the service
/// derives from Stripe's ids or writes for its own jobs. Stored as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// Chosen by a caller of the API (Deduct, DeductBatch, grants, adjustments).
    Caller,
    /// Derived by credits-svc from a Stripe object id (payments, refunds, disputes).
    Stripe,
    /// Written by credits-svc's own jobs.
    System,
}

impl KeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::Caller => "caller",
            KeySource::Stripe => "stripe",
            KeySource::System => "system",
        }
    }

    pub fn parse(text: &str) -> Option<KeySource> {
        Some(match text {
            "caller" => KeySource::Caller,
            "stripe" => KeySource::Stripe,
            "system" => KeySource::System,
            _ => return None,
        })
    }
}

/// Why an entry exists. Stored as text; the names are part of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Usage charged by the gateway: never takes a balance below zero.
    Deduction,
    /// Credits bought through Stripe; keyed by the payment intent id.
    Purchase,
    /// Credits given for free (promotion, support).
    Grant,
    /// Admin credit or debit with a reason (refunds, disputes); may create a debt.
    Adjustment,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Deduction => "deduction",
            EntryKind::Purchase => "purchase",
            EntryKind::Grant => "grant",
            EntryKind::Adjustment => "adjustment",
        }
    }

    pub fn parse(text: &str) -> Option<EntryKind> {
        Some(match text {
            "deduction" => EntryKind::Deduction,
            "purchase" => EntryKind::Purchase,
            "grant" => EntryKind::Grant,
            "adjustment" => EntryKind::Adjustment,
            _ => return None,
        })
    }
}

/// One requested change of a balance. `amount` is signed: a deduction of 5 credits
/// is `Deduction` with `-5_000_000`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRequest {
    pub user_id: String,
    pub kind: EntryKind,
    pub amount: Micros,
    pub idempotency_key: String,
    pub key_source: KeySource,
    /// The Stripe payment intent the entry belongs to (purchases, refunds, disputes).
    pub payment_id: Option<String>,
    pub description: String,
}

impl WriteRequest {
    /// A write whose key the caller chose.
    pub fn caller(
        user_id: impl Into<String>,
        kind: EntryKind,
        amount: Micros,
        idempotency_key: impl Into<String>,
        description: impl Into<String>,
    ) -> WriteRequest {
        WriteRequest {
            user_id: user_id.into(),
            kind,
            amount,
            idempotency_key: idempotency_key.into(),
            key_source: KeySource::Caller,
            payment_id: None,
            description: description.into(),
        }
    }

    /// The key as the ledger makes it unique: with its source.
    pub fn key(&self) -> (KeySource, &str) {
        (self.key_source, self.idempotency_key.as_str())
    }
}

/// One appended line of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: i64,
    pub user_id: String,
    pub kind: EntryKind,
    pub amount: Micros,
    pub balance_after: Micros,
    pub idempotency_key: String,
    pub key_source: KeySource,
    pub payment_id: Option<String>,
    pub description: String,
    pub created_at_us: i64,
}

/// A write that cannot be applied as asked, with a stable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidWrite {
    pub code: &'static str,
    pub message: String,
}

pub const IDEMPOTENCY_KEY_REUSED: &str = "idempotency_key_reused";

impl From<reeve_runtime::ids::InvalidId> for InvalidWrite {
    fn from(invalid: reeve_runtime::ids::InvalidId) -> InvalidWrite {
        InvalidWrite {
            code: invalid.code,
            message: invalid.message,
        }
    }
}

impl InvalidWrite {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> InvalidWrite {
        InvalidWrite {
            code,
            message: message.into(),
        }
    }
}

/// What happened to one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Applied(LedgerEntry),
    /// The key was applied before (possibly earlier in the same batch): the original entry.
    Duplicate(LedgerEntry),
    Insufficient {
        balance: Micros,
        required: Micros,
    },
    Invalid(InvalidWrite),
}

impl WriteRequest {
    /// Checks the shape of the write; balances are checked by [`plan`].
    pub fn validate(&self) -> Result<(), InvalidWrite> {
        reeve_runtime::ids::check_user_id(&self.user_id)?;
        reeve_runtime::ids::check_key(&self.idempotency_key, "idempotency_key")?;
        reeve_runtime::ids::check_description(&self.description)?;
        if let Some(payment_id) = &self.payment_id {
            reeve_runtime::ids::check_key(payment_id, "payment_id")?;
        }
        let amount = self.amount.0;
        let sign_ok = match self.kind {
            EntryKind::Deduction => amount < 0,
            EntryKind::Purchase | EntryKind::Grant => amount > 0,
            EntryKind::Adjustment => amount != 0,
        };
        if !sign_ok {
            return Err(InvalidWrite::new(
                "invalid_amount",
                match self.kind {
                    EntryKind::Adjustment => "amount_micros must not be zero".to_owned(),
                    _ => "amount_micros must be greater than zero".to_owned(),
                },
            ));
        }
        if amount.unsigned_abs() > MAX_WRITE_MICROS.unsigned_abs() {
            return Err(InvalidWrite::new(
                "amount_overflow",
                format!("amount_micros must be at most {MAX_WRITE_MICROS} in size"),
            ));
        }
        if self.kind == EntryKind::Adjustment && self.description.trim().is_empty() {
            return Err(InvalidWrite::new(
                "missing_reason",
                "an adjustment needs a reason",
            ));
        }
        Ok(())
    }

    /// Whether `entry` records this same request (the idempotency comparison).
    /// The description is free text and takes no part in it.
    pub fn same_request_as(&self, entry: &LedgerEntry) -> bool {
        self.user_id == entry.user_id && self.kind == entry.kind && self.amount == entry.amount
    }

    /// The entry this write records once it has `id`.
    fn entry(&self, id: i64, balance_after: Micros, created_at_us: i64) -> LedgerEntry {
        LedgerEntry {
            id,
            user_id: self.user_id.clone(),
            kind: self.kind,
            amount: self.amount,
            balance_after,
            idempotency_key: self.idempotency_key.clone(),
            key_source: self.key_source,
            payment_id: self.payment_id.clone(),
            description: self.description.clone(),
            created_at_us,
        }
    }

    fn same_request(&self, other: &WriteRequest) -> bool {
        self.user_id == other.user_id && self.kind == other.kind && self.amount == other.amount
    }
}

/// An entry the store must append, in this order: the write and the balance after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub write: WriteRequest,
    pub balance_after: Micros,
}

#[derive(Debug, Clone)]
enum Planned {
    /// Becomes `Applied` once the entry at this index of `inserts` has its id.
    Insert(usize),
    /// Becomes `Duplicate` of the entry at this index of `inserts`.
    DuplicateOfInsert(usize),
    Done(WriteOutcome),
}

/// What a list of writes does to the ledger: entries to append and, per write, its outcome.
#[derive(Debug, Clone)]
pub struct Plan {
    pub inserts: Vec<NewEntry>,
    outcomes: Vec<Planned>,
    created_at_us: i64,
}

impl Plan {
    /// Builds the outcomes once the store has appended `inserts` and got their ids
    /// (`ids[i]` belongs to `inserts[i]`).
    pub fn finish(self, ids: &[i64]) -> Vec<WriteOutcome> {
        let entry = |index: usize| {
            let new = &self.inserts[index];
            new.write
                .entry(ids[index], new.balance_after, self.created_at_us)
        };
        self.outcomes
            .iter()
            .map(|planned| match planned {
                Planned::Insert(index) => WriteOutcome::Applied(entry(*index)),
                Planned::DuplicateOfInsert(index) => WriteOutcome::Duplicate(entry(*index)),
                Planned::Done(outcome) => outcome.clone(),
            })
            .collect()
    }

    /// The net change of each user's balance, to apply to the cached balances.
    pub fn deltas(&self) -> HashMap<&str, i64> {
        let mut deltas: HashMap<&str, i64> = HashMap::new();
        for entry in &self.inserts {
            *deltas.entry(entry.write.user_id.as_str()).or_default() += entry.write.amount.0;
        }
        deltas
    }
}

/// Ledger entries already holding some keys, by source and key.
pub type ExistingEntries = HashMap<(KeySource, String), LedgerEntry>;

/// Applies `writes` in order against `balances` (the locked current balances; a
/// missing user has zero) and `existing` (ledger entries already holding some of the
/// writes' keys). Each write stands alone: one that is invalid or short of credits
/// does not stop the others, and a batch gives every write the outcome it would have
/// had as a call of its own, in the same order.
pub fn plan(
    writes: &[WriteRequest],
    balances: &HashMap<String, Micros>,
    existing: &ExistingEntries,
    created_at_us: i64,
) -> Plan {
    let mut current: HashMap<&str, Micros> = HashMap::new();
    // Keys applied earlier in this list: the write that used them and its insert.
    let mut seen: HashMap<(KeySource, &str), (&WriteRequest, usize)> = HashMap::new();
    let mut inserts = Vec::new();
    let mut outcomes = Vec::with_capacity(writes.len());

    for write in writes {
        if let Err(invalid) = write.validate() {
            outcomes.push(Planned::Done(WriteOutcome::Invalid(invalid)));
            continue;
        }
        let key = write.key();
        if let Some(entry) = existing.get(&(key.0, key.1.to_owned())) {
            outcomes.push(Planned::Done(if write.same_request_as(entry) {
                WriteOutcome::Duplicate(entry.clone())
            } else {
                WriteOutcome::Invalid(key_reused(key.1))
            }));
            continue;
        }
        // Only an applied write claims its key: one refused (short of credits, or an
        // overflow) recorded nothing, so a later write with that key is judged afresh,
        // exactly as a retried call would be.
        if let Some((earlier, index)) = seen.get(&key) {
            outcomes.push(if write.same_request(earlier) {
                Planned::DuplicateOfInsert(*index)
            } else {
                Planned::Done(WriteOutcome::Invalid(key_reused(key.1)))
            });
            continue;
        }
        let balance = *current.entry(write.user_id.as_str()).or_insert_with(|| {
            balances
                .get(&write.user_id)
                .copied()
                .unwrap_or(Micros::ZERO)
        });
        let Some(balance_after) = balance.checked_add(write.amount) else {
            outcomes.push(Planned::Done(WriteOutcome::Invalid(InvalidWrite::new(
                "balance_overflow",
                "the balance would overflow",
            ))));
            continue;
        };
        if write.kind == EntryKind::Deduction && balance_after < Micros::ZERO {
            outcomes.push(Planned::Done(WriteOutcome::Insufficient {
                balance,
                required: Micros(write.amount.0.saturating_neg()),
            }));
            continue;
        }
        current.insert(write.user_id.as_str(), balance_after);
        seen.insert(key, (write, inserts.len()));
        outcomes.push(Planned::Insert(inserts.len()));
        inserts.push(NewEntry {
            write: write.clone(),
            balance_after,
        });
    }
    Plan {
        inserts,
        outcomes,
        created_at_us,
    }
}

fn key_reused(key: &str) -> InvalidWrite {
    InvalidWrite::new(
        IDEMPOTENCY_KEY_REUSED,
        format!("idempotency key {key:?} was already used for a different request"),
    )
}

/// The users whose balances `writes` may read or change, sorted and distinct: the
/// order in which stores lock them, so concurrent transactions never deadlock. Invalid
/// writes are left out: their text never reaches the database.
pub fn users_to_lock(writes: &[WriteRequest]) -> Vec<String> {
    let mut users: Vec<String> = writes
        .iter()
        .filter(|w| w.validate().is_ok())
        .map(|w| w.user_id.clone())
        .collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// The users that `writes` may credit, sorted and distinct: their balance rows must
/// exist before locking, so two first credits of a new user serialise on that row.
pub fn users_to_create(writes: &[WriteRequest]) -> Vec<String> {
    let mut users: Vec<String> = writes
        .iter()
        .filter(|w| w.kind != EntryKind::Deduction && w.validate().is_ok())
        .map(|w| w.user_id.clone())
        .collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// The distinct idempotency keys of the valid `writes`.
pub fn keys_of(writes: &[WriteRequest]) -> Vec<String> {
    let mut keys: Vec<String> = writes
        .iter()
        .filter(|w| w.validate().is_ok())
        .map(|w| w.idempotency_key.clone())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deduct(user: &str, micros: i64, key: &str) -> WriteRequest {
        WriteRequest::caller(user, EntryKind::Deduction, Micros(-micros), key, "")
    }

    fn balances(pairs: &[(&str, i64)]) -> HashMap<String, Micros> {
        pairs
            .iter()
            .map(|(u, b)| ((*u).to_owned(), Micros(*b)))
            .collect()
    }

    #[test]
    fn applies_in_order_and_stops_at_zero() {
        let writes = vec![
            deduct("a", 60, "k1"),
            deduct("a", 60, "k2"),
            deduct("a", 40, "k3"),
        ];
        let plan = plan(&writes, &balances(&[("a", 100)]), &HashMap::new(), 0);
        assert_eq!(plan.inserts.len(), 2);
        let outcomes = plan.finish(&[1, 2]);
        assert!(matches!(&outcomes[0], WriteOutcome::Applied(e) if e.balance_after == Micros(40)));
        assert_eq!(
            outcomes[1],
            WriteOutcome::Insufficient {
                balance: Micros(40),
                required: Micros(60)
            }
        );
        assert!(
            matches!(&outcomes[2], WriteOutcome::Applied(e) if e.balance_after == Micros(0) && e.id == 2)
        );
    }

    #[test]
    fn duplicate_keys_inside_a_batch_apply_once() {
        let writes = vec![
            deduct("a", 10, "k"),
            deduct("a", 10, "k"),
            deduct("b", 10, "k"),
        ];
        let plan = plan(
            &writes,
            &balances(&[("a", 100), ("b", 100)]),
            &HashMap::new(),
            0,
        );
        assert_eq!(plan.inserts.len(), 1);
        let outcomes = plan.finish(&[7]);
        assert!(matches!(&outcomes[0], WriteOutcome::Applied(e) if e.id == 7));
        assert!(matches!(&outcomes[1], WriteOutcome::Duplicate(e) if e.id == 7));
        assert!(
            matches!(&outcomes[2], WriteOutcome::Invalid(i) if i.code == IDEMPOTENCY_KEY_REUSED)
        );
    }

    #[test]
    fn an_unapplied_key_is_judged_again_later_in_the_batch() {
        let grant = WriteRequest::caller("a", EntryKind::Grant, Micros(50), "g", "");
        let writes = vec![deduct("a", 50, "k"), grant, deduct("a", 50, "k")];
        let plan = plan(&writes, &HashMap::new(), &HashMap::new(), 0);
        let outcomes = plan.finish(&[1, 2]);
        assert!(matches!(outcomes[0], WriteOutcome::Insufficient { .. }));
        assert!(matches!(&outcomes[2], WriteOutcome::Applied(e) if e.balance_after == Micros(0)));
    }

    #[test]
    fn invalid_items_do_not_sink_the_rest() {
        let writes = vec![
            deduct("a", 0, "k0"),
            deduct("", 5, "k1"),
            deduct("a", 5, ""),
            deduct("a", 5, "k3"),
        ];
        let outcomes = plan(&writes, &balances(&[("a", 5)]), &HashMap::new(), 0).finish(&[9]);
        assert!(matches!(&outcomes[0], WriteOutcome::Invalid(i) if i.code == "invalid_amount"));
        assert!(matches!(&outcomes[1], WriteOutcome::Invalid(i) if i.code == "invalid_user_id"));
        assert!(
            matches!(&outcomes[2], WriteOutcome::Invalid(i) if i.code == "invalid_idempotency_key")
        );
        assert!(matches!(&outcomes[3], WriteOutcome::Applied(_)));
    }

    #[test]
    fn a_key_refused_for_want_of_credits_is_free_again_whatever_the_amount() {
        // The same rule as two calls: the refused deduction recorded nothing, so the
        // key may be used again, even for another amount.
        let writes = vec![
            deduct("a", 50, "k"),
            deduct("a", 30, "k"),
            deduct("a", 30, "k"),
        ];
        let outcomes = plan(&writes, &balances(&[("a", 40)]), &HashMap::new(), 0).finish(&[3]);
        assert!(matches!(outcomes[0], WriteOutcome::Insufficient { .. }));
        assert!(matches!(&outcomes[1], WriteOutcome::Applied(e) if e.balance_after == Micros(10)));
        assert!(matches!(&outcomes[2], WriteOutcome::Duplicate(e) if e.id == 3));
    }

    #[test]
    fn keys_of_different_sources_never_collide() {
        let mut stripe = WriteRequest::caller("a", EntryKind::Purchase, Micros(25), "pi_1", "");
        stripe.key_source = KeySource::Stripe;
        let existing: ExistingEntries = HashMap::from([(
            (KeySource::Stripe, "pi_1".to_owned()),
            stripe.entry(1, Micros(25), 0),
        )]);
        // A gateway deduction keyed with the payment intent id is its own write…
        let outcomes = plan(
            &[deduct("a", 5, "pi_1"), stripe.clone()],
            &balances(&[("a", 25)]),
            &existing,
            0,
        )
        .finish(&[2]);
        assert!(
            matches!(&outcomes[0], WriteOutcome::Applied(e) if e.key_source == KeySource::Caller)
        );
        // …and the payment stays a duplicate of itself, not a key conflict.
        assert!(matches!(&outcomes[1], WriteOutcome::Duplicate(e) if e.id == 1));
    }

    #[test]
    fn nul_and_control_characters_are_refused_before_any_write() {
        let mut described = deduct("a", 5, "k3");
        described.description = "x\0y".to_owned();
        let writes = vec![
            deduct("a\0", 5, "k1"),
            deduct("a", 5, "k\0"),
            described,
            deduct("a", 5, "k4"),
        ];
        let outcomes = plan(&writes, &balances(&[("a", 5)]), &HashMap::new(), 0).finish(&[1]);
        assert!(matches!(&outcomes[0], WriteOutcome::Invalid(i) if i.code == "invalid_user_id"));
        assert!(
            matches!(&outcomes[1], WriteOutcome::Invalid(i) if i.code == "invalid_idempotency_key")
        );
        assert!(
            matches!(&outcomes[2], WriteOutcome::Invalid(i) if i.code == "invalid_description")
        );
        assert!(matches!(&outcomes[3], WriteOutcome::Applied(_)));
    }

    #[test]
    fn credits_that_would_overflow_are_refused() {
        let grant = WriteRequest::caller("a", EntryKind::Grant, Micros(MAX_WRITE_MICROS), "g", "");
        let outcomes = plan(
            &[grant],
            &balances(&[("a", i64::MAX - 1)]),
            &HashMap::new(),
            0,
        )
        .finish(&[]);
        assert!(matches!(&outcomes[0], WriteOutcome::Invalid(i) if i.code == "balance_overflow"));
    }
}
