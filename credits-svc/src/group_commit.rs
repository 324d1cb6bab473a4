//! Group commit for single `Deduct` calls (see [`reeve_runtime::group_commit`]): each
//! batch of waiting deductions is one ledger transaction, with the per-item rules of a
//! `DeductBatch`, so coalescing changes no outcome.

use std::sync::Arc;

use crate::ledger::{WriteOutcome, WriteRequest};
use crate::store::{LedgerStore, StoreError};

/// Handle to the group-commit workers.
#[derive(Clone)]
pub struct GroupCommit {
    inner: reeve_runtime::group_commit::GroupCommit<WriteRequest, WriteOutcome, StoreError>,
}

impl GroupCommit {
    pub fn start(
        store: Arc<dyn LedgerStore>,
        workers: usize,
        max_batch: usize,
        clock: reeve_runtime::clock::Clock,
    ) -> GroupCommit {
        let run: reeve_runtime::group_commit::BatchFn<WriteRequest, WriteOutcome, StoreError> =
            Arc::new(move |writes| {
                let store = Arc::clone(&store);
                let now_us = clock.now_us();
                Box::pin(async move { store.apply(&writes, now_us).await })
            });
        GroupCommit {
            // A batch the database refuses (anything but "unavailable") is re-run item
            // by item, so the one write it refuses fails alone.
            inner: reeve_runtime::group_commit::GroupCommit::start_isolating(
                workers,
                max_batch,
                run,
                |error: &StoreError| {
                    !matches!(error, StoreError::Unavailable(_) | StoreError::ShuttingDown)
                },
            ),
        }
    }

    /// Applies one write with whatever other writes are waiting.
    pub async fn submit(&self, write: WriteRequest) -> Result<WriteOutcome, StoreError> {
        self.inner
            .submit(write)
            .await
            .map_err(|_| StoreError::ShuttingDown)?
    }
}
