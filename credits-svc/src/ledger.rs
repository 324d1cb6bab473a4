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
pub const MAX_USER_ID_BYTES: usize = 128;
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
pub const MAX_DESCRIPTION_BYTES: usize = 1024;

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
    pub description: String,
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

impl InvalidWrite {
    fn new(code: &'static str, message: impl Into<String>) -> InvalidWrite {
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
        if self.user_id.is_empty() || self.user_id.len() > MAX_USER_ID_BYTES {
            return Err(InvalidWrite::new(
                "invalid_user_id",
                format!("user_id must be 1 to {MAX_USER_ID_BYTES} bytes"),
            ));
        }
        if self.user_id.chars().any(char::is_control) {
            return Err(InvalidWrite::new(
                "invalid_user_id",
                "user_id must not contain control characters",
            ));
        }
        if self.idempotency_key.is_empty() || self.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES
        {
            return Err(InvalidWrite::new(
                "invalid_idempotency_key",
                format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
            ));
        }
        if self.description.len() > MAX_DESCRIPTION_BYTES {
            return Err(InvalidWrite::new(
                "invalid_description",
                format!("description must be at most {MAX_DESCRIPTION_BYTES} bytes"),
            ));
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

    fn same_request(&self, other: &WriteRequest) -> bool {
        self.user_id == other.user_id && self.kind == other.kind && self.amount == other.amount
    }
}

/// An entry the store must append, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub user_id: String,
    pub kind: EntryKind,
    pub amount: Micros,
    pub balance_after: Micros,
    pub idempotency_key: String,
    pub description: String,
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
            LedgerEntry {
                id: ids[index],
                user_id: new.user_id.clone(),
                kind: new.kind,
                amount: new.amount,
                balance_after: new.balance_after,
                idempotency_key: new.idempotency_key.clone(),
                description: new.description.clone(),
                created_at_us: self.created_at_us,
            }
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
            *deltas.entry(entry.user_id.as_str()).or_default() += entry.amount.0;
        }
        deltas
    }
}

/// Applies `writes` in order against `balances` (the locked current balances; a
/// missing user has zero) and `existing` (ledger entries already holding some of the
/// writes' keys). Each write stands alone: one that is invalid or short of credits
/// does not stop the others.
pub fn plan(
    writes: &[WriteRequest],
    balances: &HashMap<String, Micros>,
    existing: &HashMap<String, LedgerEntry>,
    created_at_us: i64,
) -> Plan {
    let mut current: HashMap<&str, Micros> = HashMap::new();
    // Keys seen earlier in this list: the write that used them and the insert it made.
    let mut seen: HashMap<&str, (&WriteRequest, Option<usize>)> = HashMap::new();
    let mut inserts = Vec::new();
    let mut outcomes = Vec::with_capacity(writes.len());

    for write in writes {
        if let Err(invalid) = write.validate() {
            outcomes.push(Planned::Done(WriteOutcome::Invalid(invalid)));
            continue;
        }
        let key = write.idempotency_key.as_str();
        if let Some(entry) = existing.get(key) {
            outcomes.push(Planned::Done(if write.same_request_as(entry) {
                WriteOutcome::Duplicate(entry.clone())
            } else {
                WriteOutcome::Invalid(key_reused(key))
            }));
            continue;
        }
        if let Some((earlier, applied)) = seen.get(key) {
            if !write.same_request(earlier) {
                outcomes.push(Planned::Done(WriteOutcome::Invalid(key_reused(key))));
                continue;
            }
            if let Some(index) = applied {
                outcomes.push(Planned::DuplicateOfInsert(*index));
                continue;
            }
            // The earlier identical write was not applied: nothing was recorded, so this
            // one is judged afresh.
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
            seen.insert(key, (write, None));
            continue;
        };
        if write.kind == EntryKind::Deduction && balance_after < Micros::ZERO {
            outcomes.push(Planned::Done(WriteOutcome::Insufficient {
                balance,
                required: Micros(write.amount.0.saturating_neg()),
            }));
            seen.insert(key, (write, None));
            continue;
        }
        current.insert(write.user_id.as_str(), balance_after);
        seen.insert(key, (write, Some(inserts.len())));
        outcomes.push(Planned::Insert(inserts.len()));
        inserts.push(NewEntry {
            user_id: write.user_id.clone(),
            kind: write.kind,
            amount: write.amount,
            balance_after,
            idempotency_key: write.idempotency_key.clone(),
            description: write.description.clone(),
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
/// order in which stores lock them, so concurrent transactions never deadlock.
pub fn users_to_lock(writes: &[WriteRequest]) -> Vec<String> {
    let mut users: Vec<String> = writes.iter().map(|w| w.user_id.clone()).collect();
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

/// The distinct idempotency keys of `writes`.
pub fn keys_of(writes: &[WriteRequest]) -> Vec<String> {
    let mut keys: Vec<String> = writes.iter().map(|w| w.idempotency_key.clone()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deduct(user: &str, micros: i64, key: &str) -> WriteRequest {
        WriteRequest {
            user_id: user.into(),
            kind: EntryKind::Deduction,
            amount: Micros(-micros),
            idempotency_key: key.into(),
            description: String::new(),
        }
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
        let mut grant = deduct("a", 0, "g");
        grant.kind = EntryKind::Grant;
        grant.amount = Micros(50);
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
    fn credits_that_would_overflow_are_refused() {
        let mut grant = deduct("a", 0, "g");
        grant.kind = EntryKind::Grant;
        grant.amount = Micros(MAX_WRITE_MICROS);
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
