//! Acting on a verified Stripe event: store it, ask credits-svc once, record the outcome.
//!
//! Every verified event is stored (`stripe_events`) before anything else, then its
//! [`interpretation`](crate::stripe::interpret) becomes at most one
//! `RecordPaymentEvent` call. credits-svc owns the money rules: it keys the write by
//! Stripe's ids (so redeliveries, concurrent deliveries and any order move money once),
//! finds the user of a refund or dispute from its own record of the payment, and caps
//! what one payment can be debited. This module must never choose a user for a refund
//! or dispute, nor compute an amount: it only resolves a charge to its payment intent
//! (from events Stripe sent) and records what credits-svc answered.
//!
//! 2xx is answered only once the effect is durable in credits-svc; when credits-svc or
//! the store cannot be reached the answer is 503 (Stripe retries) and the event stays
//! `failed`. An event left without a final outcome (`received` or `failed`, e.g. the
//! database went away between storing it and recording its outcome) is taken up again
//! by [`spawn_retry`] through the same path, a minute after its last delivery.
//!
//! A refund or dispute of a payment credits-svc has not credited (it arrived first, or
//! the payment could not be credited) moves nothing: it is stored as
//! `needs_attention` and applied when its payment is credited.

use std::sync::Arc;
use std::time::Duration;

use reeve_proto::credits::v1 as credits;
use reeve_runtime::Micros;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::AppState;
use crate::error::ApiError;
use crate::stripe::events::{EventStoreError, Outcome, Received, UNFINISHED_AFTER_US};
use crate::stripe::interpret::{self, Interpretation, LedgerAction, PAYMENT_FOLLOWERS};
use crate::stripe::verify::{Verified, read_event};

/// How often the retry task looks for events without a final outcome.
pub const RETRY_EVERY: Duration = Duration::from_secs(30);
/// At most this many events per retry pass (oldest first).
const RETRY_BATCH: i64 = 100;

/// The outcome of one delivery, as answered to Stripe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Handled {
    pub received: bool,
    pub event_id: String,
    pub outcome: Outcome,
}

fn store_unavailable(error: EventStoreError) -> ApiError {
    tracing::error!(%error, "Stripe event store unavailable");
    ApiError::unavailable("the event store is unavailable; Stripe will retry")
}

/// What is stored beside the event: the payment it belongs to, so that a refund or
/// dispute naming only a charge finds its payment intent, and waiting events are found
/// when their payment arrives. The user is kept for audit only (a payment's metadata);
/// it never decides who a refund or dispute debits.
fn received(event: &Verified) -> Received {
    let (payment_intent_id, charge_id) = interpret::payment_of(&event.event_type, &event.object);
    let user_id = (event.event_type == "payment_intent.succeeded")
        .then(|| event.object.get("metadata")?.get("user_id")?.as_str())
        .flatten()
        .filter(|u| !u.is_empty())
        .map(str::to_owned);
    Received {
        event_id: event.id.clone(),
        event_type: event.event_type.clone(),
        payload: event.payload.clone(),
        payment_intent_id,
        charge_id,
        user_id,
    }
}

/// Stores a delivery, acts on it once, records the outcome. An error means "not
/// durable yet": the caller answers non-2xx and Stripe retries.
pub async fn handle(state: &AppState, event: Verified) -> Result<Handled, ApiError> {
    let now = reeve_runtime::clock::now_us();
    state
        .events
        .record_received(&received(&event), now)
        .await
        .map_err(store_unavailable)?;
    let outcome = process(state, &event).await?;
    Ok(Handled {
        received: true,
        event_id: event.id,
        outcome,
    })
}

/// Acts on a stored event and records its outcome: the path of every delivery and of
/// every retry of an unfinished event.
async fn process(state: &AppState, event: &Verified) -> Result<Outcome, ApiError> {
    let interpretation = interpret::interpret(&event.event_type, &event.object, &state.currency);
    let (outcome, detail) = match act(state, &interpretation).await {
        Ok(done) => done,
        Err(error) if error.status().is_server_error() => {
            let now = reeve_runtime::clock::now_us();
            let _ = state
                .events
                .record_outcome(&event.id, Outcome::Failed, &error.to_string(), now)
                .await;
            metrics::counter!("reeve_webhook_events_total", "type" => event_type_label(&event.event_type), "outcome" => Outcome::Failed.as_str()).increment(1);
            return Err(error);
        }
        // credits-svc refused the write itself (e.g. the payment intent was credited to
        // another user or amount): retrying cannot help, a person must look.
        Err(error) => (
            Outcome::NeedsAttention,
            format!("{}: {}", error.code(), error),
        ),
    };
    if matches!(outcome, Outcome::NeedsAttention | Outcome::IgnoredCurrency) {
        tracing::warn!(event_id = %event.id, event_type = %event.event_type, %detail, "Stripe event needs attention");
    }
    let now = reeve_runtime::clock::now_us();
    state
        .events
        .record_outcome(&event.id, outcome, &detail, now)
        .await
        .map_err(store_unavailable)?;
    tracing::info!(event_id = %event.id, event_type = %event.event_type, %outcome, %detail, "Stripe event handled");
    metrics::counter!("reeve_webhook_events_total", "type" => event_type_label(&event.event_type), "outcome" => outcome.as_str()).increment(1);
    // A credited payment may unblock refunds and disputes that came first; one left
    // waiting looks once more, in case its payment was credited meanwhile (each side
    // looks after recording itself, so one of the two always sees the other).
    let payment_credited =
        event.event_type == "payment_intent.succeeded" && outcome == Outcome::Credited;
    let follower_waits = outcome == Outcome::NeedsAttention
        && PAYMENT_FOLLOWERS.contains(&event.event_type.as_str());
    if payment_credited || follower_waits {
        let (payment_intent, charge) = interpret::payment_of(&event.event_type, &event.object);
        apply_waiting(state, payment_intent.as_deref(), charge.as_deref()).await?;
    }
    Ok(outcome)
}

/// The event type as a metric label: Stripe's own types, a bounded set.
fn event_type_label(event_type: &str) -> String {
    if event_type.len() <= 64
        && event_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_')
    {
        event_type.to_owned()
    } else {
        "other".to_owned()
    }
}

/// Does what the interpretation asks; the outcome and its detail for the audit trail.
async fn act(
    state: &AppState,
    interpretation: &Interpretation,
) -> Result<(Outcome, String), ApiError> {
    match interpretation {
        Interpretation::Ignore { outcome, detail } => Ok((*outcome, detail.clone())),
        Interpretation::NeedsAttention(detail) => Ok((Outcome::NeedsAttention, detail.clone())),
        Interpretation::Record(action) => record(state, action).await,
    }
}

async fn record(state: &AppState, action: &LedgerAction) -> Result<(Outcome, String), ApiError> {
    let payment_id = match (&action.payment_intent, &action.charge) {
        (Some(payment_intent), _) => payment_intent.clone(),
        (None, Some(charge)) => {
            let found = state
                .events
                .payment_intent_of_charge(charge)
                .await
                .map_err(store_unavailable)?;
            let Some(payment_intent) = found else {
                return Ok((
                    Outcome::NeedsAttention,
                    format!(
                        "the payment of charge {charge} is not known yet: nothing applied to {}; applied when it arrives",
                        action.object_id
                    ),
                ));
            };
            payment_intent
        }
        (None, None) => {
            return Ok((
                Outcome::NeedsAttention,
                format!("{} names no payment intent or charge", action.object_id),
            ));
        }
    };
    let reply = match state
        .credits()
        .record_payment_event(action.request(&payment_id))
        .await
    {
        Ok(reply) => reply.into_inner(),
        Err(status) => return Err(payment_event_error(status)),
    };
    use credits::PaymentEventOutcome as Answer;
    let user = reply.user_id.as_str();
    if action.kind == credits::PaymentEventKind::TopupFailed {
        // No money moves: the attempt failed now, or was not waiting any more.
        return match Answer::try_from(reply.outcome) {
            Ok(Answer::Applied | Answer::NothingToApply) => {
                Ok((Outcome::Unchanged, format!("{user}: {}", reply.detail)))
            }
            _ => Err(ApiError::unavailable(format!(
                "credits-svc answered an unexpected outcome {} to a failed auto top-up",
                reply.outcome
            ))),
        };
    }
    match Answer::try_from(reply.outcome) {
        Ok(answer @ (Answer::Applied | Answer::Duplicate)) => {
            let moved = Micros(
                reply
                    .entry
                    .as_ref()
                    .map_or(action.amount.0, |e| e.amount_micros.saturating_abs()),
            );
            let again = if answer == Answer::Duplicate {
                " (already applied)"
            } else {
                ""
            };
            let capped = if reply.capped_micros > 0 {
                format!(
                    "; {} withheld by the cap of payment {payment_id}",
                    Micros(reply.capped_micros)
                )
            } else {
                String::new()
            };
            if action.credits_user() {
                Ok((
                    Outcome::Credited,
                    format!("credited {moved} to {user}{again}{capped}"),
                ))
            } else {
                Ok((
                    Outcome::Debited,
                    format!("debited {moved} from {user}{again}{capped}"),
                ))
            }
        }
        Ok(Answer::NothingToApply) => Ok((
            Outcome::Unchanged,
            format!(
                "nothing to apply for {user} on payment {payment_id}: {}",
                reply.detail
            ),
        )),
        Ok(Answer::UnknownPayment) => Ok((
            Outcome::NeedsAttention,
            format!(
                "payment {payment_id} was not credited (yet): nothing applied to {}; applied when it is",
                action.object_id
            ),
        )),
        // A newer credits-svc, or a broken answer: not durable as far as we know.
        Ok(Answer::Unspecified) | Err(_) => Err(ApiError::unavailable(format!(
            "credits-svc answered an unknown payment event outcome {}",
            reply.outcome
        ))),
    }
}

/// What a refusal of `RecordPaymentEvent` makes of the event. A kind credits-svc does
/// not know means a credits-svc older than this bridge (deployed in the wrong order):
/// unavailable, so the event is retried until it does, never parked for a person.
fn payment_event_error(status: tonic::Status) -> ApiError {
    match ApiError::from(status) {
        ApiError::BadRequest { code, message } if code == "invalid_kind" => ApiError::unavailable(
            format!("credits-svc does not know this payment event yet: {message}"),
        ),
        error => error,
    }
}

/// Applies the refunds and disputes of a payment that were waiting for it (stored as
/// needing attention). Each is keyed by credits-svc, so this is safe on every delivery
/// of the payment, concurrently or not.
async fn apply_waiting(
    state: &AppState,
    payment_intent: Option<&str>,
    charge: Option<&str>,
) -> Result<(), ApiError> {
    let waiting = state
        .events
        .waiting_for_payment(payment_intent, charge)
        .await
        .map_err(store_unavailable)?;
    for stored in waiting {
        // Verified when it was received.
        let Some(event) = read_event(&stored.payload) else {
            continue;
        };
        let interpretation =
            interpret::interpret(&event.event_type, &event.object, &state.currency);
        let (outcome, detail) = match act(state, &interpretation).await {
            Ok(done) => done,
            // Not durable yet: this delivery fails and Stripe retries it (all keyed).
            Err(error) if error.status().is_server_error() => return Err(error),
            // Refused for good: it stays waiting for a person; the payment itself is fine.
            Err(error) => {
                tracing::warn!(event_id = %event.id, code = error.code(), "waiting Stripe event refused");
                continue;
            }
        };
        if outcome == Outcome::NeedsAttention {
            continue;
        }
        let now = reeve_runtime::clock::now_us();
        state
            .events
            .resolve(&event.id, outcome, &detail, now)
            .await
            .map_err(store_unavailable)?;
        tracing::info!(event_id = %event.id, event_type = %event.event_type, %outcome, %detail, "waiting Stripe event applied");
    }
    Ok(())
}

/// Acts again on events without a final outcome whose last delivery was before
/// `before_us`, oldest first, through the same path as a delivery. Returns how many
/// reached a final outcome. Stops at the third failure in a row (the store or
/// credits-svc is down: the next pass tries again).
pub async fn retry_unfinished(state: &AppState, before_us: i64) -> Result<usize, ApiError> {
    let unfinished = state
        .events
        .unfinished(before_us, RETRY_BATCH)
        .await
        .map_err(store_unavailable)?;
    let mut finished = 0;
    let mut failures_in_a_row = 0;
    let mut last_error = None;
    for stored in unfinished {
        let Some(event) = read_event(&stored.payload) else {
            let now = reeve_runtime::clock::now_us();
            state
                .events
                .record_outcome(
                    &stored.event_id,
                    Outcome::NeedsAttention,
                    "the stored payload is not a readable event",
                    now,
                )
                .await
                .map_err(store_unavailable)?;
            continue;
        };
        let span = tracing::info_span!("stripe_event_retry", event_id = %event.id, event_type = %event.event_type);
        match process(state, &event).instrument(span).await {
            Ok(outcome) => {
                failures_in_a_row = 0;
                if outcome.is_final() {
                    finished += 1;
                }
            }
            Err(error) => {
                tracing::warn!(event_id = %event.id, code = error.code(), %error, "retry of a Stripe event failed");
                failures_in_a_row += 1;
                last_error = Some(error);
                if failures_in_a_row >= 3 {
                    break;
                }
            }
        }
    }
    match last_error {
        Some(error) if finished == 0 => Err(error),
        _ => Ok(finished),
    }
}

/// Every [`RETRY_EVERY`] (and once at start), acts again on events left without a
/// final outcome a minute after their last delivery. Ends when `shutdown` is cancelled.
pub fn spawn_retry(state: Arc<AppState>, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RETRY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let before_us = reeve_runtime::clock::now_us().saturating_sub(UNFINISHED_AFTER_US);
            match retry_unfinished(&state, before_us).await {
                Ok(0) => {}
                Ok(finished) => tracing::info!(finished, "unfinished Stripe events retried"),
                Err(error) => {
                    tracing::warn!(code = error.code(), %error, "retrying unfinished Stripe events failed; next pass later")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// credits-svc's own refusal of a kind it does not know is retried; its other
    /// refusals of an event stay what they are.
    #[test]
    fn an_unknown_kind_is_retried_and_other_refusals_are_not() {
        let unknown = tonic::Status::from(credits_svc::error::CreditsError::invalid(
            "invalid_kind",
            "kind must be one of the PAYMENT_EVENT_KIND_* values",
        ));
        assert!(matches!(
            payment_event_error(unknown),
            ApiError::Unavailable { .. }
        ));
        let bad_user = tonic::Status::from(credits_svc::error::CreditsError::invalid(
            "invalid_user_id",
            "user_id must not be empty",
        ));
        assert!(matches!(
            payment_event_error(bad_user),
            ApiError::BadRequest { code, .. } if code == "invalid_user_id"
        ));
    }
}
