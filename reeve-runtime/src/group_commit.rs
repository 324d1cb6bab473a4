//! Group commit: concurrent single calls are coalesced into one batch (one store
//! transaction), so throughput grows with concurrency instead of being capped by one
//! commit per call.
//!
//! A worker takes the first waiting call, then whatever else is already queued (up to
//! `max_batch`), and runs them as one batch; calls arriving meanwhile wait for the next
//! worker. No call waits for a timer: a lone call runs at once. The batch function must
//! give each item the outcome it would have had alone, in order, so coalescing changes
//! no outcome.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

/// Runs a batch: one output per item, in order, or one error for all of them.
pub type BatchFn<T, R, E> =
    Arc<dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = Result<Vec<R>, E>> + Send>> + Send + Sync>;

/// The workers are gone (the process is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the group commit has stopped")]
pub struct Stopped;

struct Job<T, R, E> {
    item: T,
    reply: oneshot::Sender<Result<R, E>>,
}

/// Handle to the workers; dropping every handle stops them once the queue is drained.
pub struct GroupCommit<T, R, E> {
    sender: mpsc::Sender<Job<T, R, E>>,
}

impl<T, R, E> Clone for GroupCommit<T, R, E> {
    fn clone(&self) -> Self {
        GroupCommit {
            sender: self.sender.clone(),
        }
    }
}

impl<T, R, E> GroupCommit<T, R, E>
where
    T: Send + 'static,
    R: Send + 'static,
    E: Clone + std::fmt::Display + Send + 'static,
{
    pub fn start(workers: usize, max_batch: usize, run: BatchFn<T, R, E>) -> GroupCommit<T, R, E> {
        let max_batch = max_batch.max(1);
        let (sender, receiver) = mpsc::channel(max_batch * workers.max(1) * 2);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..workers.max(1) {
            tokio::spawn(run_worker(
                Arc::clone(&receiver),
                max_batch,
                Arc::clone(&run),
            ));
        }
        GroupCommit { sender }
    }

    /// Runs one item with whatever other items are waiting.
    pub async fn submit(&self, item: T) -> Result<Result<R, E>, Stopped> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Job { item, reply })
            .await
            .map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }
}

async fn run_worker<T, R, E>(
    receiver: Arc<Mutex<mpsc::Receiver<Job<T, R, E>>>>,
    max_batch: usize,
    run: BatchFn<T, R, E>,
) where
    T: Send + 'static,
    R: Send + 'static,
    E: Clone + std::fmt::Display + Send + 'static,
{
    loop {
        let jobs = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut jobs = vec![first];
            while jobs.len() < max_batch {
                match receiver.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            jobs
        };
        let (items, replies): (Vec<T>, Vec<_>) =
            jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
        let size = items.len();
        // A task of its own: a panicking batch drops its replies (callers see `Stopped`)
        // and the worker lives on.
        let outcome = match tokio::spawn(run(items)).await {
            Ok(outcome) => outcome,
            Err(panic) => {
                tracing::error!(error = %panic, batch = size, "group commit batch panicked");
                continue;
            }
        };
        match outcome {
            Ok(outputs) => {
                if outputs.len() != size {
                    tracing::error!(
                        batch = size,
                        outputs = outputs.len(),
                        "group commit batch answered the wrong number of items"
                    );
                }
                for (reply, output) in replies.into_iter().zip(outputs) {
                    // A caller that went away still had its item applied; a retry with
                    // the same idempotency key gets this outcome back as a duplicate.
                    let _ = reply.send(Ok(output));
                }
            }
            Err(error) => {
                tracing::error!(%error, batch = size, "group commit failed");
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
