//! When and how a call is tried again: only on UNAVAILABLE, DEADLINE_EXCEEDED and
//! RESOURCE_EXHAUSTED (the server did not answer, or asked us to slow down), or on an
//! HTTP/2 error of the connection whatever code tonic gave it, after a
//! jittered exponential backoff, and always with the same request, so the idempotency
//! key the caller chose is what the server sees every time. This module never builds
//! a request itself and never retries a refusal (INVALID_ARGUMENT, FAILED_PRECONDITION,
//! PERMISSION_DENIED, …): those are answers, not failures.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tonic::{Code, Status};

/// The codes worth trying again with the same request.
pub fn is_retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
    )
}

/// Whether a failed call is worth sending again with the same request: a retryable
/// code, or a status tonic made from an HTTP/2 error of the connection (a stream reset,
/// a connection torn down while the server stopped). tonic names most of those
/// INTERNAL, but no server answered: a status a server sent carries no source.
pub fn is_retryable_status(status: &Status) -> bool {
    is_retryable(status.code()) || broke_in_transport(status)
}

/// Whether the status came from an HTTP/2 error on our side of the wire.
fn broke_in_transport(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<h2::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// How many times, and how far apart, a call is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub max_attempts: u32,
    /// The first backoff; each next one doubles, up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The wait before attempt `attempt + 1` (after `attempt` failures, from 1): "full
    /// jitter", a uniform draw in [cap/2, cap] where cap doubles per attempt, so many
    /// callers that failed together do not come back together.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(20);
        let cap = self
            .base_backoff
            .saturating_mul(1u32 << exponent)
            .min(self.max_backoff);
        let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX).max(2);
        Duration::from_micros(rand::rng().random_range(cap_us / 2..=cap_us))
    }
}

/// Runs `call` until it succeeds, fails with a code that is not retryable, or the
/// policy's attempts are spent. `call` must send the same request each time.
pub async fn run<T, F, Fut>(
    policy: &RetryPolicy,
    method: &'static str,
    mut call: F,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(status) if is_retryable_status(&status) && attempt < policy.max_attempts => {
                metrics::counter!("reeve_client_retries_total", "method" => method).increment(1);
                tracing::debug!(method, attempt, code = ?status.code(), "retrying");
                tokio::time::sleep(policy.backoff(attempt)).await;
                attempt += 1;
            }
            Err(status) => return Err(status),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_its_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        };
        for _ in 0..100 {
            let first = policy.backoff(1);
            assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10));
            let late = policy.backoff(30);
            assert!(late >= Duration::from_millis(50) && late <= Duration::from_millis(100));
        }
    }

    #[tokio::test]
    async fn only_transient_codes_are_retried() {
        let policy = RetryPolicy {
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        for (code, expected_calls) in [
            (Code::Unavailable, 4),
            (Code::DeadlineExceeded, 4),
            (Code::ResourceExhausted, 4),
            (Code::InvalidArgument, 1),
            (Code::FailedPrecondition, 1),
            (Code::Internal, 1),
            (Code::PermissionDenied, 1),
        ] {
            let calls = AtomicU32::new(0);
            let result: Result<(), Status> = run(&policy, "Test", || {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Err(Status::new(code, "no")) }
            })
            .await;
            assert_eq!(result.unwrap_err().code(), code);
            assert_eq!(calls.load(Ordering::SeqCst), expected_calls, "{code:?}");
        }
    }

    /// A connection broken mid-call (seen when credits-svc stopped under the recorder:
    /// "h2 protocol error", INTERNAL) is retried; an INTERNAL a server sent is not.
    #[tokio::test]
    async fn a_broken_connection_is_retried_whatever_code_tonic_gave_it() {
        let policy = RetryPolicy {
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        let broken = || Status::from_error(Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR)));
        assert_eq!(broken().code(), Code::Internal);
        assert!(is_retryable_status(&broken()));
        assert!(!is_retryable_status(&Status::internal(
            "h2 protocol error: sent by a server"
        )));
        let calls = AtomicU32::new(0);
        let result: Result<u32, Status> = run(&policy, "Test", || {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move { if call == 0 { Err(broken()) } else { Ok(call) } }
        })
        .await;
        assert_eq!(result.unwrap(), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
