//! Group commit for single `Deduct` calls and single hold operations (see
//! [`reeve_runtime::group_commit`]): each batch of waiting calls is one ledger
//! transaction, with the per-item rules of a batch, so coalescing changes no outcome.

use std::sync::Arc;

use reeve_runtime::clock::Clock;
use reeve_runtime::group_commit::BatchFn;

use crate::holds::{HoldOp, HoldOutcome};
use crate::ledger::{WriteOutcome, WriteRequest};
use crate::store::{LedgerStore, StoreError};

/// A batch the database refuses (anything but "unavailable") is re-run item by item,
/// so the one item it refuses fails alone.
fn isolate(error: &StoreError) -> bool {
    !matches!(error, StoreError::Unavailable(_) | StoreError::ShuttingDown)
}

/// Handle to the group-commit workers of one kind of call.
pub struct Committer<T, R> {
    inner: reeve_runtime::group_commit::GroupCommit<T, R, StoreError>,
}

impl<T, R> Clone for Committer<T, R> {
    fn clone(&self) -> Self {
        Committer {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Clone + Send + 'static, R: Send + 'static> Committer<T, R> {
    fn start(workers: usize, max_batch: usize, run: BatchFn<T, R, StoreError>) -> Self {
        Committer {
            inner: reeve_runtime::group_commit::GroupCommit::start_isolating(
                workers, max_batch, run, isolate,
            ),
        }
    }

    /// Runs one item with whatever other items are waiting.
    pub async fn submit(&self, item: T) -> Result<R, StoreError> {
        self.inner
            .submit(item)
            .await
            .map_err(|_| StoreError::ShuttingDown)?
    }
}

/// Single deductions.
pub type GroupCommit = Committer<WriteRequest, WriteOutcome>;
/// Single Hold, SettleHold, ReleaseHold and ExtendHold calls.
pub type HoldCommit = Committer<HoldOp, HoldOutcome>;

impl GroupCommit {
    pub fn start_deductions(
        store: Arc<dyn LedgerStore>,
        workers: usize,
        max_batch: usize,
        clock: Clock,
    ) -> GroupCommit {
        Committer::start(
            workers,
            max_batch,
            Arc::new(move |writes| {
                let store = Arc::clone(&store);
                let now_us = clock.now_us();
                Box::pin(async move { store.apply(&writes, now_us).await })
            }),
        )
    }
}

impl HoldCommit {
    pub fn start_holds(
        store: Arc<dyn LedgerStore>,
        workers: usize,
        max_batch: usize,
        clock: Clock,
    ) -> HoldCommit {
        Committer::start(
            workers,
            max_batch,
            Arc::new(move |ops| {
                let store = Arc::clone(&store);
                let now_us = clock.now_us();
                Box::pin(async move { store.apply_holds(&ops, now_us).await })
            }),
        )
    }
}
