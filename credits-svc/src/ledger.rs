//! The ledger's rules, free of I/O: what a write is, when it is valid, and how a list
//! of writes turns into appended entries and lot movements given the balances, the
//! live lots and the keys already used.
//!
//! Both stores call [`plan`] inside their transaction, after locking the users'
//! balances, so PostgreSQL and SQLite apply exactly the same rules. This module never
//! talks to a database and never reads a clock: the instant is passed in.
//!
//! Balances and lots move together: for every user, balance = sum of live lot
//! remainders − debt, where a debt (a negative balance) only exists while the user has
//! no live lot. Credits pay a debt first and make a lot of the rest; debits draw from
//! lots in spending order ([`crate::lots::spending_order`]) and leave a debt past them;
//! a lot whose expiry instant has come leaves through one `expiration` entry before
//! anything else in the transaction happens to its user.

use std::collections::HashMap;

use reeve_runtime::Micros;

use crate::lots::{Lot, LotTerms, MAX_PRIORITY, spending_key};

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
    /// A lot's unspent remainder leaving at its expiry instant (key `expire:<lot id>`).
    Expiration,
    /// A lot's remainder removed by an admin (a promotion withdrawn).
    Revocation,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Deduction => "deduction",
            EntryKind::Purchase => "purchase",
            EntryKind::Grant => "grant",
            EntryKind::Adjustment => "adjustment",
            EntryKind::Expiration => "expiration",
            EntryKind::Revocation => "revocation",
        }
    }

    /// Credits make a lot (or pay a debt).
    pub fn is_credit(self) -> bool {
        matches!(self, EntryKind::Purchase | EntryKind::Grant)
    }

    pub fn parse(text: &str) -> Option<EntryKind> {
        Some(match text {
            "deduction" => EntryKind::Deduction,
            "purchase" => EntryKind::Purchase,
            "grant" => EntryKind::Grant,
            "adjustment" => EntryKind::Adjustment,
            "expiration" => EntryKind::Expiration,
            "revocation" => EntryKind::Revocation,
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
    /// For a credit: the terms of its lot (`None`: the kind's defaults).
    pub lot_terms: Option<LotTerms>,
    /// For a revocation: the lot it removes (its amount is the lot's remainder).
    pub target_lot_id: Option<i64>,
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
            lot_terms: None,
            target_lot_id: None,
        }
    }

    /// A revocation of what is left of `lot` (of `user_id`).
    pub fn revocation(
        user_id: impl Into<String>,
        lot_id: i64,
        idempotency_key: impl Into<String>,
        reason: impl Into<String>,
    ) -> WriteRequest {
        WriteRequest {
            target_lot_id: Some(lot_id),
            ..WriteRequest::caller(
                user_id,
                EntryKind::Revocation,
                Micros::ZERO,
                idempotency_key,
                reason,
            )
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
    /// The lot an expiration or revocation removed.
    pub target_lot_id: Option<i64>,
    /// What the entry took from each lot, in the order drawn.
    pub draws: Vec<LotDraw>,
}

/// Micros one entry took from one lot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LotDraw {
    pub lot_id: i64,
    pub amount: Micros,
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
            // Their amount is the lot's remainder, found by the plan.
            EntryKind::Expiration | EntryKind::Revocation => self.target_lot_id.is_some(),
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
        if matches!(self.kind, EntryKind::Adjustment | EntryKind::Revocation)
            && self.description.trim().is_empty()
        {
            return Err(InvalidWrite::new(
                "missing_reason",
                "an adjustment or revocation needs a reason",
            ));
        }
        if let Some(terms) = &self.lot_terms {
            if !(self.kind.is_credit() || (self.kind == EntryKind::Adjustment && amount > 0)) {
                return Err(InvalidWrite::new(
                    "invalid_lot_terms",
                    "only credits take a category, priority or expiry",
                ));
            }
            if !(0..=MAX_PRIORITY).contains(&terms.priority) {
                return Err(InvalidWrite::new(
                    "invalid_priority",
                    format!("priority must be 0 to {MAX_PRIORITY}"),
                ));
            }
        }
        Ok(())
    }

    /// The lot terms a credit gets.
    pub fn terms(&self) -> LotTerms {
        self.lot_terms
            .unwrap_or_else(|| LotTerms::default_for(self.kind))
    }

    /// Whether `entry` records this same request (the idempotency comparison).
    /// The description is free text and takes no part in it.
    pub fn same_request_as(&self, entry: &LedgerEntry) -> bool {
        self.user_id == entry.user_id
            && self.kind == entry.kind
            && match self.kind {
                EntryKind::Revocation | EntryKind::Expiration => {
                    self.target_lot_id == entry.target_lot_id
                }
                _ => self.amount == entry.amount,
            }
    }

    /// The entry this write records once it has `id`.
    fn entry(&self, id: i64, balance_after: Micros, created_at_us: i64) -> LedgerEntry {
        LedgerEntry {
            id,
            user_id: self.user_id.clone(),
            kind: self.kind,
            amount: self.amount,
            balance_after,
            target_lot_id: self.target_lot_id,
            draws: Vec::new(),
            idempotency_key: self.idempotency_key.clone(),
            key_source: self.key_source,
            payment_id: self.payment_id.clone(),
            description: self.description.clone(),
            created_at_us,
        }
    }

    fn same_request(&self, other: &WriteRequest) -> bool {
        self.user_id == other.user_id
            && self.kind == other.kind
            && self.amount == other.amount
            && self.target_lot_id == other.target_lot_id
    }
}

/// A lot an entry draws from: one that exists, or one made earlier in the same plan
/// (its index in [`Plan::new_lots`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LotRef {
    Existing(i64),
    New(usize),
}

/// An entry the store must append, in this order: the write, the balance after it, and
/// what it draws from which lot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub write: WriteRequest,
    pub balance_after: Micros,
    pub draws: Vec<(LotRef, Micros)>,
}

/// A lot the store must make, for the credit entry at `entry` (an index of `inserts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLot {
    pub entry: usize,
    pub user_id: String,
    pub terms: LotTerms,
    pub source: String,
    pub original: Micros,
    /// What is left once the later entries of the same plan drew from it.
    pub remaining: Micros,
}

#[derive(Debug, Clone)]
enum Planned {
    /// Becomes `Applied` once the entry at this index of `inserts` has its id.
    Insert(usize),
    /// Becomes `Duplicate` of the entry at this index of `inserts`.
    DuplicateOfInsert(usize),
    Done(WriteOutcome),
}

/// What a list of writes does to the ledger: entries to append (expirations first),
/// lots to make and to draw down, and per write its outcome.
#[derive(Debug, Clone)]
pub struct Plan {
    pub inserts: Vec<NewEntry>,
    pub new_lots: Vec<NewLot>,
    outcomes: Vec<Planned>,
    created_at_us: i64,
}

impl Plan {
    /// Builds the outcomes once the store has appended `inserts` and made `new_lots`
    /// (`ids[i]` belongs to `inserts[i]`, `lot_ids[j]` to `new_lots[j]`).
    pub fn finish(self, ids: &[i64], lot_ids: &[i64]) -> Vec<WriteOutcome> {
        let entry = |index: usize| {
            let new = &self.inserts[index];
            let mut entry = new
                .write
                .entry(ids[index], new.balance_after, self.created_at_us);
            entry.draws = new
                .draws
                .iter()
                .map(|(lot, amount)| LotDraw {
                    lot_id: match lot {
                        LotRef::Existing(id) => *id,
                        LotRef::New(j) => lot_ids[*j],
                    },
                    amount: *amount,
                })
                .collect();
            entry
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

    /// What each existing lot loses, to apply to the stored remainders.
    pub fn spent(&self) -> HashMap<i64, i64> {
        let mut spent: HashMap<i64, i64> = HashMap::new();
        for entry in &self.inserts {
            for (lot, amount) in &entry.draws {
                if let LotRef::Existing(id) = lot {
                    *spent.entry(*id).or_default() += amount.0;
                }
            }
        }
        spent
    }
}

/// Ledger entries already holding some keys, by source and key.
pub type ExistingEntries = HashMap<(KeySource, String), LedgerEntry>;

/// A lot as the plan tracks it: where it is in the spending order, what is left.
#[derive(Debug, Clone)]
struct Tracked {
    lot: LotRef,
    order: (i32, i64, u8, i64),
    expires_at_us: Option<i64>,
    source: String,
    remaining: Micros,
}

/// One user's wallet inside a plan: the balance and the lots, in spending order.
#[derive(Debug, Default)]
struct Wallet {
    balance: Micros,
    lots: Vec<Tracked>,
}

impl Wallet {
    fn live(&self, now_us: i64) -> impl Iterator<Item = usize> + '_ {
        self.lots.iter().enumerate().filter_map(move |(i, t)| {
            (t.remaining.0 > 0 && t.expires_at_us.is_none_or(|at| now_us < at)).then_some(i)
        })
    }

    /// Draws up to `amount` from live lots (the lot of `first_source` first, then in
    /// spending order); returns the draws. What is not drawn becomes debt.
    fn draw(
        &mut self,
        amount: i64,
        first_source: Option<&str>,
        now_us: i64,
    ) -> Vec<(LotRef, Micros)> {
        let mut order: Vec<usize> = self.live(now_us).collect();
        if let Some(source) = first_source
            && let Some(pos) = order.iter().position(|&i| self.lots[i].source == source)
        {
            let own = order.remove(pos);
            order.insert(0, own);
        }
        let mut need = amount;
        let mut draws = Vec::new();
        for i in order {
            if need == 0 {
                break;
            }
            let tracked = &mut self.lots[i];
            let take = need.min(tracked.remaining.0);
            tracked.remaining = Micros(tracked.remaining.0 - take);
            need -= take;
            draws.push((tracked.lot, Micros(take)));
        }
        draws
    }
}

/// Applies `writes` in order against `balances` (the locked current balances; a
/// missing user has zero), `lots` (the users' lots with a remainder, expired or not)
/// and `existing` (ledger entries already holding some of the writes' keys), at
/// `now_us`. Lots of these users whose expiry instant has come expire first. Each
/// write stands alone: one that is invalid or short of credits does not stop the
/// others, and a batch gives every write the outcome it would have had as a call of
/// its own, in the same order.
pub fn plan(
    writes: &[WriteRequest],
    balances: &HashMap<String, Micros>,
    lots: &[Lot],
    existing: &ExistingEntries,
    now_us: i64,
) -> Plan {
    let mut wallets: HashMap<&str, Wallet> = HashMap::new();
    let mut by_user: Vec<&Lot> = lots.iter().filter(|l| l.remaining.0 > 0).collect();
    by_user.sort_by(|a, b| {
        a.user_id
            .cmp(&b.user_id)
            .then_with(|| crate::lots::spending_order(a, b))
    });
    for lot in &by_user {
        let wallet = wallets.entry(lot.user_id.as_str()).or_default();
        wallet.lots.push(Tracked {
            lot: LotRef::Existing(lot.id),
            order: spending_key(lot.priority, lot.expires_at_us, lot.category, lot.id),
            expires_at_us: lot.expires_at_us,
            source: lot.source.clone(),
            remaining: lot.remaining,
        });
    }
    let mut inserts = Vec::new();
    let mut new_lots: Vec<NewLot> = Vec::new();
    // Users whose wallet balance has been read from `balances`.
    let mut loaded: std::collections::HashSet<&str> = std::collections::HashSet::new();

    // Expiry first: a lot whose instant has come is gone before anything else runs.
    for lot in by_user.iter().filter(|l| l.is_expired(now_us)) {
        let wallet = wallets.entry(lot.user_id.as_str()).or_default();
        if loaded.insert(lot.user_id.as_str()) {
            wallet.balance = balances.get(&lot.user_id).copied().unwrap_or(Micros::ZERO);
        }
        let Some(tracked) = wallet
            .lots
            .iter_mut()
            .find(|t| t.lot == LotRef::Existing(lot.id))
        else {
            continue;
        };
        let amount = tracked.remaining;
        tracked.remaining = Micros::ZERO;
        wallet.balance = Micros(wallet.balance.0 - amount.0);
        inserts.push(NewEntry {
            write: WriteRequest {
                user_id: lot.user_id.clone(),
                kind: EntryKind::Expiration,
                amount: Micros(-amount.0),
                idempotency_key: format!("expire:{}", lot.id),
                key_source: KeySource::System,
                payment_id: None,
                description: format!("lot {} expired", lot.id),
                lot_terms: None,
                target_lot_id: Some(lot.id),
            },
            balance_after: wallet.balance,
            draws: vec![(LotRef::Existing(lot.id), amount)],
        });
    }
    // Keys applied earlier in this list: the write that used them and its insert.
    let mut seen: HashMap<(KeySource, &str), (&WriteRequest, usize)> = HashMap::new();
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
        let user = write.user_id.as_str();
        let wallet = wallets.entry(user).or_default();
        if loaded.insert(user) {
            wallet.balance = balances.get(user).copied().unwrap_or(Micros::ZERO);
        }
        let balance = wallet.balance;
        let (amount, draws, made) = match decide(write, wallet, now_us) {
            Ok(decided) => decided,
            Err(outcome) => {
                outcomes.push(Planned::Done(outcome));
                continue;
            }
        };
        let Some(balance_after) = balance.checked_add(amount) else {
            outcomes.push(Planned::Done(WriteOutcome::Invalid(InvalidWrite::new(
                "balance_overflow",
                "the balance would overflow",
            ))));
            continue;
        };
        // Commit the decision to the wallet.
        for (lot, taken) in &draws {
            if let Some(tracked) = wallet.lots.iter_mut().find(|t| t.lot == *lot) {
                tracked.remaining = Micros(tracked.remaining.0 - taken.0);
            }
        }
        if let Some((terms, lot_amount)) = made {
            let index = new_lots.len();
            new_lots.push(NewLot {
                entry: inserts.len(),
                user_id: write.user_id.clone(),
                terms,
                source: write
                    .payment_id
                    .clone()
                    .unwrap_or_else(|| write.idempotency_key.clone()),
                original: lot_amount,
                remaining: lot_amount,
            });
            let tracked = Tracked {
                lot: LotRef::New(index),
                order: spending_key(
                    terms.priority,
                    terms.expires_at_us,
                    terms.category,
                    i64::MAX / 2 + index as i64,
                ),
                expires_at_us: terms.expires_at_us,
                source: new_lots[index].source.clone(),
                remaining: lot_amount,
            };
            let at = wallet.lots.partition_point(|t| t.order <= tracked.order);
            wallet.lots.insert(at, tracked);
        }
        wallet.balance = balance_after;
        seen.insert(key, (write, inserts.len()));
        outcomes.push(Planned::Insert(inserts.len()));
        inserts.push(NewEntry {
            write: WriteRequest {
                amount,
                ..write.clone()
            },
            balance_after,
            draws,
        });
    }
    // New lots' remainders after the draws of later entries of this plan.
    for entry in &inserts {
        for (lot, taken) in &entry.draws {
            if let LotRef::New(j) = lot {
                new_lots[*j].remaining = Micros(new_lots[*j].remaining.0 - taken.0);
            }
        }
    }
    Plan {
        inserts,
        new_lots,
        outcomes,
        created_at_us: now_us,
    }
}

/// What one valid write does to its user's wallet: its signed amount, its draws, and
/// the lot it makes (terms and amount), or the outcome that refuses it.
// The refusal is consumed at once by the caller: boxing it would buy nothing.
#[allow(clippy::type_complexity, clippy::result_large_err)]
fn decide(
    write: &WriteRequest,
    wallet: &Wallet,
    now_us: i64,
) -> Result<(Micros, Vec<(LotRef, Micros)>, Option<(LotTerms, Micros)>), WriteOutcome> {
    let balance = wallet.balance;
    let mut scratch = Wallet {
        balance,
        lots: wallet.lots.clone(),
    };
    match write.kind {
        EntryKind::Deduction => {
            let required = write.amount.0.saturating_neg();
            if balance.0 < required {
                return Err(WriteOutcome::Insufficient {
                    balance,
                    required: Micros(required),
                });
            }
            Ok((write.amount, scratch.draw(required, None, now_us), None))
        }
        EntryKind::Revocation | EntryKind::Expiration => {
            let Some(target) = write.target_lot_id else {
                return Err(WriteOutcome::Invalid(InvalidWrite::new(
                    "missing_lot",
                    "a revocation names its lot",
                )));
            };
            let live = scratch
                .live(now_us)
                .find(|&i| scratch.lots[i].lot == LotRef::Existing(target));
            let Some(index) = live else {
                return Err(WriteOutcome::Invalid(InvalidWrite::new(
                    NOTHING_TO_REVOKE,
                    format!("lot {target} has nothing left to revoke"),
                )));
            };
            let amount = scratch.lots[index].remaining;
            Ok((
                Micros(-amount.0),
                vec![(LotRef::Existing(target), amount)],
                None,
            ))
        }
        _ if write.amount.0 < 0 => {
            // A debit (refund, dispute, admin): its own payment's lot first, then the
            // spending order, and a debt past the lots.
            let draws = scratch.draw(
                write.amount.0.saturating_neg(),
                write.payment_id.as_deref(),
                now_us,
            );
            Ok((write.amount, draws, None))
        }
        _ => {
            let terms = write.terms();
            if terms.expires_at_us.is_some_and(|at| at <= now_us) {
                return Err(WriteOutcome::Invalid(InvalidWrite::new(
                    "invalid_expires_at",
                    "expires_at must be in the future",
                )));
            }
            // A debt is paid first; only the rest becomes a lot.
            let debt = (-balance.0).max(0);
            let lot_amount = write.amount.0 - write.amount.0.min(debt);
            let made = (lot_amount > 0).then_some((terms, Micros(lot_amount)));
            Ok((write.amount, Vec::new(), made))
        }
    }
}

/// The code of a revocation of a lot with nothing left.
pub const NOTHING_TO_REVOKE: &str = "nothing_to_revoke";

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
    use crate::lots::Category;

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
        let plan = plan(&writes, &balances(&[("a", 100)]), &[], &HashMap::new(), 0);
        assert_eq!(plan.inserts.len(), 2);
        let outcomes = plan.finish(&[1, 2], &[]);
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
            &[],
            &HashMap::new(),
            0,
        );
        assert_eq!(plan.inserts.len(), 1);
        let outcomes = plan.finish(&[7], &[]);
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
        let plan = plan(&writes, &HashMap::new(), &[], &HashMap::new(), 0);
        let outcomes = plan.finish(&[1, 2], &[100]);
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
        let outcomes =
            plan(&writes, &balances(&[("a", 5)]), &[], &HashMap::new(), 0).finish(&[9], &[]);
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
        let outcomes =
            plan(&writes, &balances(&[("a", 40)]), &[], &HashMap::new(), 0).finish(&[3], &[]);
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
            &[],
            &existing,
            0,
        )
        .finish(&[2], &[]);
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
        let outcomes =
            plan(&writes, &balances(&[("a", 5)]), &[], &HashMap::new(), 0).finish(&[1], &[]);
        assert!(matches!(&outcomes[0], WriteOutcome::Invalid(i) if i.code == "invalid_user_id"));
        assert!(
            matches!(&outcomes[1], WriteOutcome::Invalid(i) if i.code == "invalid_idempotency_key")
        );
        assert!(
            matches!(&outcomes[2], WriteOutcome::Invalid(i) if i.code == "invalid_description")
        );
        assert!(matches!(&outcomes[3], WriteOutcome::Applied(_)));
    }

    fn lot(
        id: i64,
        user: &str,
        category: Category,
        priority: i32,
        expires: Option<i64>,
        micros: i64,
    ) -> Lot {
        Lot {
            id,
            user_id: user.to_owned(),
            category,
            priority,
            expires_at_us: expires,
            source: format!("src-{id}"),
            original: Micros(micros),
            remaining: Micros(micros),
            created_at_us: 0,
        }
    }

    fn drawn(outcome: &WriteOutcome) -> Vec<(i64, i64)> {
        match outcome {
            WriteOutcome::Applied(entry) => {
                entry.draws.iter().map(|d| (d.lot_id, d.amount.0)).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deductions_draw_lots_in_spending_order() {
        use Category::*;
        let lots = vec![
            lot(1, "a", Paid, 50, None, 10),
            lot(2, "a", Promotional, 10, Some(500), 10),
            lot(3, "a", Promotional, 10, None, 10),
            lot(4, "a", Paid, 10, Some(500), 10),
            lot(5, "a", Paid, 0, None, 10),
        ];
        let writes = vec![
            deduct("a", 15, "d1"),
            deduct("a", 20, "d2"),
            deduct("a", 12, "d3"),
        ];
        let plan = plan(
            &writes,
            &balances(&[("a", 50)]),
            &lots,
            &HashMap::new(),
            100,
        );
        let spent = plan.spent();
        let outcomes = plan.finish(&[1, 2, 3], &[]);
        assert_eq!(drawn(&outcomes[0]), vec![(5, 10), (2, 5)]);
        assert_eq!(drawn(&outcomes[1]), vec![(2, 5), (4, 10), (3, 5)]);
        assert_eq!(drawn(&outcomes[2]), vec![(3, 5), (1, 7)]);
        assert_eq!(spent.values().sum::<i64>(), 47);
    }

    #[test]
    fn a_lot_expires_at_its_instant_and_not_a_microsecond_before() {
        let lots = vec![lot(7, "a", Category::Promotional, 10, Some(1_000), 30)];
        let deduction = [deduct("a", 30, "d")];
        // 1 µs before: spent, nothing expires.
        let before = plan(
            &deduction,
            &balances(&[("a", 30)]),
            &lots,
            &HashMap::new(),
            999,
        );
        assert_eq!(before.inserts.len(), 1);
        assert!(matches!(
            &before.finish(&[1], &[])[0],
            WriteOutcome::Applied(_)
        ));
        // At the instant: the remainder leaves in one expiration entry and the deduction
        // is short of credits.
        let at = plan(
            &deduction,
            &balances(&[("a", 30)]),
            &lots,
            &HashMap::new(),
            1_000,
        );
        assert_eq!(at.inserts.len(), 1);
        let expiry = &at.inserts[0];
        assert_eq!(expiry.write.kind, EntryKind::Expiration);
        assert_eq!(expiry.write.key(), (KeySource::System, "expire:7"));
        assert_eq!(expiry.write.amount, Micros(-30));
        assert_eq!(expiry.balance_after, Micros(0));
        assert!(matches!(
            at.finish(&[1], &[])[0],
            WriteOutcome::Insufficient {
                balance: Micros(0),
                ..
            }
        ));
    }

    #[test]
    fn a_credit_pays_the_debt_first_and_makes_a_lot_of_the_rest() {
        let grant = WriteRequest::caller("a", EntryKind::Grant, Micros(100), "g", "");
        let plan = plan(&[grant], &balances(&[("a", -30)]), &[], &HashMap::new(), 0);
        assert_eq!(plan.new_lots.len(), 1);
        assert_eq!(plan.new_lots[0].original, Micros(70));
        assert_eq!(plan.new_lots[0].terms.category, Category::Promotional);
        assert_eq!(plan.inserts[0].balance_after, Micros(70));
        // All of it pays the debt: no lot.
        let small = WriteRequest::caller("a", EntryKind::Grant, Micros(20), "g", "");
        let plan2 = super::plan(&[small], &balances(&[("a", -30)]), &[], &HashMap::new(), 0);
        assert!(plan2.new_lots.is_empty());
        assert_eq!(plan2.inserts[0].balance_after, Micros(-10));
    }

    #[test]
    fn a_refund_draws_its_own_payment_lot_first_then_leaves_a_debt() {
        let mut own = lot(2, "a", Category::Paid, 50, None, 25);
        own.source = "pi_1".to_owned();
        let lots = vec![lot(1, "a", Category::Promotional, 10, None, 5), own];
        let refund = WriteRequest {
            payment_id: Some("pi_1".to_owned()),
            key_source: KeySource::Stripe,
            ..WriteRequest::caller("a", EntryKind::Adjustment, Micros(-40), "r", "refund")
        };
        let plan = plan(
            &[refund],
            &balances(&[("a", 30)]),
            &lots,
            &HashMap::new(),
            0,
        );
        let outcomes = plan.finish(&[9], &[]);
        assert_eq!(drawn(&outcomes[0]), vec![(2, 25), (1, 5)]);
        assert!(matches!(&outcomes[0], WriteOutcome::Applied(e) if e.balance_after == Micros(-10)));
    }

    #[test]
    fn a_revocation_takes_what_is_left_of_its_lot_once() {
        let lots = vec![lot(3, "a", Category::Promotional, 10, None, 8)];
        let revoke = WriteRequest::revocation("a", 3, "rv", "withdrawn");
        let plan = plan(
            &[revoke.clone(), revoke],
            &balances(&[("a", 8)]),
            &lots,
            &HashMap::new(),
            0,
        );
        let outcomes = plan.finish(&[4], &[]);
        assert!(
            matches!(&outcomes[0], WriteOutcome::Applied(e) if e.amount == Micros(-8) && e.target_lot_id == Some(3))
        );
        assert!(matches!(&outcomes[1], WriteOutcome::Duplicate(e) if e.id == 4));
        let gone = plan_revoking_spent();
        assert!(matches!(&gone[0], WriteOutcome::Invalid(i) if i.code == NOTHING_TO_REVOKE));
    }

    fn plan_revoking_spent() -> Vec<WriteOutcome> {
        let mut spent = lot(3, "a", Category::Promotional, 10, None, 8);
        spent.remaining = Micros(0);
        plan(
            &[WriteRequest::revocation("a", 3, "rv2", "again")],
            &balances(&[("a", 0)]),
            &[spent],
            &HashMap::new(),
            0,
        )
        .finish(&[], &[])
    }

    #[test]
    fn credits_that_would_overflow_are_refused() {
        let grant = WriteRequest::caller("a", EntryKind::Grant, Micros(MAX_WRITE_MICROS), "g", "");
        let outcomes = plan(
            &[grant],
            &balances(&[("a", i64::MAX - 1)]),
            &[],
            &HashMap::new(),
            0,
        )
        .finish(&[], &[]);
        assert!(matches!(&outcomes[0], WriteOutcome::Invalid(i) if i.code == "balance_overflow"));
    }
}
