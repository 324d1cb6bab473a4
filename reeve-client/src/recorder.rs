//! The recorder: the gateway hands it a charge (a deduction, or the real cost of a
//! hold) and goes on; the recorder batches deductions into DeductBatch calls and
//! settlements into SettleHoldBatch calls, and sees each one through to a final outcome.
//!
//! Invariants (what this module must never do):
//! - **Never drop an accepted item.** `record` returns once the item is in the bounded
//!   buffer (and, with a write-ahead file, durably on disk). When the buffer is full,
//!   `record` waits and `try_record` says [`RecordError::Full`]; nothing is discarded.
//!   A batch that fails as a whole for a transient reason (UNAVAILABLE,
//!   DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, a cut connection) is sent again, after a
//!   jittered backoff, until the server answers.
//! - **Never double an item.** Every attempt resends the same items with the same
//!   idempotency keys; a replay after a crash does too. The server's ledger applies a
//!   key once and answers `duplicate` afterwards.
//! - **Never retry a refusal blindly.** `insufficient`, `invalid` and (for a settle)
//!   `already_resolved` (the hold was released, expired or settled with another
//!   amount) are final and go to the caller's outcome handler, as do `applied`,
//!   `duplicate` and `settled` (the successes).
//!   A batch the server refuses as a whole for another reason (e.g. a token without
//!   the deduct scope) reaches the handler as [`Outcome::Rejected`] per item; with a
//!   write-ahead file those items stay in it and are replayed at the next start.
//!
//! Shape: callers → bounded buffer (an mpsc channel) → one batcher task, which cuts
//! batches at `batch_items` or `batch_delay` and starts at most `max_in_flight` flush
//! tasks at once (waiting for a free slot is what makes the buffer fill and push back).
//! Each flush is one `tracing` span. Items are [`Charge`]s, an enum with one variant
//! per batch RPC: the batcher keeps one open batch per kind (each with its own
//! `batch_items`/`batch_delay` cut), so a DeductBatch never carries a settle nor the
//! reverse; every kind shares the slots, the resend loop, the write-ahead file (an op
//! per kind) and its done marks.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reeve_proto::credits::v1 as pb;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::connect::RawCreditsClient;
use crate::credits::CreditsClient;
use crate::retry::RetryPolicy;
use crate::wal::{Wal, WalError};

/// One deduction to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deduction {
    pub user_id: String,
    pub amount_micros: i64,
    /// Chosen by the caller (e.g. the LLM call's id): what makes retries and replays safe.
    pub idempotency_key: String,
    pub description: String,
}

impl Deduction {
    pub fn new(
        user_id: impl Into<String>,
        amount_micros: i64,
        idempotency_key: impl Into<String>,
    ) -> Deduction {
        Deduction {
            user_id: user_id.into(),
            amount_micros,
            idempotency_key: idempotency_key.into(),
            description: String::new(),
        }
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Deduction {
        self.description = description.into();
        self
    }

    fn to_proto(&self) -> pb::DeductRequest {
        pb::DeductRequest {
            user_id: self.user_id.clone(),
            amount_micros: self.amount_micros,
            idempotency_key: self.idempotency_key.clone(),
            description: self.description.clone(),
        }
    }
}

/// The real cost of a hold, to settle once (the hold's id is the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub hold_id: String,
    /// The hold's user. Not sent (the hold knows its user): for the outcome handler.
    pub user_id: String,
    /// The real cost, 0 or more (0 releases the hold).
    pub amount_micros: i64,
    pub description: String,
}

impl Settlement {
    pub fn new(
        hold_id: impl Into<String>,
        user_id: impl Into<String>,
        amount_micros: i64,
    ) -> Settlement {
        Settlement {
            hold_id: hold_id.into(),
            user_id: user_id.into(),
            amount_micros,
            description: String::new(),
        }
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Settlement {
        self.description = description.into();
        self
    }

    pub(crate) fn to_proto(&self) -> pb::SettleHoldRequest {
        pb::SettleHoldRequest {
            hold_id: self.hold_id.clone(),
            amount_micros: self.amount_micros,
            description: self.description.clone(),
        }
    }
}

/// What the recorder carries: one variant per batch RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Charge {
    /// Flushed through DeductBatch.
    Deduct(Deduction),
    /// Flushed through SettleHoldBatch.
    SettleHold(Settlement),
}

impl Charge {
    /// The deduction's key, or the settled hold's id.
    pub fn idempotency_key(&self) -> &str {
        match self {
            Charge::Deduct(d) => &d.idempotency_key,
            Charge::SettleHold(s) => &s.hold_id,
        }
    }

    pub fn user_id(&self) -> &str {
        match self {
            Charge::Deduct(d) => &d.user_id,
            Charge::SettleHold(s) => &s.user_id,
        }
    }

    pub fn amount_micros(&self) -> i64 {
        match self {
            Charge::Deduct(d) => d.amount_micros,
            Charge::SettleHold(s) => s.amount_micros,
        }
    }
}

/// The batch kinds: one batch RPC each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Deduct = 0,
    SettleHold = 1,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Deduct, Kind::SettleHold];

    fn of(charge: &Charge) -> Kind {
        match charge {
            Charge::Deduct(_) => Kind::Deduct,
            Charge::SettleHold(_) => Kind::SettleHold,
        }
    }

    fn rpc(self) -> &'static str {
        match self {
            Kind::Deduct => "DeductBatch",
            Kind::SettleHold => "SettleHoldBatch",
        }
    }
}

/// The final answer for one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied now.
    Applied {
        entry_id: i64,
        balance_after_micros: i64,
    },
    /// Applied earlier under the same key (a retry or a replay): the original result.
    Duplicate {
        entry_id: i64,
        balance_after_micros: i64,
    },
    /// Not applied: the balance is smaller than the amount. Final; the caller decides.
    Insufficient {
        balance_micros: i64,
        required_micros: i64,
    },
    /// Not applied: malformed, the key was used for another request, or (a settle) no
    /// such hold (`hold_not_found`). Final.
    Invalid { code: String, message: String },
    /// A hold's cost recorded once, as the deduction `entry_id` (0 for a settle of 0,
    /// which released the hold); `duplicate` when it had been recorded before (a
    /// resend or a replay). `shortfall_micros` is what no lot could cover (now a
    /// debt); `late` when settled after the hold expired.
    Settled {
        entry_id: i64,
        balance_after_micros: i64,
        shortfall_micros: i64,
        late: bool,
        duplicate: bool,
    },
    /// The hold's stored outcome refuses this settle: it was released, or settled
    /// with another amount (`HOLD_ALREADY_RESOLVED`). Nothing written. Final.
    AlreadyResolved {
        status: pb::HoldStatus,
        settled_micros: i64,
        entry_id: i64,
    },
    /// The server refused the whole batch (not a transient failure): e.g. the token
    /// lacks the deduct scope. With a write-ahead file the item is kept there and
    /// replayed at the next start.
    Rejected { code: Code, message: String },
}

impl Outcome {
    /// Applied or duplicate: the money was recorded exactly once.
    pub fn is_success(&self) -> bool {
        matches!(
            self,
            Outcome::Applied { .. } | Outcome::Duplicate { .. } | Outcome::Settled { .. }
        )
    }

    fn label(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Duplicate { .. } => "duplicate",
            Outcome::Insufficient { .. } => "insufficient",
            Outcome::Invalid { .. } => "invalid",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Settled {
                duplicate: false, ..
            } => "settled",
            Outcome::Settled {
                duplicate: true, ..
            } => "duplicate",
            Outcome::AlreadyResolved { .. } => "already_resolved",
        }
    }

    fn from_settle(result: Option<pb::settle_hold_outcome::Result>) -> Option<Outcome> {
        use pb::settle_hold_outcome::Result as R;
        Some(match result? {
            R::Settled(settled) => Outcome::Settled {
                entry_id: settled.entry.as_ref().map_or(0, |e| e.id),
                balance_after_micros: settled.entry.as_ref().map_or(0, |e| e.balance_after_micros),
                shortfall_micros: settled.shortfall_micros,
                late: settled.hold.as_ref().is_some_and(|h| h.late),
                duplicate: settled.duplicate,
            },
            R::AlreadyResolved(hold) => Outcome::AlreadyResolved {
                status: hold.status(),
                settled_micros: hold.settled_micros,
                entry_id: hold.entry_id,
            },
            R::Invalid(i) => Outcome::Invalid {
                code: i.code,
                message: i.message,
            },
        })
    }

    fn from_proto(result: Option<pb::deduct_outcome::Result>) -> Option<Outcome> {
        use pb::deduct_outcome::Result as R;
        Some(match result? {
            R::Applied(a) => Outcome::Applied {
                entry_id: a.entry_id,
                balance_after_micros: a.balance_after_micros,
            },
            R::Duplicate(a) => Outcome::Duplicate {
                entry_id: a.entry_id,
                balance_after_micros: a.balance_after_micros,
            },
            R::Insufficient(i) => Outcome::Insufficient {
                balance_micros: i.balance_micros,
                required_micros: i.required_micros,
            },
            R::Invalid(i) => Outcome::Invalid {
                code: i.code,
                message: i.message,
            },
        })
    }
}

/// An item and its final outcome, as the handler receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemOutcome {
    pub charge: Charge,
    pub outcome: Outcome,
}

/// Why `record` did not accept an item (nothing was recorded).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the recorder's buffer is full")]
    Full,
    #[error("the recorder is closed")]
    Closed,
    #[error(
        "amount_micros must be positive (0 or more for a settle) and the key or hold id non-empty"
    )]
    Invalid,
    #[error(transparent)]
    WriteAhead(#[from] WalError),
}

/// Why the recorder could not start or close cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error(transparent)]
    WriteAhead(#[from] WalError),
}

type Handler = Arc<dyn Fn(ItemOutcome) + Send + Sync>;

/// Counters of one recorder (also exported as metrics).
#[derive(Debug, Default)]
pub struct RecorderStats {
    pub accepted: AtomicU64,
    pub replayed: AtomicU64,
    pub batches: AtomicU64,
    pub retries: AtomicU64,
    pub succeeded: AtomicU64,
    pub refused: AtomicU64,
}

/// Settings of a [`Recorder`]; start one with [`RecorderBuilder::start`].
pub struct RecorderBuilder {
    credits: CreditsClient,
    batch_items: usize,
    batch_delay: Duration,
    max_in_flight: usize,
    buffer_items: usize,
    backoff: RetryPolicy,
    write_ahead: Option<PathBuf>,
    handler: Option<Handler>,
}

impl std::fmt::Debug for RecorderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecorderBuilder")
            .field("batch_items", &self.batch_items)
            .field("batch_delay", &self.batch_delay)
            .field("max_in_flight", &self.max_in_flight)
            .field("buffer_items", &self.buffer_items)
            .field("write_ahead", &self.write_ahead)
            .finish_non_exhaustive()
    }
}

impl RecorderBuilder {
    /// Flush at this many items of one kind (N; at most 10,000, the batch RPCs' limit).
    /// Default 500.
    pub fn batch_items(mut self, items: usize) -> RecorderBuilder {
        self.batch_items = items.clamp(1, 10_000);
        self
    }

    /// Flush at most this long after a batch's first item (T). Default 10 ms.
    pub fn batch_delay(mut self, delay: Duration) -> RecorderBuilder {
        self.batch_delay = delay;
        self
    }

    /// Batches in flight at once (K). Default 4.
    pub fn max_in_flight(mut self, batches: usize) -> RecorderBuilder {
        self.max_in_flight = batches.max(1);
        self
    }

    /// Items the buffer holds before `record` waits. Default 20,000.
    pub fn buffer_items(mut self, items: usize) -> RecorderBuilder {
        self.buffer_items = items.max(1);
        self
    }

    /// Backoff between attempts of a failed batch (its `max_attempts` is ignored: a
    /// transient failure is retried until the server answers).
    pub fn backoff(mut self, policy: RetryPolicy) -> RecorderBuilder {
        self.backoff = policy;
        self
    }

    /// Keep accepted items in this write-ahead file (see [`crate::wal`]) so that they
    /// survive a crash; items left by an earlier run are replayed first.
    pub fn write_ahead_file(mut self, path: impl Into<PathBuf>) -> RecorderBuilder {
        self.write_ahead = Some(path.into());
        self
    }

    /// Hears every final outcome. Called on the flush task: keep it quick (send to a
    /// channel). Without one, refusals are logged as warnings.
    pub fn on_outcome(
        mut self,
        handler: impl Fn(ItemOutcome) + Send + Sync + 'static,
    ) -> RecorderBuilder {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Opens the write-ahead file (replaying what it holds) and starts the batcher.
    pub fn start(self) -> Result<Recorder, RecorderError> {
        let (wal, replay) = match &self.write_ahead {
            Some(path) => {
                let (wal, replay) = Wal::open(path)?;
                (Some(wal), replay)
            }
            None => (None, Vec::new()),
        };
        let stats = Arc::new(RecorderStats::default());
        stats
            .replayed
            .fetch_add(replay.len() as u64, Ordering::Relaxed);
        if !replay.is_empty() {
            tracing::info!(items = replay.len(), "replaying the write-ahead file");
            metrics::counter!("reeve_client_recorder_replayed_items_total")
                .increment(replay.len() as u64);
        }
        let (sender, receiver) = mpsc::channel(self.buffer_items);
        let (finished_tx, finished) = watch::channel(false);
        let closing = CancellationToken::new();
        let handler = self.handler.unwrap_or_else(|| {
            Arc::new(|item: ItemOutcome| {
                if !item.outcome.is_success() {
                    tracing::warn!(
                        key = item.charge.idempotency_key(),
                        user_id = item.charge.user_id(),
                        outcome = ?item.outcome,
                        "recorded item refused"
                    );
                }
            })
        });
        let flusher = Arc::new(Flusher {
            raw: self.credits.raw(),
            backoff: self.backoff,
            wal: wal.clone(),
            handler,
            stats: Arc::clone(&stats),
        });
        let batcher = Batcher {
            receiver,
            replay: replay
                .into_iter()
                .map(|(seq, charge)| Pending {
                    seq: Some(seq),
                    charge,
                })
                .collect(),
            batch_items: self.batch_items,
            batch_delay: self.batch_delay,
            slots: Arc::new(Semaphore::new(self.max_in_flight)),
            flusher,
            closing: closing.clone(),
            wal: wal.clone(),
            buffer_items: self.buffer_items,
        };
        tokio::spawn(async move {
            batcher.run().await;
            let _ = finished_tx.send(true);
        });
        Ok(Recorder {
            shared: Arc::new(Shared {
                sender,
                wal,
                closing,
                finished,
                stats,
                buffer_items: self.buffer_items,
            }),
        })
    }
}

struct Shared {
    sender: mpsc::Sender<Pending>,
    wal: Option<Wal>,
    closing: CancellationToken,
    finished: watch::Receiver<bool>,
    stats: Arc<RecorderStats>,
    buffer_items: usize,
}

/// The buffered recorder; cheap to clone (every clone feeds the same buffer).
#[derive(Clone)]
pub struct Recorder {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("buffer_items", &self.shared.buffer_items)
            .field("write_ahead", &self.shared.wal.is_some())
            .finish_non_exhaustive()
    }
}

struct Pending {
    /// Its seq in the write-ahead file, when there is one.
    seq: Option<u64>,
    charge: Charge,
}

impl Recorder {
    /// A builder flushing through `credits`.
    pub fn builder(credits: CreditsClient) -> RecorderBuilder {
        RecorderBuilder {
            credits,
            batch_items: 500,
            batch_delay: Duration::from_millis(10),
            max_in_flight: 4,
            buffer_items: 20_000,
            backoff: RetryPolicy {
                max_attempts: u32::MAX,
                base_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(2),
            },
            write_ahead: None,
            handler: None,
        }
    }

    /// Records a deduction; returns once it is accepted (waiting while the buffer is
    /// full). From then on it will be applied exactly once or reach the handler.
    pub async fn record(
        &self,
        user_id: impl Into<String>,
        amount_micros: i64,
        idempotency_key: impl Into<String>,
    ) -> Result<(), RecordError> {
        self.record_charge(Charge::Deduct(Deduction::new(
            user_id,
            amount_micros,
            idempotency_key,
        )))
        .await
    }

    /// Settles hold `hold_id` (of `user_id`) at its real cost, batched with other
    /// settles into SettleHoldBatch; returns once accepted (waiting while the buffer
    /// is full). A cost of 0 releases the hold. From then on the cost is recorded
    /// exactly once, or the refusal (the hold already resolved, no such hold) reaches
    /// the handler.
    pub async fn settle(
        &self,
        hold_id: impl Into<String>,
        user_id: impl Into<String>,
        amount_micros: i64,
    ) -> Result<(), RecordError> {
        self.record_charge(Charge::SettleHold(Settlement::new(
            hold_id,
            user_id,
            amount_micros,
        )))
        .await
    }

    /// Like [`Recorder::record`], but a full buffer is an error instead of a wait.
    pub async fn try_record(
        &self,
        user_id: impl Into<String>,
        amount_micros: i64,
        idempotency_key: impl Into<String>,
    ) -> Result<(), RecordError> {
        self.try_record_charge(Charge::Deduct(Deduction::new(
            user_id,
            amount_micros,
            idempotency_key,
        )))
        .await
    }

    /// Records any charge, waiting while the buffer is full.
    pub async fn record_charge(&self, charge: Charge) -> Result<(), RecordError> {
        check(&charge)?;
        if self.shared.closing.is_cancelled() {
            return Err(RecordError::Closed);
        }
        let slot = self
            .shared
            .sender
            .reserve()
            .await
            .map_err(|_| RecordError::Closed)?;
        self.accept(slot, charge).await
    }

    /// Records any charge; [`RecordError::Full`] when the buffer is full.
    pub async fn try_record_charge(&self, charge: Charge) -> Result<(), RecordError> {
        check(&charge)?;
        if self.shared.closing.is_cancelled() {
            return Err(RecordError::Closed);
        }
        let slot = self.shared.sender.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => RecordError::Full,
            mpsc::error::TrySendError::Closed(()) => RecordError::Closed,
        })?;
        self.accept(slot, charge).await
    }

    /// The buffer slot is held first, so an item written ahead always has a place in
    /// the buffer (and one refused for lack of room is never written).
    async fn accept(
        &self,
        slot: mpsc::Permit<'_, Pending>,
        charge: Charge,
    ) -> Result<(), RecordError> {
        let seq = match &self.shared.wal {
            Some(wal) => Some(wal.append(charge.clone()).await?),
            None => None,
        };
        slot.send(Pending { seq, charge });
        self.shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("reeve_client_recorder_buffer_items")
            .set((self.shared.buffer_items - self.shared.sender.capacity()) as f64);
        Ok(())
    }

    /// The counters of this recorder.
    pub fn stats(&self) -> &RecorderStats {
        &self.shared.stats
    }

    /// Stops accepting, flushes everything accepted, waits for every outcome, and
    /// compacts the write-ahead file (to nothing, unless batches were rejected).
    pub async fn close(&self) -> Result<(), RecorderError> {
        self.shared.closing.cancel();
        let mut finished = self.shared.finished.clone();
        let _ = finished.wait_for(|done| *done).await;
        if let Some(wal) = &self.shared.wal {
            wal.close().await?;
        }
        Ok(())
    }
}

fn check(charge: &Charge) -> Result<(), RecordError> {
    match charge {
        Charge::Deduct(d) if d.amount_micros <= 0 || d.idempotency_key.is_empty() => {
            Err(RecordError::Invalid)
        }
        Charge::Deduct(_) => Ok(()),
        Charge::SettleHold(s) if s.amount_micros < 0 || s.hold_id.is_empty() => {
            Err(RecordError::Invalid)
        }
        Charge::SettleHold(_) => Ok(()),
    }
}

struct Batcher {
    receiver: mpsc::Receiver<Pending>,
    replay: Vec<Pending>,
    batch_items: usize,
    batch_delay: Duration,
    slots: Arc<Semaphore>,
    flusher: Arc<Flusher>,
    closing: CancellationToken,
    wal: Option<Wal>,
    buffer_items: usize,
}

/// The open batch of one kind.
#[derive(Default)]
struct Lane {
    items: Vec<Pending>,
    /// When it is due: `batch_delay` after its first item.
    deadline: Option<Instant>,
}

impl Lane {
    fn take(&mut self) -> Vec<Pending> {
        self.deadline = None;
        std::mem::take(&mut self.items)
    }
}

impl Batcher {
    async fn run(mut self) {
        let mut flushes = JoinSet::new();
        let replay = std::mem::take(&mut self.replay);
        let (deductions, settles): (Vec<Pending>, Vec<Pending>) = replay
            .into_iter()
            .partition(|p| Kind::of(&p.charge) == Kind::Deduct);
        for (kind, items) in [(Kind::Deduct, deductions), (Kind::SettleHold, settles)] {
            let mut items = items.into_iter().peekable();
            while items.peek().is_some() {
                let batch: Vec<Pending> = items.by_ref().take(self.batch_items).collect();
                self.dispatch(kind, batch, &mut flushes).await;
            }
        }
        let mut lanes: [Lane; 2] = Default::default();
        let mut received_now: Vec<Pending> = Vec::with_capacity(self.batch_items);
        let mut closed = false;
        loop {
            let due = lanes.iter().filter_map(|lane| lane.deadline).min();
            tokio::select! {
                biased;
                () = self.closing.cancelled(), if !closed => {
                    // No new items; those buffered (and slots already held) still come.
                    self.receiver.close();
                    closed = true;
                }
                received = self.receiver.recv_many(&mut received_now, self.batch_items) => {
                    if received == 0 {
                        break;
                    }
                    metrics::gauge!("reeve_client_recorder_buffer_items")
                        .set((self.buffer_items - self.receiver.capacity().min(self.buffer_items)) as f64);
                    for pending in received_now.drain(..) {
                        let kind = Kind::of(&pending.charge);
                        let lane = &mut lanes[kind as usize];
                        lane.deadline.get_or_insert_with(|| Instant::now() + self.batch_delay);
                        lane.items.push(pending);
                        if lane.items.len() >= self.batch_items {
                            let full = lane.take();
                            self.dispatch(kind, full, &mut flushes).await;
                        }
                    }
                }
                () = sleep_until(due), if due.is_some() => {
                    let now = Instant::now();
                    for kind in Kind::ALL {
                        let lane = &mut lanes[kind as usize];
                        if lane.deadline.is_some_and(|at| at <= now) {
                            let batch = lane.take();
                            self.dispatch(kind, batch, &mut flushes).await;
                        }
                    }
                }
            }
            while let Some(done) = flushes.try_join_next() {
                report_panic(done);
            }
        }
        for kind in Kind::ALL {
            let batch = lanes[kind as usize].take();
            self.dispatch(kind, batch, &mut flushes).await;
        }
        while let Some(done) = flushes.join_next().await {
            report_panic(done);
        }
        drop(self.wal);
    }

    /// Waits for a free flush slot (back-pressure), then flushes `batch` on a task.
    async fn dispatch(&self, kind: Kind, batch: Vec<Pending>, flushes: &mut JoinSet<()>) {
        if batch.is_empty() {
            return;
        }
        let Ok(slot) = Arc::clone(&self.slots).acquire_owned().await else {
            return;
        };
        let flusher = Arc::clone(&self.flusher);
        let in_flight = self.slots.available_permits();
        metrics::gauge!("reeve_client_recorder_in_flight_batches").set(in_flight as f64);
        flushes.spawn(async move {
            flusher.flush(kind, batch).await;
            drop(slot);
        });
    }
}

fn report_panic(result: Result<(), tokio::task::JoinError>) {
    if let Err(error) = result {
        tracing::error!(%error, "a recorder flush task failed");
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Failures after which the same batch is sent again: the server did not give a final
/// answer (a broken connection included, which tonic may call INTERNAL), and the keys
/// make a resend harmless.
fn is_transient(status: &Status) -> bool {
    crate::retry::is_retryable_status(status)
        || matches!(
            status.code(),
            Code::Unknown | Code::Cancelled | Code::Aborted
        )
}

struct Flusher {
    raw: RawCreditsClient,
    backoff: RetryPolicy,
    wal: Option<Wal>,
    handler: Handler,
    stats: Arc<RecorderStats>,
}

impl Flusher {
    async fn flush(&self, kind: Kind, batch: Vec<Pending>) {
        let span = tracing::info_span!(
            "recorder.flush",
            rpc = kind.rpc(),
            items = batch.len(),
            attempts = tracing::field::Empty,
            refused = tracing::field::Empty,
        );
        async {
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            metrics::histogram!("reeve_client_recorder_flush_items", "rpc" => kind.rpc())
                .record(batch.len() as f64);
            let outcomes = match kind {
                Kind::Deduct => self.send_deductions(&batch).await,
                Kind::SettleHold => self.send_settles(&batch).await,
            };
            self.finish(batch, outcomes).await;
        }
        .instrument(span)
        .await;
    }

    /// Sends one batch (through `send`, the same request every time) until the server
    /// answers it with one outcome per item, or refuses it as a whole for a reason a
    /// resend cannot change.
    async fn send_until_answered<T, F, Fut>(
        &self,
        items: usize,
        mut send: F,
    ) -> Result<Vec<T>, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Vec<T>, Status>>,
    {
        let mut attempt = 1u32;
        loop {
            let failure = match send().await {
                Ok(outcomes) => {
                    if outcomes.len() == items {
                        tracing::Span::current().record("attempts", attempt);
                        return Ok(outcomes);
                    }
                    Status::unknown(format!("{} outcomes for {items} items", outcomes.len()))
                }
                Err(status) if is_transient(&status) => status,
                Err(status) => {
                    tracing::Span::current().record("attempts", attempt);
                    return Err(status);
                }
            };
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("reeve_client_recorder_flush_retries_total").increment(1);
            tracing::warn!(attempt, code = ?failure.code(), message = failure.message(), "batch not answered; sending it again with the same keys");
            tokio::time::sleep(self.backoff.backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    async fn send_deductions(&self, batch: &[Pending]) -> Result<Vec<Outcome>, Status> {
        let request = pb::DeductBatchRequest {
            items: batch
                .iter()
                .filter_map(|p| match &p.charge {
                    Charge::Deduct(d) => Some(d.to_proto()),
                    Charge::SettleHold(_) => None,
                })
                .collect(),
        };
        let outcomes = self
            .send_until_answered(batch.len(), || {
                let mut raw = self.raw.clone();
                let request = request.clone();
                async move { Ok(raw.deduct_batch(request).await?.into_inner().outcomes) }
            })
            .await?;
        Ok(outcomes
            .into_iter()
            .map(|o| Outcome::from_proto(o.result).unwrap_or_else(no_result))
            .collect())
    }

    async fn send_settles(&self, batch: &[Pending]) -> Result<Vec<Outcome>, Status> {
        let request = pb::SettleHoldBatchRequest {
            items: batch
                .iter()
                .filter_map(|p| match &p.charge {
                    Charge::SettleHold(s) => Some(s.to_proto()),
                    Charge::Deduct(_) => None,
                })
                .collect(),
        };
        let outcomes = self
            .send_until_answered(batch.len(), || {
                let mut raw = self.raw.clone();
                let request = request.clone();
                async move { Ok(raw.settle_hold_batch(request).await?.into_inner().outcomes) }
            })
            .await?;
        Ok(outcomes
            .into_iter()
            .map(|o| Outcome::from_settle(o.result).unwrap_or_else(no_result))
            .collect())
    }

    /// Marks final outcomes done in the write-ahead file, then tells the handler.
    async fn finish(&self, batch: Vec<Pending>, outcomes: Result<Vec<Outcome>, Status>) {
        let outcomes: Vec<Outcome> = match outcomes {
            Ok(outcomes) => outcomes,
            Err(status) => {
                tracing::error!(code = ?status.code(), message = status.message(), "batch refused as a whole");
                batch
                    .iter()
                    .map(|_| Outcome::Rejected {
                        code: status.code(),
                        message: status.message().to_owned(),
                    })
                    .collect()
            }
        };
        // Final outcomes are marked done before anyone hears of them; rejected items
        // stay in the write-ahead file for the next start.
        if let Some(wal) = &self.wal {
            let done: Vec<u64> = batch
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| !matches!(o, Outcome::Rejected { .. }))
                .filter_map(|(p, _)| p.seq)
                .collect();
            if let Err(error) = wal.done(done).await {
                tracing::error!(%error, "could not mark items done; they will be replayed (as duplicates) at the next start");
            }
        }
        let mut refused = 0;
        for (pending, outcome) in batch.into_iter().zip(outcomes) {
            metrics::counter!("reeve_client_recorder_outcomes_total", "outcome" => outcome.label())
                .increment(1);
            if outcome.is_success() {
                self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
            } else {
                refused += 1;
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
            }
            let item = ItemOutcome {
                charge: pending.charge,
                outcome,
            };
            if std::panic::catch_unwind(AssertUnwindSafe(|| (self.handler)(item))).is_err() {
                tracing::error!("the recorder's outcome handler panicked");
            }
        }
        tracing::Span::current().record("refused", refused);
    }
}

/// An outcome the server left empty: reported, never guessed at.
fn no_result() -> Outcome {
    Outcome::Rejected {
        code: Code::Internal,
        message: "the server answered no result for this item".to_owned(),
    }
}
