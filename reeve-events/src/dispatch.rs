//! The dispatcher: fans events out to endpoints, claims due deliveries, sends each
//! signed body to its endpoint's registered URL and records the attempt. Any number
//! run at once (every service that writes events starts one): claims skip rows other
//! dispatchers hold, and a claim is a lease, so a dispatcher that dies mid-send only
//! delays a delivery, which then goes out again with the same `webhook-id`.
//!
//! It never follows a redirect, never sends anywhere but an endpoint's stored URL, and
//! bounds every request by time and the response it keeps.

use std::time::{Duration, Instant};

use reeve_runtime::clock::Clock;
use tokio_util::sync::CancellationToken;

use crate::EventsError;
use crate::signing::signature_header;
use crate::store::{AttemptResult, Claimed, EventStore};

/// How much of a response body the attempt log keeps.
pub const RESPONSE_EXCERPT_BYTES: usize = 1_024;

/// The dispatcher's knobs; [`Default`] is production's.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Sleep between rounds that found nothing to do.
    pub poll_interval: Duration,
    /// A whole request, from connecting to the last byte kept.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Deliveries claimed (and sent concurrently) per round.
    pub batch: i64,
    /// How long a claim holds a delivery: past it, another dispatcher may send it.
    pub lease: Duration,
    /// An endpoint failing for this long without a success is disabled.
    pub disable_after: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> DispatcherConfig {
        DispatcherConfig {
            poll_interval: Duration::from_millis(500),
            request_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            batch: 32,
            lease: Duration::from_secs(60),
            disable_after: Duration::from_secs(5 * 24 * 3600),
        }
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// Delivers the outbox of one database.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    store: EventStore,
    client: reqwest::Client,
    config: DispatcherConfig,
    clock: Clock,
}

impl Dispatcher {
    pub fn new(
        store: EventStore,
        config: DispatcherConfig,
        clock: Clock,
    ) -> Result<Dispatcher, EventsError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.request_timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent("reeve-webhooks/1")
            .build()
            .map_err(|error| EventsError::Client(error.to_string()))?;
        Ok(Dispatcher {
            store,
            client,
            config,
            clock,
        })
    }

    /// One round: fan out new events, then claim, send and record due deliveries.
    /// The number of attempts made.
    pub async fn run_once(&self) -> Result<usize, EventsError> {
        while self.store.fan_out(self.clock.now_us(), 500).await? == 500 {}
        let claimed = self
            .store
            .claim(
                self.clock.now_us(),
                micros(self.config.lease),
                self.config.batch,
            )
            .await?;
        let sends = claimed.iter().map(|claim| async move {
            let result = self.send(claim).await;
            let recorded = self
                .store
                .record(
                    claim,
                    &result,
                    self.clock.now_us(),
                    micros(self.config.disable_after),
                )
                .await;
            if let Err(error) = &recorded {
                tracing::warn!(delivery_id = %claim.delivery_id, %error, "webhook attempt not recorded; its lease will expire");
            }
            recorded
        });
        for recorded in futures::future::join_all(sends).await {
            recorded?;
        }
        Ok(claimed.len())
    }

    /// Runs rounds until `shutdown`; a failing round is logged and retried.
    pub fn spawn(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let pause = match self.run_once().await {
                    Ok(0) => self.config.poll_interval,
                    Ok(_) => Duration::ZERO,
                    Err(error) => {
                        tracing::warn!(%error, "webhook dispatch round failed");
                        self.config.poll_interval
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        })
    }

    /// One signed POST to the endpoint's URL.
    async fn send(&self, claim: &Claimed) -> AttemptResult {
        let started = Instant::now();
        // The signing time is the wall clock's (receivers check it against theirs);
        // the injected clock only decides what is due.
        let timestamp_secs = reeve_runtime::clock::now_us() / 1_000_000;
        let secrets: Vec<&str> = claim.secrets.iter().map(String::as_str).collect();
        let signature = match signature_header(
            &secrets,
            &claim.event_id,
            timestamp_secs,
            claim.payload.as_bytes(),
        ) {
            Ok(signature) => signature,
            Err(error) => return failure(None, error.to_string(), started, String::new()),
        };
        let sent = self
            .client
            .post(&claim.url)
            .header("content-type", "application/json")
            .header("webhook-id", &claim.event_id)
            .header("webhook-timestamp", timestamp_secs.to_string())
            .header("webhook-signature", signature)
            .body(claim.payload.clone())
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(error) => {
                let kind = if error.is_timeout() {
                    "timeout"
                } else if error.is_connect() {
                    "connect"
                } else {
                    "request"
                };
                return failure(None, format!("{kind}: {error}"), started, String::new());
            }
        };
        let status = response.status();
        let mut excerpt = Vec::new();
        while excerpt.len() < RESPONSE_EXCERPT_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        excerpt.truncate(RESPONSE_EXCERPT_BYTES);
        let excerpt = String::from_utf8_lossy(&excerpt).into_owned();
        let code = Some(i64::from(status.as_u16()));
        if status.is_success() {
            AttemptResult {
                succeeded: true,
                status_code: code,
                error: None,
                latency_ms: elapsed_ms(started),
                response_excerpt: excerpt,
            }
        } else {
            let reason = if status.is_redirection() {
                format!("redirect not followed: HTTP {}", status.as_u16())
            } else {
                format!("HTTP {}", status.as_u16())
            };
            failure(code, reason, started, excerpt)
        }
    }
}

fn elapsed_ms(started: Instant) -> i64 {
    i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX)
}

fn failure(
    status_code: Option<i64>,
    error: String,
    started: Instant,
    excerpt: String,
) -> AttemptResult {
    AttemptResult {
        succeeded: false,
        status_code,
        error: Some(error),
        latency_ms: elapsed_ms(started),
        response_excerpt: excerpt,
    }
}
