//! Group commit for single `Deduct` calls: concurrent calls are coalesced into one
//! store transaction, so throughput grows with concurrency instead of being capped by
//! one commit per call.
//!
//! A worker takes the first waiting call, then whatever else is already queued (up to
//! `max_batch`), and applies them as one batch; calls arriving meanwhile wait for the
//! next worker. No call waits for a timer: a lone call is applied at once. The batch
//! rules are the per-item rules, so coalescing changes no outcome.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::ledger::{WriteOutcome, WriteRequest};
use crate::store::{LedgerStore, StoreError};

struct Job {
    write: WriteRequest,
    reply: oneshot::Sender<Result<WriteOutcome, StoreError>>,
}

/// Handle to the group-commit workers; dropping every handle stops them once the
/// queue is drained.
#[derive(Clone)]
pub struct GroupCommit {
    sender: mpsc::Sender<Job>,
}

impl GroupCommit {
    pub fn start(store: Arc<dyn LedgerStore>, workers: usize, max_batch: usize, clock: fn() -> i64) -> GroupCommit {
        let max_batch = max_batch.max(1);
        let (sender, receiver) = mpsc::channel(max_batch * workers.max(1) * 2);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..workers.max(1) {
            tokio::spawn(run_worker(store.clone(), receiver.clone(), max_batch, clock));
        }
        GroupCommit { sender }
    }

    /// Applies one write with whatever other writes are waiting.
    pub async fn submit(&self, write: WriteRequest) -> Result<WriteOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Job { write, reply }).await.map_err(|_| StoreError::ShuttingDown)?;
        answer.await.map_err(|_| StoreError::ShuttingDown)?
    }
}

async fn run_worker(
    store: Arc<dyn LedgerStore>,
    receiver: Arc<Mutex<mpsc::Receiver<Job>>>,
    max_batch: usize,
    clock: fn() -> i64,
) {
    loop {
        let jobs = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else { return };
            let mut jobs = vec![first];
            while jobs.len() < max_batch {
                match receiver.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            jobs
        };
        let (writes, replies): (Vec<WriteRequest>, Vec<_>) = jobs.into_iter().map(|j| (j.write, j.reply)).unzip();
        match store.apply(&writes, clock()).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // A caller that went away still had its write applied; a retry
                    // with the same key gets this outcome back as a duplicate.
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                tracing::error!(%error, batch = writes.len(), "group commit failed");
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
