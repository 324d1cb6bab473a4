//! The auto top-up worker: claims due attempts, charges the saved card off-session
//! through async-stripe (a PaymentIntent with `confirm` and `off_session`, the
//! attempt id as Stripe's `Idempotency-Key`) and records Stripe's answer with its
//! events ([`crate::topup::resolve`]).
//!
//! Safe with many replicas: an attempt is claimed by one worker at a time (`FOR UPDATE
//! SKIP LOCKED` on PostgreSQL, SQLite's single writer) for a lease. A worker that dies
//! between Stripe's answer and recording it leaves the attempt claimed; once the
//! lease runs out another claims it and sends the same request with the same key,
//! which Stripe answers with the first PaymentIntent: nothing is charged twice. An
//! answer that is not definite (network, timeout, 5xx) is treated the same way.
//!
//! It must never credit anything: the credits arrive with the PaymentIntent's
//! `payment_intent.succeeded` webhook (the user id in its metadata, where the bridge
//! reads every payment's user), applied exactly once by the ledger.

use std::collections::HashMap;
use std::time::Duration;

use reeve_runtime::clock::Clock;
use reeve_runtime::config::ConfigError;
use reeve_runtime::money::MICROS_PER_CREDIT;
use stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_core::payment_intent::{CreatePaymentIntent, CreatePaymentIntentOffSession};
use tokio_util::sync::CancellationToken;

use crate::checkout::CheckoutConfig;
use crate::store::{StoreError, TopUpStore};
use crate::topup::{ATTEMPT_METADATA_KEY, Attempt, ChargeResult};

/// How long a claimed attempt is a worker's before another may claim it again.
pub const LEASE_US: i64 = 120 * 1_000_000;
/// Attempts claimed per round.
const CLAIM_BATCH: u32 = 16;
/// `REEVE_TOPUP_POLL_MS`: how often the worker looks for due attempts (default).
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// Charges saved cards for due attempts.
pub struct TopUpWorker {
    store: TopUpStore,
    client: stripe::Client,
    currency: String,
    clock: Clock,
}

impl TopUpWorker {
    /// A worker charging through the Stripe account of `checkout`.
    pub fn new(
        store: TopUpStore,
        checkout: &CheckoutConfig,
        clock: Clock,
    ) -> Result<TopUpWorker, ConfigError> {
        let client =
            stripe::ClientBuilder::new(secrecy::ExposeSecret::expose_secret(&checkout.secret_key))
                .url(checkout.api_base.clone())
                .timeout(Duration::from_secs(20))
                .build()
                .map_err(|e| ConfigError::new("STRIPE_API_BASE", e.to_string()))?;
        Ok(TopUpWorker {
            store,
            client,
            currency: checkout.currency.clone(),
            clock,
        })
    }

    /// One round: claims the due attempts and charges each; how many were claimed.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let claimed = self
            .store
            .claim(self.clock.now_us(), LEASE_US, CLAIM_BATCH)
            .await?;
        for attempt in &claimed {
            // Sent one after the other: one whose lease ran out meanwhile may be another
            // worker's now, and past the resend window its key may be gone.
            if self.clock.now_us() >= attempt.lease_until_us {
                continue;
            }
            let result = self.charge(attempt).await;
            let recorded = self
                .store
                .record(attempt, &result, self.clock.now_us())
                .await?;
            let outcome = match &result {
                ChargeResult::Succeeded { .. } => "succeeded",
                ChargeResult::RequiresAction { .. } => "requires_action",
                ChargeResult::Declined { .. } => "declined",
                ChargeResult::Unknown(_) => "unknown",
            };
            metrics::counter!("reeve_topup_charges_total", "outcome" => outcome).increment(1);
            match &result {
                ChargeResult::Unknown(reason) => tracing::warn!(
                    attempt_id = %attempt.attempt_id,
                    user_id = %attempt.user_id,
                    %reason,
                    "auto top-up: no definite answer from Stripe; retried with the same key after the lease"
                ),
                _ => tracing::info!(
                    attempt_id = %attempt.attempt_id,
                    user_id = %attempt.user_id,
                    outcome,
                    recorded,
                    "auto top-up charged"
                ),
            }
        }
        Ok(claimed.len())
    }

    /// Creates and confirms the attempt's off-session PaymentIntent (the attempt id as
    /// the Idempotency-Key) and reads Stripe's answer.
    pub async fn charge(&self, attempt: &Attempt) -> ChargeResult {
        let key = match IdempotencyKey::new(&attempt.attempt_id) {
            Ok(key) => key,
            Err(error) => return ChargeResult::Unknown(error.to_string()),
        };
        // One credit is one unit of the currency: micros / 10,000 are cents.
        let cents = attempt.amount.0 / (MICROS_PER_CREDIT / 100);
        let currency: stripe_types::Currency =
            self.currency.parse().unwrap_or(stripe_types::Currency::USD);
        let metadata = HashMap::from([
            ("user_id".to_owned(), attempt.user_id.clone()),
            (ATTEMPT_METADATA_KEY.to_owned(), attempt.attempt_id.clone()),
        ]);
        let sent = CreatePaymentIntent::new(cents, currency)
            .customer(attempt.card.customer_id.clone())
            .payment_method(attempt.card.payment_method_id.clone())
            .off_session(CreatePaymentIntentOffSession::Bool(true))
            .confirm(true)
            .metadata(metadata)
            .description(format!(
                "Reeve auto top-up of {} credits",
                attempt.amount.0 / MICROS_PER_CREDIT
            ))
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await;
        match sent {
            Ok(intent) => answer_of(
                intent.id.to_string(),
                &intent.status,
                intent
                    .next_action
                    .and_then(|a| a.redirect_to_url)
                    .and_then(|r| r.url),
            ),
            Err(error) => refusal_of(error),
        }
    }

    /// Runs rounds every `poll` until `shutdown` (a round in flight is abandoned: its
    /// attempts are claimed again after the lease, with the same keys).
    pub fn spawn(self, poll: Duration, shutdown: CancellationToken) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    done = self.run_once() => {
                        if let Err(error) = done {
                            tracing::warn!(%error, "auto top-up worker round failed");
                        }
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(poll) => {}
                }
            }
        });
    }
}

fn answer_of(
    payment_intent_id: String,
    status: &stripe_core::PaymentIntentStatus,
    action_url: Option<String>,
) -> ChargeResult {
    use stripe_core::PaymentIntentStatus as S;
    match status {
        S::Succeeded => ChargeResult::Succeeded { payment_intent_id },
        S::RequiresAction | S::RequiresConfirmation => ChargeResult::RequiresAction {
            payment_intent_id,
            action_url,
        },
        S::RequiresPaymentMethod | S::Canceled => ChargeResult::Declined {
            code: status.as_str().to_owned(),
            message: format!("the payment intent is {}", status.as_str()),
            payment_intent_id: Some(payment_intent_id),
        },
        // Processing (or capture pending): the webhook completes it; until then it is
        // sent again after each lease, which Stripe answers from the same key.
        other => ChargeResult::Unknown(format!("payment intent is {}", other.as_str())),
    }
}

fn refusal_of(error: StripeError) -> ChargeResult {
    let StripeError::Stripe(errors, status) = error else {
        return ChargeResult::Unknown(error.to_string());
    };
    let code = errors
        .code
        .as_ref()
        .map(|c| c.as_str().to_owned())
        .unwrap_or_else(|| errors.type_.as_str().to_owned());
    let payment_intent_id = errors.payment_intent.as_ref().map(|p| p.id.to_string());
    let message = errors.message.clone().unwrap_or_default();
    match (&errors.type_, status) {
        (stripe::ApiErrorsType::CardError, _) if code == "authentication_required" => {
            ChargeResult::RequiresAction {
                payment_intent_id: payment_intent_id.unwrap_or_default(),
                action_url: None,
            }
        }
        (stripe::ApiErrorsType::CardError, _) => ChargeResult::Declined {
            code,
            message,
            payment_intent_id,
        },
        // A concurrent request with the same key, rate limits, Stripe's own errors and
        // a reused key: not definite, so never a reason to try a new charge.
        (stripe::ApiErrorsType::IdempotencyError, _) | (_, 409 | 429 | 500..) => {
            ChargeResult::Unknown(format!("HTTP {status}: {code}"))
        }
        // A card or customer that no longer exists: nothing was charged, and this card
        // cannot be charged again.
        (stripe::ApiErrorsType::InvalidRequestError, _)
            if code == "resource_missing" || code.starts_with("payment_method_") =>
        {
            ChargeResult::Declined {
                code,
                message,
                payment_intent_id,
            }
        }
        // Anything else (a revoked, rotated or restricted key, a request of ours Stripe
        // refuses): not the card's fault, so never counted toward a suspension; sent
        // again after the lease, and logged.
        _ => ChargeResult::Unknown(format!("HTTP {status}: {code}")),
    }
}
