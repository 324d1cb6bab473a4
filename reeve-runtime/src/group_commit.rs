//! Group commit: concurrent single calls are coalesced into one batch (one store
//! transaction), so throughput grows with concurrency instead of being capped by one
//! commit per call.
//!
//! A worker takes the first waiting call, then whatever else is already queued (up to
//! `max_batch`), and runs them as one batch; calls arriving meanwhile wait for the next
//! worker. No call waits for a timer: a lone call runs at once. The batch function must
//! give each item the outcome it would have had alone, in order, so coalescing changes
//! no outcome.
//!
//! One bad item must not fail the honest ones coalesced with it: with
//! [`GroupCommit::start_isolating`], a batch that fails as a whole for a reason the
//! caller's `isolate` accepts (the database refused something in it, not "the
//! database is down") is run again item by item, so the item the database refuses
//! fails alone and every other item gets the outcome it would have had alone.

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

/// How a failed batch is split: `isolate` says whether an error may come from one item
/// (then each item runs alone, from a copy made with `copy`).
struct Isolation<T, E> {
    copy: fn(&T) -> T,
    isolate: fn(&E) -> bool,
}

impl<T, E> Clone for Isolation<T, E> {
    fn clone(&self) -> Self {
        Isolation {
            copy: self.copy,
            isolate: self.isolate,
        }
    }
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
        Self::spawn(workers, max_batch, run, None)
    }

    /// Like [`GroupCommit::start`], and a batch that fails with an error for which
    /// `isolate` is true is run again one item at a time.
    pub fn start_isolating(
        workers: usize,
        max_batch: usize,
        run: BatchFn<T, R, E>,
        isolate: fn(&E) -> bool,
    ) -> GroupCommit<T, R, E>
    where
        T: Clone,
    {
        let isolation = Isolation {
            copy: T::clone,
            isolate,
        };
        Self::spawn(workers, max_batch, run, Some(isolation))
    }

    fn spawn(
        workers: usize,
        max_batch: usize,
        run: BatchFn<T, R, E>,
        isolation: Option<Isolation<T, E>>,
    ) -> GroupCommit<T, R, E> {
        let max_batch = max_batch.max(1);
        let (sender, receiver) = mpsc::channel(max_batch * workers.max(1) * 2);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..workers.max(1) {
            tokio::spawn(run_worker(
                Arc::clone(&receiver),
                max_batch,
                Arc::clone(&run),
                isolation.clone(),
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
    isolation: Option<Isolation<T, E>>,
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
        let copies: Option<Vec<T>> = match &isolation {
            Some(isolation) if size > 1 => Some(items.iter().map(isolation.copy).collect()),
            _ => None,
        };
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
                let alone = match (&isolation, copies) {
                    (Some(isolation), Some(copies)) if (isolation.isolate)(&error) => copies,
                    _ => {
                        tracing::error!(%error, batch = size, "group commit failed");
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                        continue;
                    }
                };
                tracing::warn!(%error, batch = size, "group commit batch refused; running its items one by one");
                for (item, reply) in alone.into_iter().zip(replies) {
                    let answer = match tokio::spawn(run(vec![item])).await {
                        Ok(Ok(mut outputs)) if outputs.len() == 1 => match outputs.pop() {
                            Some(output) => Ok(output),
                            None => continue,
                        },
                        Ok(Ok(_)) => continue,
                        Ok(Err(error)) => Err(error),
                        // The reply is dropped: the caller sees the group commit stop.
                        Err(_) => continue,
                    };
                    let _ = reply.send(answer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch function that, like a database transaction, fails whole when any of its
    /// items is refused (negative numbers), and otherwise doubles every item.
    fn all_or_nothing() -> BatchFn<i64, i64, String> {
        Arc::new(|items: Vec<i64>| {
            Box::pin(async move {
                tokio::task::yield_now().await;
                if items.iter().any(|i| *i < 0) {
                    Err("refused".to_owned())
                } else {
                    Ok(items.iter().map(|i| i * 2).collect())
                }
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_item_fails_alone_and_the_others_get_their_own_outcome() {
        let commit = GroupCommit::start_isolating(1, 64, all_or_nothing(), |_| true);
        let calls: Vec<_> = (0..300i64)
            .map(|i| {
                let commit = commit.clone();
                tokio::spawn(async move { (i, commit.submit(if i == 150 { -1 } else { i }).await) })
            })
            .collect();
        let mut failed = Vec::new();
        for call in calls {
            let (i, answer) = call.await.unwrap();
            match answer.unwrap() {
                Ok(doubled) => assert_eq!(doubled, i * 2),
                Err(_) => failed.push(i),
            }
        }
        assert_eq!(failed, vec![150]);
    }

    #[tokio::test]
    async fn without_isolation_an_error_answers_the_whole_batch() {
        let commit = GroupCommit::start_isolating(1, 64, all_or_nothing(), |e| e != "refused");
        assert_eq!(commit.submit(-1).await.unwrap(), Err("refused".to_owned()));
        assert_eq!(commit.submit(2).await.unwrap(), Ok(4));
    }
}
