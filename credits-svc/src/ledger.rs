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

use crate::holds::{Hold, HoldOp, HoldOutcome, HoldRequest, HoldStatus, settle_key};
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
        /// What active holds reserve of the balance.
        held: Micros,
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
        check_amount_cap(Micros(amount))?;
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
    /// A settle: the entry at `insert`, the hold at this index of `holds`.
    Settle {
        insert: usize,
        hold: usize,
        duplicate: bool,
    },
    /// A hold answer from the hold at this index of `holds`.
    HoldState {
        hold: usize,
        duplicate: bool,
    },
    Done(Box<OpOutcome>),
}

/// One operation of a plan: a ledger write or an operation on a hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write(WriteRequest),
    Hold(HoldOp),
}

/// What happened to one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    Write(WriteOutcome),
    Hold(HoldOutcome),
}

/// A hold the store must insert (`is_new`) or update; `entry` is the insert index of
/// its settle's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldChange {
    pub hold: Hold,
    pub is_new: bool,
    /// Changed by the plan (an answer that only reads a hold saves nothing).
    pub dirty: bool,
    pub entry: Option<usize>,
}

/// What an existing lot's reserved and expired amounts move by (its remainder moves by
/// the draws of the plan's entries, [`Plan::spent`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LotMove {
    pub held: i64,
    pub expired: i64,
}

/// What a list of operations does to the ledger: entries to append, lots to make and
/// move, holds to save, and per operation its outcome.
#[derive(Debug, Clone)]
pub struct Plan {
    pub inserts: Vec<NewEntry>,
    pub new_lots: Vec<NewLot>,
    pub holds: Vec<HoldChange>,
    pub lot_moves: HashMap<i64, LotMove>,
    outcomes: Vec<Planned>,
    created_at_us: i64,
    /// Some outcome was looked up among the entries already holding a key (even when
    /// none was there): with those unread, it may be wrong.
    consulted_existing: bool,
}

impl Plan {
    fn entry(&self, index: usize, ids: &[i64], lot_ids: &[i64]) -> LedgerEntry {
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
    }

    /// The holds to save, with their settle entries' ids.
    pub fn saved_holds(&self, ids: &[i64]) -> Vec<Hold> {
        self.holds
            .iter()
            .map(|change| {
                let mut hold = change.hold.clone();
                if let Some(index) = change.entry {
                    hold.entry_id = Some(ids[index]);
                }
                hold
            })
            .collect()
    }

    /// Builds the outcomes once the store has appended `inserts` and made `new_lots`
    /// (`ids[i]` belongs to `inserts[i]`, `lot_ids[j]` to `new_lots[j]`).
    pub fn finish_ops(self, ids: &[i64], lot_ids: &[i64]) -> Vec<OpOutcome> {
        let holds = self.saved_holds(ids);
        self.outcomes
            .iter()
            .map(|planned| match planned {
                Planned::Insert(index) => {
                    OpOutcome::Write(WriteOutcome::Applied(self.entry(*index, ids, lot_ids)))
                }
                Planned::DuplicateOfInsert(index) => {
                    OpOutcome::Write(WriteOutcome::Duplicate(self.entry(*index, ids, lot_ids)))
                }
                Planned::Settle {
                    insert,
                    hold,
                    duplicate,
                } => OpOutcome::Hold(HoldOutcome::Settled {
                    hold: holds[*hold].clone(),
                    entry: self.entry(*insert, ids, lot_ids),
                    duplicate: *duplicate,
                }),
                Planned::HoldState { hold, duplicate } => OpOutcome::Hold(HoldOutcome::Hold {
                    hold: holds[*hold].clone(),
                    duplicate: *duplicate,
                }),
                Planned::Done(outcome) => (**outcome).clone(),
            })
            .collect()
    }

    /// [`Plan::finish_ops`] for a plan of writes only.
    pub fn finish(self, ids: &[i64], lot_ids: &[i64]) -> Vec<WriteOutcome> {
        self.finish_ops(ids, lot_ids)
            .into_iter()
            .map(|outcome| match outcome {
                OpOutcome::Write(outcome) => outcome,
                OpOutcome::Hold(_) => WriteOutcome::Invalid(InvalidWrite::new(
                    "internal",
                    "a hold outcome in a plan of writes",
                )),
            })
            .collect()
    }

    /// Every operation is a write appended by this plan (or a duplicate of one made
    /// earlier in it): nothing refused, nothing answered from elsewhere.
    pub fn appends_every_write(&self) -> bool {
        self.outcomes
            .iter()
            .all(|planned| matches!(planned, Planned::Insert(_) | Planned::DuplicateOfInsert(_)))
    }

    /// The plan holds without the entries already holding its keys: it appends every
    /// write (a key taken meanwhile fails the append, not the plan), or no outcome was
    /// looked up among them (hold operations on holds still held: their settle keys are
    /// claimed only with the hold's own resolution, under the owner's lock).
    pub fn stands_without_existing(&self) -> bool {
        self.appends_every_write() || !self.consulted_existing
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

/// A lot as the plan tracks it: where it is in the spending order, what is left, how
/// much of that active holds reserve, and how much has expired so far.
#[derive(Debug, Clone)]
struct Tracked {
    lot: LotRef,
    order: (i32, i64, u8, i64),
    expires_at_us: Option<i64>,
    source: String,
    remaining: Micros,
    reserved: Micros,
    expired: Micros,
}

impl Tracked {
    fn unreserved(&self) -> i64 {
        self.remaining.0 - self.reserved.0
    }

    fn is_expired(&self, now_us: i64) -> bool {
        self.expires_at_us.is_some_and(|at| at <= now_us)
    }
}

/// One user's wallet inside a plan: balance = sum of lot remainders − debt; available
/// = balance − what active holds reserve.
#[derive(Debug, Default)]
struct Wallet {
    balance: Micros,
    debt: i64,
    lots: Vec<Tracked>,
    /// Every loaded hold of the user (active, and those the operations name).
    holds: Vec<usize>,
}

impl Wallet {
    fn lot_mut(&mut self, lot: LotRef) -> Option<&mut Tracked> {
        self.lots.iter_mut().find(|t| t.lot == lot)
    }

    fn held(&self) -> i64 {
        self.lots.iter().map(|t| t.reserved.0).sum()
    }

    fn available(&self) -> i64 {
        self.balance.0 - self.held()
    }

    /// Live lots' unreserved parts, in spending order (the lot of `first_source` first).
    fn spendable(&self, first_source: Option<&str>, now_us: i64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.lots.len())
            .filter(|&i| self.lots[i].unreserved() > 0 && !self.lots[i].is_expired(now_us))
            .collect();
        if let Some(source) = first_source
            && let Some(pos) = order.iter().position(|&i| self.lots[i].source == source)
        {
            let own = order.remove(pos);
            order.insert(0, own);
        }
        order
    }

    /// Takes up to `amount` from unreserved live parts; returns the draws and what
    /// could not be drawn.
    fn draw(
        &mut self,
        amount: i64,
        first_source: Option<&str>,
        now_us: i64,
    ) -> (Vec<(LotRef, Micros)>, i64) {
        let mut need = amount;
        let mut draws = Vec::new();
        for i in self.spendable(first_source, now_us) {
            if need == 0 {
                break;
            }
            let tracked = &mut self.lots[i];
            let take = need.min(tracked.unreserved());
            tracked.remaining = Micros(tracked.remaining.0 - take);
            need -= take;
            draws.push((tracked.lot, Micros(take)));
        }
        (draws, need)
    }
}

/// Builds a plan: the state of every locked user first (holds past their instant
/// expire, lots past theirs leave), then each operation in order, then what freed
/// reservations of expired lots leave.
struct Planner<'a> {
    now_us: i64,
    existing: &'a ExistingEntries,
    consulted_existing: bool,
    wallets: HashMap<String, Wallet>,
    /// Every loaded or new hold; wallets index into it.
    all_holds: Vec<Hold>,
    /// Hold id → index into `all_holds`.
    hold_index: HashMap<String, usize>,
    /// Index into `all_holds` → index into `changes` once changed.
    changed: HashMap<usize, usize>,
    changes: Vec<HoldChange>,
    inserts: Vec<NewEntry>,
    new_lots: Vec<NewLot>,
    lot_moves: HashMap<i64, LotMove>,
}

impl<'a> Planner<'a> {
    fn new(
        balances: &HashMap<String, Micros>,
        lots: &[Lot],
        holds: &[Hold],
        existing: &'a ExistingEntries,
        now_us: i64,
    ) -> Planner<'a> {
        let mut wallets: HashMap<String, Wallet> = HashMap::new();
        for (user, balance) in balances {
            wallets.entry(user.clone()).or_default().balance = *balance;
        }
        // Only the lots of locked users (those in `balances`): a user without a balance
        // row was not locked, and lots of theirs made meanwhile must not be expired or
        // drawn here.
        let mut sorted: Vec<&Lot> = lots
            .iter()
            .filter(|l| l.remaining.0 > 0 && balances.contains_key(&l.user_id))
            .collect();
        sorted.sort_by(|a, b| crate::lots::spending_order(a, b));
        for lot in sorted {
            let wallet = wallets.entry(lot.user_id.clone()).or_default();
            wallet.lots.push(Tracked {
                lot: LotRef::Existing(lot.id),
                order: spending_key(lot.priority, lot.expires_at_us, lot.category, lot.id),
                expires_at_us: lot.expires_at_us,
                source: lot.source.clone(),
                remaining: lot.remaining,
                // What the held holds reserve from the lot: its stored `held`, moved
                // in the same transaction as every reservation (so the holds that are
                // not named need not be read).
                reserved: lot.held,
                expired: lot.expired,
            });
        }
        let mut planner = Planner {
            now_us,
            existing,
            consulted_existing: false,
            wallets,
            all_holds: holds.to_vec(),
            hold_index: holds
                .iter()
                .enumerate()
                .map(|(i, hold)| (hold.hold_id.clone(), i))
                .collect(),
            changed: HashMap::new(),
            changes: Vec::new(),
            inserts: Vec::new(),
            new_lots: Vec::new(),
            lot_moves: HashMap::new(),
        };
        for (index, hold) in holds.iter().enumerate() {
            let wallet = planner.wallets.entry(hold.user_id.clone()).or_default();
            wallet.holds.push(index);
        }
        for wallet in planner.wallets.values_mut() {
            let lots_sum: i64 = wallet.lots.iter().map(|t| t.remaining.0).sum();
            wallet.debt = (lots_sum - wallet.balance.0).max(0);
        }
        // A hold past its instant reserves nothing: mark it expired and free its lots.
        // Only a locked user's (one in `balances`, whose lots are loaded): a hold read
        // because a `Hold` of another user named its id is only answered, and freeing
        // it here would leave its lots' `held` behind.
        for index in 0..planner.all_holds.len() {
            let hold = &planner.all_holds[index];
            if hold.status == HoldStatus::Held
                && hold.expires_at_us <= now_us
                && balances.contains_key(&hold.user_id)
            {
                planner.free(index);
                let hold = planner.hold_mut(index);
                hold.status = HoldStatus::Expired;
                hold.resolved_at_us = Some(hold.expires_at_us);
            }
        }
        let mut users: Vec<String> = planner.wallets.keys().cloned().collect();
        users.sort_unstable();
        for user in &users {
            planner.expire_due(user);
        }
        planner
    }

    /// The change slot of the hold at `index` (made on first use, not yet dirty).
    fn change_of(&mut self, index: usize) -> usize {
        match self.changed.get(&index) {
            Some(change) => *change,
            None => {
                self.changes.push(HoldChange {
                    hold: self.all_holds[index].clone(),
                    is_new: false,
                    dirty: false,
                    entry: None,
                });
                self.changed.insert(index, self.changes.len() - 1);
                self.changes.len() - 1
            }
        }
    }

    /// The hold at `index`, recorded as changed.
    fn hold_mut(&mut self, index: usize) -> &mut Hold {
        let change = self.change_of(index);
        self.changes[change].dirty = true;
        &mut self.changes[change].hold
    }

    /// Answers with the hold at `index` as it stands.
    fn state(&mut self, index: usize, duplicate: bool) -> Planned {
        Planned::HoldState {
            hold: self.change_of(index),
            duplicate,
        }
    }

    fn hold(&self, index: usize) -> &Hold {
        match self.changed.get(&index) {
            Some(change) => &self.changes[*change].hold,
            None => &self.all_holds[index],
        }
    }

    fn find_hold(&self, hold_id: &str) -> Option<usize> {
        self.hold_index.get(hold_id).copied()
    }

    /// Gives a held hold's reservations back to its lots.
    fn free(&mut self, index: usize) {
        let hold = self.hold(index).clone();
        if hold.status != HoldStatus::Held {
            return;
        }
        let wallet = self.wallets.entry(hold.user_id.clone()).or_default();
        for (lot, amount) in &hold.reservations {
            if let Some(tracked) = wallet.lot_mut(LotRef::Existing(*lot)) {
                tracked.reserved = Micros(tracked.reserved.0 - amount.0);
                self.lot_moves.entry(*lot).or_default().held -= amount.0;
            }
        }
    }

    /// Lots of `user` past their instant give up what no active hold reserves, in one
    /// `expiration` entry each (`expire:<lot id>` the first time).
    fn expire_due(&mut self, user: &str) {
        let now_us = self.now_us;
        let Some(wallet) = self.wallets.get_mut(user) else {
            return;
        };
        for tracked in wallet.lots.iter_mut() {
            let due = tracked.unreserved();
            if due <= 0 || !tracked.is_expired(now_us) {
                continue;
            }
            let LotRef::Existing(lot_id) = tracked.lot else {
                continue;
            };
            let key = if tracked.expired.0 == 0 {
                format!("expire:{lot_id}")
            } else {
                format!("expire:{lot_id}:{}", tracked.expired.0)
            };
            tracked.remaining = Micros(tracked.remaining.0 - due);
            tracked.expired = Micros(tracked.expired.0 + due);
            self.lot_moves.entry(lot_id).or_default().expired += due;
            wallet.balance = Micros(wallet.balance.0 - due);
            self.inserts.push(NewEntry {
                write: WriteRequest {
                    user_id: user.to_owned(),
                    kind: EntryKind::Expiration,
                    amount: Micros(-due),
                    idempotency_key: key,
                    key_source: KeySource::System,
                    payment_id: None,
                    description: format!("lot {lot_id} expired"),
                    lot_terms: None,
                    target_lot_id: Some(lot_id),
                },
                balance_after: wallet.balance,
                draws: vec![(LotRef::Existing(lot_id), Micros(due))],
            });
        }
    }
}

/// Applies `writes` in order (see [`plan_ops`]).
pub fn plan(
    writes: &[WriteRequest],
    balances: &HashMap<String, Micros>,
    lots: &[Lot],
    existing: &ExistingEntries,
    now_us: i64,
) -> Plan {
    let ops: Vec<Op> = writes.iter().cloned().map(Op::Write).collect();
    plan_ops(&ops, balances, lots, &[], existing, now_us)
}

/// Applies `ops` in order against `balances` (the locked users' current balances; a
/// missing user has zero), `lots` (their lots with a remainder, expired or not, each
/// with what held holds reserve from it), `holds` (every hold the operations name and
/// their held holds past their instant, with reservations; other held holds are seen
/// only through their lots' `held`)
/// and `existing` (ledger entries already holding some of the keys), at `now_us`.
/// Each operation stands alone: one that is invalid or short of credits does not stop
/// the others, and a batch gives every operation the outcome it would have had as a
/// call of its own, in the same order.
pub fn plan_ops(
    ops: &[Op],
    balances: &HashMap<String, Micros>,
    lots: &[Lot],
    holds: &[Hold],
    existing: &ExistingEntries,
    now_us: i64,
) -> Plan {
    let mut planner = Planner::new(balances, lots, holds, existing, now_us);
    // Keys applied earlier in this list: the write that used them and its insert.
    let mut seen: HashMap<(KeySource, &str), (&WriteRequest, usize)> = HashMap::new();
    let mut outcomes = Vec::with_capacity(ops.len());
    let mut touched: Vec<String> = Vec::new();
    for op in ops {
        match op {
            Op::Write(write) => {
                outcomes.push(planner.write(write, &mut seen));
                touched.push(write.user_id.clone());
            }
            Op::Hold(op) => {
                let (planned, user) = planner.hold_op(op);
                outcomes.push(planned);
                touched.extend(user);
            }
        }
    }
    // Reservations freed on lots past their instant leave now, not back to the balance.
    touched.sort_unstable();
    touched.dedup();
    for user in &touched {
        planner.expire_due(user);
    }
    let mut new_lots = planner.new_lots;
    // New lots' remainders after the draws of later entries of this plan.
    for entry in &planner.inserts {
        for (lot, taken) in &entry.draws {
            if let LotRef::New(j) = lot {
                new_lots[*j].remaining = Micros(new_lots[*j].remaining.0 - taken.0);
            }
        }
    }
    Plan {
        inserts: planner.inserts,
        new_lots,
        holds: planner.changes,
        lot_moves: planner.lot_moves,
        outcomes,
        created_at_us: now_us,
        consulted_existing: planner.consulted_existing,
    }
}

impl<'a> Planner<'a> {
    fn write<'w>(
        &mut self,
        write: &'w WriteRequest,
        seen: &mut HashMap<(KeySource, &'w str), (&'w WriteRequest, usize)>,
    ) -> Planned {
        let done = |outcome: WriteOutcome| Planned::Done(Box::new(OpOutcome::Write(outcome)));
        if let Err(invalid) = write.validate() {
            return done(WriteOutcome::Invalid(invalid));
        }
        let key = write.key();
        self.consulted_existing = true;
        if let Some(entry) = self.existing.get(&(key.0, key.1.to_owned())) {
            return done(if write.same_request_as(entry) {
                WriteOutcome::Duplicate(entry.clone())
            } else {
                WriteOutcome::Invalid(key_reused(key.1))
            });
        }
        // Only an applied write claims its key: one refused (short of credits, or an
        // overflow) recorded nothing, so a later write with that key is judged afresh,
        // exactly as a retried call would be.
        if let Some((earlier, index)) = seen.get(&key) {
            return if write.same_request(earlier) {
                Planned::DuplicateOfInsert(*index)
            } else {
                done(WriteOutcome::Invalid(key_reused(key.1)))
            };
        }
        let now_us = self.now_us;
        let new_lot_index = self.new_lots.len();
        let wallet = self.wallets.entry(write.user_id.clone()).or_default();
        let balance = wallet.balance;
        // A balance past what it can hold is refused before anything in the wallet
        // moves (a revocation takes at most a lot's remainder, so it never overflows).
        if !matches!(write.kind, EntryKind::Revocation | EntryKind::Expiration)
            && balance.checked_add(write.amount).is_none()
        {
            return done(WriteOutcome::Invalid(balance_overflow()));
        }
        let mut amount = write.amount;
        let mut draws = Vec::new();
        let mut made = None;
        match write.kind {
            EntryKind::Deduction => {
                let required = write.amount.0.saturating_neg();
                if wallet.available() < required {
                    return done(WriteOutcome::Insufficient {
                        balance,
                        held: Micros(wallet.held()),
                        required: Micros(required),
                    });
                }
                draws = wallet.draw(required, None, now_us).0;
            }
            EntryKind::Revocation | EntryKind::Expiration => {
                let target = write.target_lot_id.map(LotRef::Existing);
                let left = wallet
                    .lots
                    .iter()
                    .find(|t| Some(t.lot) == target && !t.is_expired(now_us))
                    .map_or(0, Tracked::unreserved);
                let (Some(target), true) = (target, left > 0) else {
                    return done(WriteOutcome::Invalid(InvalidWrite::new(
                        NOTHING_TO_REVOKE,
                        format!(
                            "lot {} has nothing left to revoke",
                            write.target_lot_id.unwrap_or_default()
                        ),
                    )));
                };
                if let Some(tracked) = wallet.lot_mut(target) {
                    tracked.remaining = Micros(tracked.remaining.0 - left);
                }
                amount = Micros(-left);
                draws = vec![(target, Micros(left))];
            }
            _ if write.amount.0 < 0 => {
                // A debit (refund, dispute, admin): its own payment's lot first, then
                // the spending order, and a debt past the lots.
                let (taken, short) = wallet.draw(
                    write.amount.0.saturating_neg(),
                    write.payment_id.as_deref(),
                    now_us,
                );
                draws = taken;
                wallet.debt += short;
            }
            _ => {
                let terms = write.terms();
                if terms.expires_at_us.is_some_and(|at| at <= now_us) {
                    return done(WriteOutcome::Invalid(InvalidWrite::new(
                        "invalid_expires_at",
                        "expires_at must be in the future",
                    )));
                }
                // A debt is paid first; only the rest becomes a lot.
                let paid = write.amount.0.min(wallet.debt);
                wallet.debt -= paid;
                let lot_amount = write.amount.0 - paid;
                if lot_amount > 0 {
                    let source = write
                        .payment_id
                        .clone()
                        .unwrap_or_else(|| write.idempotency_key.clone());
                    let tracked = Tracked {
                        lot: LotRef::New(new_lot_index),
                        order: spending_key(
                            terms.priority,
                            terms.expires_at_us,
                            terms.category,
                            i64::MAX / 2 + new_lot_index as i64,
                        ),
                        expires_at_us: terms.expires_at_us,
                        source: source.clone(),
                        remaining: Micros(lot_amount),
                        reserved: Micros::ZERO,
                        expired: Micros::ZERO,
                    };
                    let at = wallet.lots.partition_point(|t| t.order <= tracked.order);
                    wallet.lots.insert(at, tracked);
                    made = Some(NewLot {
                        entry: self.inserts.len(),
                        user_id: write.user_id.clone(),
                        terms,
                        source,
                        original: Micros(lot_amount),
                        remaining: Micros(lot_amount),
                    });
                }
            }
        }
        let Some(balance_after) = balance.checked_add(amount) else {
            return done(WriteOutcome::Invalid(balance_overflow()));
        };
        wallet.balance = balance_after;
        if let Some(lot) = made {
            self.new_lots.push(lot);
        }
        seen.insert(key, (write, self.inserts.len()));
        self.inserts.push(NewEntry {
            write: WriteRequest {
                amount,
                ..write.clone()
            },
            balance_after,
            draws,
        });
        Planned::Insert(self.inserts.len() - 1)
    }

    /// One hold operation; also the user whose wallet it touched.
    fn hold_op(&mut self, op: &HoldOp) -> (Planned, Option<String>) {
        let done = |outcome: HoldOutcome| Planned::Done(Box::new(OpOutcome::Hold(outcome)));
        if let Err(invalid) = op.validate() {
            return (done(HoldOutcome::Invalid(invalid)), None);
        }
        let now_us = self.now_us;
        let found = self.find_hold(op.hold_id());
        let Some(index) = found else {
            let HoldOp::Hold(request) = op else {
                return (done(HoldOutcome::NotFound), None);
            };
            return (self.reserve(request), Some(request.user_id.clone()));
        };
        let hold = self.hold(index).clone();
        let user = Some(hold.user_id.clone());
        let planned = match op {
            HoldOp::Hold(request) => {
                if !hold.same_request(request) {
                    done(HoldOutcome::Invalid(InvalidWrite::new(
                        IDEMPOTENCY_KEY_REUSED,
                        format!("hold {:?} was made for a different request", hold.hold_id),
                    )))
                } else {
                    self.state(index, true)
                }
            }
            HoldOp::Release { .. } => match hold.status {
                HoldStatus::Settled => done(HoldOutcome::AlreadyResolved(hold)),
                HoldStatus::Released | HoldStatus::Expired => self.state(index, true),
                HoldStatus::Held => {
                    self.free(index);
                    let saved = self.hold_mut(index);
                    saved.status = HoldStatus::Released;
                    saved.resolved_at_us = Some(now_us);
                    self.state(index, false)
                }
            },
            HoldOp::Extend { ttl_secs, .. } => {
                if hold.is_active(now_us) {
                    let saved = self.hold_mut(index);
                    saved.expires_at_us = now_us.saturating_add(ttl_secs.saturating_mul(1_000_000));
                    self.state(index, false)
                } else {
                    done(HoldOutcome::AlreadyResolved(hold))
                }
            }
            HoldOp::Settle {
                amount,
                description,
                ..
            } => self.settle(index, *amount, description),
        };
        (planned, user)
    }

    fn reserve(&mut self, request: &HoldRequest) -> Planned {
        let now_us = self.now_us;
        let wallet = self.wallets.entry(request.user_id.clone()).or_default();
        if wallet.available() < request.amount.0 {
            return Planned::Done(Box::new(OpOutcome::Hold(HoldOutcome::Insufficient {
                balance: wallet.balance,
                held: Micros(wallet.held()),
                required: request.amount,
            })));
        }
        let mut need = request.amount.0;
        let mut reservations = Vec::new();
        for i in wallet.spendable(None, now_us) {
            if need == 0 {
                break;
            }
            // Only lots that exist can be reserved (holds never share a plan with credits).
            let LotRef::Existing(lot_id) = wallet.lots[i].lot else {
                continue;
            };
            let take = need.min(wallet.lots[i].unreserved());
            wallet.lots[i].reserved = Micros(wallet.lots[i].reserved.0 + take);
            self.lot_moves.entry(lot_id).or_default().held += take;
            reservations.push((lot_id, Micros(take)));
            need -= take;
        }
        if need > 0 {
            // Available but not in existing lots: refuse rather than reserve less.
            for (lot_id, take) in &reservations {
                if let Some(t) = wallet.lot_mut(LotRef::Existing(*lot_id)) {
                    t.reserved = Micros(t.reserved.0 - take.0);
                }
                self.lot_moves.entry(*lot_id).or_default().held -= take.0;
            }
            return Planned::Done(Box::new(OpOutcome::Hold(HoldOutcome::Insufficient {
                balance: wallet.balance,
                held: Micros(wallet.held()),
                required: request.amount,
            })));
        }
        let hold = Hold {
            hold_id: request.hold_id.clone(),
            user_id: request.user_id.clone(),
            amount: request.amount,
            status: HoldStatus::Held,
            settled: None,
            entry_id: None,
            shortfall: Micros::ZERO,
            late: false,
            description: request.description.clone(),
            created_at_us: now_us,
            expires_at_us: now_us.saturating_add(request.ttl_secs.saturating_mul(1_000_000)),
            resolved_at_us: None,
            reservations,
        };
        let index = self.all_holds.len();
        self.hold_index.insert(hold.hold_id.clone(), index);
        self.all_holds.push(hold.clone());
        wallet.holds.push(index);
        self.changes.push(HoldChange {
            hold,
            is_new: true,
            dirty: true,
            entry: None,
        });
        self.changed.insert(index, self.changes.len() - 1);
        Planned::HoldState {
            hold: self.changes.len() - 1,
            duplicate: false,
        }
    }

    fn settle(&mut self, index: usize, amount: Micros, description: &str) -> Planned {
        let now_us = self.now_us;
        let hold = self.hold(index).clone();
        let done = |outcome: HoldOutcome| Planned::Done(Box::new(OpOutcome::Hold(outcome)));
        match hold.status {
            // Settled earlier in this same plan: the same amount is that settle again.
            HoldStatus::Settled
                if let Some(change) = self.changed.get(&index).copied()
                    && let Some(insert) = self.changes[change].entry =>
            {
                return if hold.settled == Some(amount) {
                    Planned::Settle {
                        insert,
                        hold: change,
                        duplicate: true,
                    }
                } else {
                    done(HoldOutcome::AlreadyResolved(hold))
                };
            }
            HoldStatus::Settled => {
                self.consulted_existing = true;
                let entry = self
                    .existing
                    .get(&(KeySource::System, settle_key(&hold.hold_id)))
                    .cloned();
                return match entry {
                    Some(entry) if hold.settled == Some(amount) => done(HoldOutcome::Settled {
                        hold,
                        entry,
                        duplicate: true,
                    }),
                    _ => done(HoldOutcome::AlreadyResolved(hold)),
                };
            }
            HoldStatus::Released => {
                return if amount.0 == 0 {
                    self.state(index, true)
                } else {
                    done(HoldOutcome::AlreadyResolved(hold))
                };
            }
            HoldStatus::Held | HoldStatus::Expired => {}
        }
        let active = hold.is_active(now_us);
        if amount.0 == 0 {
            // Settling 0 is a release; a late one records nothing and keeps EXPIRED.
            if active {
                self.free(index);
                let saved = self.hold_mut(index);
                saved.status = HoldStatus::Released;
                saved.settled = Some(Micros::ZERO);
                saved.resolved_at_us = Some(now_us);
            }
            return self.state(index, false);
        }
        let wallet = self.wallets.entry(hold.user_id.clone()).or_default();
        let balance = wallet.balance;
        // A debt past what a balance can hold (thousands of settles far above their
        // holds) is refused before anything moves, as a credit past it is.
        let Some(balance_after) = balance.0.checked_sub(amount.0).map(Micros) else {
            return done(HoldOutcome::Invalid(balance_overflow()));
        };
        // The hold's reservations first, even from a lot that expired since: the hold
        // was promised while it was live. What is not drawn of them is freed.
        let mut need = amount.0;
        let mut draws: Vec<(LotRef, Micros)> = Vec::new();
        if active {
            for (lot_id, reserved) in &hold.reservations {
                let Some(tracked) = wallet.lot_mut(LotRef::Existing(*lot_id)) else {
                    continue;
                };
                let take = need.min(reserved.0);
                tracked.reserved = Micros(tracked.reserved.0 - reserved.0);
                tracked.remaining = Micros(tracked.remaining.0 - take);
                self.lot_moves.entry(*lot_id).or_default().held -= reserved.0;
                need -= take;
                if take > 0 {
                    draws.push((LotRef::Existing(*lot_id), Micros(take)));
                }
            }
        }
        // More than held: the excess from available lots; past them, a debt.
        let (more, short) = wallet.draw(need, None, now_us);
        for (lot, take) in more {
            match draws.iter_mut().find(|(l, _)| *l == lot) {
                Some((_, drawn)) => *drawn = Micros(drawn.0 + take.0),
                None => draws.push((lot, take)),
            }
        }
        wallet.debt += short;
        wallet.balance = balance_after;
        let insert = self.inserts.len();
        self.inserts.push(NewEntry {
            write: WriteRequest {
                user_id: hold.user_id.clone(),
                kind: EntryKind::Deduction,
                amount: Micros(-amount.0),
                idempotency_key: settle_key(&hold.hold_id),
                key_source: KeySource::System,
                payment_id: None,
                description: if description.trim().is_empty() {
                    hold.description.clone()
                } else {
                    description.to_owned()
                },
                lot_terms: None,
                target_lot_id: None,
            },
            balance_after,
            draws,
        });
        let saved = self.hold_mut(index);
        saved.status = HoldStatus::Settled;
        saved.settled = Some(amount);
        saved.shortfall = Micros(short);
        saved.late = !active;
        saved.resolved_at_us = Some(now_us);
        let change = self.changed[&index];
        self.changes[change].entry = Some(insert);
        Planned::Settle {
            insert,
            hold: change,
            duplicate: false,
        }
    }
}

/// The code of a revocation of a lot with nothing left.
pub const NOTHING_TO_REVOKE: &str = "nothing_to_revoke";

/// Refuses an amount larger in size than one write may move (`amount_overflow`), the
/// same answer for writes, holds, settles and payment events.
pub fn check_amount_cap(amount: Micros) -> Result<(), InvalidWrite> {
    if amount.0.unsigned_abs() > MAX_WRITE_MICROS.unsigned_abs() {
        return Err(InvalidWrite::new(
            "amount_overflow",
            format!("amount_micros must be at most {MAX_WRITE_MICROS} in size"),
        ));
    }
    Ok(())
}

fn balance_overflow() -> InvalidWrite {
    InvalidWrite::new("balance_overflow", "the balance would overflow")
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
                held: Micros(0),
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
            held: Micros::ZERO,
            expired: Micros::ZERO,
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
    fn money_past_what_a_balance_holds_is_refused_and_moves_nothing() {
        let none = HashMap::new();
        let top = i64::MAX - 1;
        // A credit past the top: refused, and the lot it would have made is not there
        // for the deduction after it, which draws the existing lot.
        let grant = WriteRequest::caller("a", EntryKind::Grant, Micros(MAX_WRITE_MICROS), "g", "");
        let outcomes = plan(
            &[grant, deduct("a", MAX_WRITE_MICROS, "d")],
            &balances(&[("a", top)]),
            &[lot(1, "a", Category::Paid, 50, None, top)],
            &none,
            0,
        )
        .finish(&[7], &[]);
        assert!(matches!(&outcomes[0], WriteOutcome::Invalid(i) if i.code == "balance_overflow"));
        assert_eq!(drawn(&outcomes[1]), [(1, MAX_WRITE_MICROS)]);
        // A debit past the bottom (a debt that deep), the same.
        let bottom = i64::MIN + 1;
        let debit = WriteRequest::caller(
            "b",
            EntryKind::Adjustment,
            Micros(-MAX_WRITE_MICROS),
            "a",
            "chargeback",
        );
        let outcomes = plan(&[debit], &balances(&[("b", bottom)]), &[], &none, 0).finish(&[], &[]);
        assert!(matches!(&outcomes[0], WriteOutcome::Invalid(i) if i.code == "balance_overflow"));
        // A settle far above its hold, past the bottom: refused, the hold still held.
        let hold = Hold {
            hold_id: "h".to_owned(),
            user_id: "c".to_owned(),
            amount: Micros(1),
            status: HoldStatus::Held,
            settled: None,
            entry_id: None,
            shortfall: Micros::ZERO,
            late: false,
            description: String::new(),
            created_at_us: 0,
            expires_at_us: 60_000_000,
            resolved_at_us: None,
            reservations: Vec::new(),
        };
        let settle = Op::Hold(HoldOp::Settle {
            hold_id: "h".to_owned(),
            amount: Micros(MAX_WRITE_MICROS),
            description: String::new(),
        });
        let planned = plan_ops(
            &[settle],
            &balances(&[("c", bottom)]),
            &[],
            &[hold],
            &none,
            1,
        );
        assert!(planned.inserts.is_empty() && planned.saved_holds(&[]).is_empty());
        let outcomes = planned.finish_ops(&[], &[]);
        assert!(
            matches!(&outcomes[0], OpOutcome::Hold(HoldOutcome::Invalid(i)) if i.code == "balance_overflow")
        );
    }

    #[test]
    fn lots_of_a_user_not_locked_are_neither_expired_nor_drawn() {
        // Read after the lock statement found no balance row for "x" (their first
        // credit committed in between): planned as a user without anything.
        let due = lot(1, "x", Category::Promotional, 10, Some(5), 4_000);
        let planned = plan(
            &[deduct("x", 1_000, "d")],
            &HashMap::new(),
            &[due],
            &HashMap::new(),
            10,
        );
        assert!(planned.inserts.is_empty() && planned.lot_moves.is_empty());
        let outcomes = planned.finish(&[], &[]);
        assert!(matches!(&outcomes[0], WriteOutcome::Insufficient { .. }));
    }

    #[test]
    fn only_plans_that_consulted_taken_keys_need_them_read() {
        let lots = [lot(1, "a", Category::Paid, 50, None, 10_000)];
        let wallet = balances(&[("a", 10_000)]);
        let none = HashMap::new();
        let settle = |amount: i64| {
            Op::Hold(HoldOp::Settle {
                hold_id: "h".to_owned(),
                amount: Micros(amount),
                description: String::new(),
            })
        };
        let hold = Op::Hold(HoldOp::Hold(HoldRequest {
            hold_id: "h".to_owned(),
            user_id: "a".to_owned(),
            amount: Micros(5_000),
            ttl_secs: 60,
            description: String::new(),
        }));
        let made = plan_ops(std::slice::from_ref(&hold), &wallet, &lots, &[], &none, 0);
        assert!(made.stands_without_existing());
        let mut held = made.saved_holds(&[]).pop().expect("the hold");
        assert_eq!(held.status, HoldStatus::Held);
        let mut lots = lots;
        lots[0].held = Micros(5_000);
        // Settling a held hold claims its key with the hold's resolution: nothing to read.
        let settled = plan_ops(
            &[settle(1_000)],
            &wallet,
            &lots,
            std::slice::from_ref(&held),
            &none,
            1,
        );
        assert!(settled.stands_without_existing());
        // Settled before: the answer is the entry under its key, which must be read.
        held.status = HoldStatus::Settled;
        held.settled = Some(Micros(1_000));
        let again = plan_ops(&[settle(1_000)], &wallet, &lots, &[held], &none, 2);
        assert!(!again.stands_without_existing());
        // A refused write may be a duplicate; an applied one conflicts on append instead.
        let refused = plan(&[deduct("a", 20_000, "k")], &wallet, &lots, &none, 0);
        assert!(!refused.stands_without_existing());
        let applied = plan(&[deduct("a", 2_000, "k")], &wallet, &lots, &none, 0);
        assert!(applied.stands_without_existing());
    }
}
