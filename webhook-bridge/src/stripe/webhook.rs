//! Stripe webhooks: verify, store, act once, answer.
//!
//! The signature (`Stripe-Signature`, 5-minute tolerance) is checked by async-stripe's
//! webhook support before anything else; an unverified body is never stored or acted
//! upon. A verified event is stored first (`stripe_events`), then turned into at most
//! one ledger write whose idempotency key comes from Stripe's own ids, so redeliveries,
//! concurrent deliveries and any order credit or debit exactly once:
//!
//! | event | ledger write | idempotency key |
//! |---|---|---|
//! | `payment_intent.succeeded` | credit `amount_received` | the payment intent id |
//! | `charge.refunded` | debit the newly refunded amount | `stripe:refund:{charge}:{before}:{after}` |
//! | `charge.dispute.created`, `…funds_withdrawn` | debit the disputed amount | `stripe:dispute:{dispute}` |
//! | `charge.dispute.funds_reinstated` | credit it back | `stripe:dispute-reinstated:{dispute}` |
//! | `checkout.session.completed` | none (the payment intent credits) | — |
//!
//! A refund is keyed by the step of the charge's `amount_refunded` it reports (from
//! `data.previous_attributes`), so two partial refunds are two debits and a redelivery
//! of either is none. A refund or dispute whose user is not known yet (it arrived before
//! its payment) is stored as needing attention and applied when the payment arrives.
//! 2xx is answered only once the effect is durable in credits-svc;
//! when credits-svc cannot be reached the answer is 503, so Stripe retries.

use reeve_proto::credits::v1 as credits;
use reeve_runtime::Micros;
use serde_json::Value;

use crate::AppState;
use crate::error::ApiError;
use crate::stripe::events::Received;

/// A verified event, read leniently: only the fields acted upon are required.
#[derive(Debug, Clone)]
pub struct Verified {
    pub id: String,
    pub event_type: String,
    pub object: Value,
    pub previous: Option<Value>,
    pub payload: String,
}

/// Checks the signature with async-stripe and reads the event.
pub fn verify(payload: &[u8], signature: Option<&str>, secret: &str) -> Result<Verified, ApiError> {
    let signature = signature.ok_or_else(|| {
        ApiError::bad_request(
            "missing_signature",
            "the Stripe-Signature header is required",
        )
    })?;
    if !well_formed(signature) {
        return Err(ApiError::bad_request(
            "malformed_signature",
            "the Stripe-Signature header is not t=<seconds>,v1=<hex>",
        ));
    }
    let payload = std::str::from_utf8(payload)
        .map_err(|_| ApiError::bad_request("invalid_payload", "the body is not UTF-8"))?;
    match stripe_webhook::Webhook::construct_event(payload, signature, secret) {
        // BadParse comes only after the signature and timestamp were accepted: the
        // event is genuine, but async-stripe's typed model does not know its shape.
        // The fields acted upon are read below from the JSON itself.
        Ok(_) => {}
        Err(stripe_webhook::WebhookError::BadParse(reason)) => {
            tracing::debug!(%reason, "verified Stripe event outside async-stripe's typed model");
        }
        Err(stripe_webhook::WebhookError::BadTimestamp(_)) => {
            return Err(ApiError::bad_request(
                "stale_signature",
                "the signature timestamp is outside the 5-minute tolerance",
            ));
        }
        Err(stripe_webhook::WebhookError::BadHeader(_)) => {
            return Err(ApiError::bad_request(
                "malformed_signature",
                "the Stripe-Signature header is malformed",
            ));
        }
        Err(_) => {
            return Err(ApiError::bad_request(
                "invalid_signature",
                "the Stripe-Signature does not verify",
            ));
        }
    }
    read_event(payload).ok_or_else(|| {
        ApiError::bad_request(
            "malformed_event",
            "the body is not a Stripe event with an id and a type",
        )
    })
}

/// The fields acted upon, from an event's JSON; `None` without an id or a type.
fn read_event(payload: &str) -> Option<Verified> {
    let event: Value = serde_json::from_str(payload).ok()?;
    let text = |key: &str| {
        event
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let data = event.get("data");
    Some(Verified {
        id: text("id")?,
        event_type: text("type")?,
        object: data
            .and_then(|d| d.get("object"))
            .cloned()
            .unwrap_or(Value::Null),
        previous: data
            .and_then(|d| d.get("previous_attributes"))
            .cloned()
            .filter(|v| !v.is_null()),
        payload: payload.to_owned(),
    })
}

/// The header's shape only (`t=<digits>` and at least one `v1=<hex>`), so a garbled
/// header gets its own error code; the cryptographic check is async-stripe's.
fn well_formed(signature: &str) -> bool {
    let mut timestamp = false;
    let mut v1 = false;
    for part in signature.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp |= !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()),
            Some(("v1", hex)) => {
                v1 |= !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())
            }
            _ => {}
        }
    }
    timestamp && v1
}

fn text<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn metadata_user(object: &Value) -> Option<&str> {
    object.get("metadata").and_then(|m| text(m, "user_id"))
}

fn cents(object: &Value, key: &str) -> Option<i64> {
    object.get(key).and_then(Value::as_i64)
}

/// What the event says about who paid, stored with it for later refunds and disputes.
pub fn received(event: &Verified) -> Received {
    let object = &event.object;
    let (payment_intent_id, charge_id, user_id) = match event.event_type.as_str() {
        "payment_intent.succeeded" => (
            text(object, "id"),
            text(object, "latest_charge"),
            metadata_user(object),
        ),
        "checkout.session.completed" => (
            text(object, "payment_intent"),
            None,
            metadata_user(object).or_else(|| text(object, "client_reference_id")),
        ),
        // Kept so that a refund or dispute that arrives before its payment can be
        // applied once the payment is known (see `apply_waiting`).
        "charge.refunded" => (
            text(object, "payment_intent"),
            text(object, "id"),
            metadata_user(object),
        ),
        "charge.dispute.created"
        | "charge.dispute.funds_withdrawn"
        | "charge.dispute.funds_reinstated" => (
            text(object, "payment_intent"),
            text(object, "charge"),
            metadata_user(object),
        ),
        _ => (None, None, None),
    };
    Received {
        event_id: event.id.clone(),
        event_type: event.event_type.clone(),
        payload: event.payload.clone(),
        payment_intent_id: payment_intent_id.map(str::to_owned),
        charge_id: charge_id.map(str::to_owned),
        user_id: user_id.map(str::to_owned),
    }
}

/// The one thing an event makes the bridge do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Credit {
        user_id: String,
        amount: Micros,
        key: String,
        description: String,
    },
    Debit {
        user_id: String,
        amount: Micros,
        key: String,
        reason: String,
    },
    /// Gives back what a debit took (a dispute won): an adjustment, not a purchase.
    Restore {
        user_id: String,
        amount: Micros,
        key: String,
        reason: String,
    },
    /// Stored, nothing to do; `outcome` is `ignored` or `ignored_currency`.
    Ignore {
        outcome: &'static str,
        detail: String,
    },
    /// Stored, cannot be acted upon without a person (e.g. no user id).
    NeedsAttention(String),
}

/// What a refund or dispute needs looked up: the payment it belongs to.
pub fn payment_of(event: &Verified) -> Option<(Option<String>, Option<String>)> {
    let object = &event.object;
    match event.event_type.as_str() {
        "charge.refunded" => Some((
            text(object, "payment_intent").map(str::to_owned),
            text(object, "id").map(str::to_owned),
        )),
        "charge.dispute.created"
        | "charge.dispute.funds_withdrawn"
        | "charge.dispute.funds_reinstated" => Some((
            text(object, "payment_intent").map(str::to_owned),
            text(object, "charge").map(str::to_owned),
        )),
        _ => None,
    }
}

/// Decides what an event does. `known_user` is the user of the refunded or disputed
/// payment, when an earlier event named them.
pub fn plan(event: &Verified, currency: &str, known_user: Option<String>) -> Action {
    let object = &event.object;
    let currency_ok = || {
        object
            .get("currency")
            .and_then(Value::as_str)
            .is_some_and(|c| c.eq_ignore_ascii_case(currency))
    };
    let wrong_currency = || Action::Ignore {
        outcome: "ignored_currency",
        detail: format!(
            "currency {:?} is not the configured {currency}; not applied",
            object.get("currency").and_then(Value::as_str).unwrap_or("")
        ),
    };
    let micros = |amount: i64| Micros::from_cents(amount).filter(|m| m.0 > 0);
    match event.event_type.as_str() {
        "payment_intent.succeeded" => {
            let Some(payment_intent) = text(object, "id") else {
                return Action::NeedsAttention("payment intent without an id".to_owned());
            };
            if !currency_ok() {
                return wrong_currency();
            }
            let Some(user_id) = metadata_user(object) else {
                return Action::NeedsAttention(format!(
                    "payment intent {payment_intent} has no metadata.user_id"
                ));
            };
            let Some(amount) = cents(object, "amount_received").and_then(micros) else {
                return Action::NeedsAttention(format!(
                    "payment intent {payment_intent} has no positive amount_received"
                ));
            };
            Action::Credit {
                user_id: user_id.to_owned(),
                amount,
                key: payment_intent.to_owned(),
                description: format!("Stripe payment {payment_intent}"),
            }
        }
        "checkout.session.completed" => Action::Ignore {
            outcome: "ignored",
            detail: "credited through payment_intent.succeeded".to_owned(),
        },
        "charge.refunded" => {
            let Some(charge) = text(object, "id") else {
                return Action::NeedsAttention("refunded charge without an id".to_owned());
            };
            if !currency_ok() {
                return wrong_currency();
            }
            let Some(after) = cents(object, "amount_refunded") else {
                return Action::NeedsAttention(format!(
                    "refunded charge {charge} has no amount_refunded"
                ));
            };
            let before = event
                .previous
                .as_ref()
                .and_then(|p| cents(p, "amount_refunded"))
                .unwrap_or(0);
            let Some(amount) = after.checked_sub(before).and_then(micros) else {
                return Action::Ignore {
                    outcome: "ignored",
                    detail: format!("no new refund on {charge} ({before} → {after})"),
                };
            };
            let Some(user_id) = metadata_user(object).map(str::to_owned).or(known_user) else {
                return Action::NeedsAttention(format!(
                    "no user known for refunded charge {charge}"
                ));
            };
            Action::Debit {
                user_id,
                amount,
                key: format!("stripe:refund:{charge}:{before}:{after}"),
                reason: format!("Stripe refund on {charge}"),
            }
        }
        // Created (the contract) or funds withdrawn: one debit per dispute, by
        // the same key, whichever arrives first.
        "charge.dispute.created"
        | "charge.dispute.funds_withdrawn"
        | "charge.dispute.funds_reinstated" => {
            let reinstated = event.event_type == "charge.dispute.funds_reinstated";
            let Some(dispute) = text(object, "id") else {
                return Action::NeedsAttention("dispute without an id".to_owned());
            };
            if !currency_ok() {
                return wrong_currency();
            }
            let Some(amount) = cents(object, "amount").and_then(micros) else {
                return Action::NeedsAttention(format!("dispute {dispute} has no positive amount"));
            };
            let Some(user_id) = metadata_user(object).map(str::to_owned).or(known_user) else {
                return Action::NeedsAttention(format!(
                    "no user known for disputed payment of {dispute}"
                ));
            };
            if reinstated {
                // A dispute won: its funds come back, once.
                return Action::Restore {
                    user_id,
                    amount,
                    key: format!("stripe:dispute-reinstated:{dispute}"),
                    reason: format!("Stripe dispute {dispute} won: funds reinstated"),
                };
            }
            Action::Debit {
                user_id,
                amount,
                key: format!("stripe:dispute:{dispute}"),
                reason: format!("Stripe dispute {dispute}"),
            }
        }
        other => Action::Ignore {
            outcome: "ignored",
            detail: format!("event type {other} is not acted upon"),
        },
    }
}

/// The outcome of one delivery, as answered to Stripe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Handled {
    pub received: bool,
    pub event_id: String,
    pub outcome: &'static str,
}

/// Stores the event, applies its action once, records the outcome. An error means
/// "not durable yet": the caller answers non-2xx and Stripe retries.
pub async fn handle(state: &AppState, event: Verified) -> Result<Handled, ApiError> {
    let now = reeve_runtime::clock::now_us();
    let store_failed = |error: crate::stripe::events::EventStoreError| {
        tracing::error!(%error, "cannot store Stripe event");
        ApiError::unavailable("the event store is unavailable; Stripe will retry")
    };
    state
        .events
        .record_received(&received(&event), now)
        .await
        .map_err(store_failed)?;
    let known_user = match payment_of(&event) {
        Some((payment_intent, charge)) => state
            .events
            .user_of_payment(payment_intent.as_deref(), charge.as_deref())
            .await
            .map_err(store_failed)?,
        None => None,
    };
    let action = plan(&event, &state.currency, known_user);
    let (outcome, detail) = match apply(state, &action).await {
        Ok(done) => done,
        Err(error) if error.status().is_server_error() => {
            let _ = state
                .events
                .record_outcome(&event.id, "failed", &error.to_string(), now)
                .await;
            return Err(error);
        }
        // The backend refused the write itself (e.g. the key was used for another
        // amount): retrying cannot help, a person must look.
        Err(error) => ("needs_attention", format!("{}: {}", error.code(), error)),
    };
    if outcome == "needs_attention" || outcome == "ignored_currency" {
        tracing::warn!(event_id = %event.id, event_type = %event.event_type, %detail, "Stripe event needs attention");
    }
    state
        .events
        .record_outcome(&event.id, outcome, &detail, now)
        .await
        .map_err(store_failed)?;
    tracing::info!(event_id = %event.id, event_type = %event.event_type, outcome, "Stripe event handled");
    metrics::counter!("reeve_webhook_events_total", "type" => event.event_type.clone(), "outcome" => outcome).increment(1);
    // A payment may unblock refunds and disputes that came first; a refund or dispute
    // left waiting looks once more, in case its payment was stored meanwhile (each side
    // looks after storing itself, so one of the two always sees the other).
    let waiting_may_move = matches!(action, Action::Credit { .. })
        || (outcome == "needs_attention" && payment_of(&event).is_some());
    if waiting_may_move {
        let stored = received(&event);
        apply_waiting(
            state,
            stored.payment_intent_id.as_deref(),
            stored.charge_id.as_deref(),
        )
        .await?;
    }
    Ok(Handled {
        received: true,
        event_id: event.id,
        outcome,
    })
}

/// Applies the refunds and disputes of a payment that arrived before the payment itself
/// (stored as needing attention, for want of a user). Their keys make this safe to run
/// on every delivery of the payment, concurrently or not.
async fn apply_waiting(
    state: &AppState,
    payment_intent: Option<&str>,
    charge: Option<&str>,
) -> Result<(), ApiError> {
    let unavailable = |error: crate::stripe::events::EventStoreError| {
        tracing::error!(%error, "cannot read waiting Stripe events");
        ApiError::unavailable("the event store is unavailable; Stripe will retry")
    };
    let waiting = state
        .events
        .waiting_for_payment(payment_intent, charge)
        .await
        .map_err(unavailable)?;
    for stored in waiting {
        // Verified when it was received.
        let Some(event) = read_event(&stored.payload) else {
            continue;
        };
        let known_user = match payment_of(&event) {
            Some((pi, ch)) => state
                .events
                .user_of_payment(pi.as_deref(), ch.as_deref())
                .await
                .map_err(unavailable)?,
            None => None,
        };
        let action = plan(&event, &state.currency, known_user);
        if let Action::NeedsAttention(_) = action {
            continue;
        }
        let (outcome, detail) = match apply(state, &action).await {
            Ok(done) => done,
            // Not durable yet: this delivery fails and Stripe retries it (all keyed).
            Err(error) if error.status().is_server_error() => return Err(error),
            // Refused for good: it stays waiting for a person; the payment itself is fine.
            Err(error) => {
                tracing::warn!(event_id = %event.id, code = error.code(), "waiting Stripe event refused");
                continue;
            }
        };
        let now = reeve_runtime::clock::now_us();
        state
            .events
            .resolve(&event.id, outcome, &detail, now)
            .await
            .map_err(unavailable)?;
        tracing::info!(event_id = %event.id, event_type = %event.event_type, outcome, "waiting Stripe event applied");
    }
    Ok(())
}

async fn apply(state: &AppState, action: &Action) -> Result<(&'static str, String), ApiError> {
    match action {
        Action::Credit {
            user_id,
            amount,
            key,
            description,
        } => {
            let reply = state
                .credits()
                .add_credits(credits::AddCreditsRequest {
                    user_id: user_id.clone(),
                    amount_micros: amount.0,
                    idempotency_key: key.clone(),
                    kind: credits::CreditKind::Purchase.into(),
                    description: description.clone(),
                })
                .await?
                .into_inner();
            let note = if reply.duplicate {
                " (already applied)"
            } else {
                ""
            };
            Ok(("credited", format!("credited {amount} to {user_id}{note}")))
        }
        Action::Debit {
            user_id,
            amount,
            key,
            reason,
        }
        | Action::Restore {
            user_id,
            amount,
            key,
            reason,
        } => {
            let restore = matches!(action, Action::Restore { .. });
            let signed = if restore {
                *amount
            } else {
                amount
                    .checked_neg()
                    .ok_or_else(|| ApiError::bad_request("invalid_amount", "amount overflows"))?
            };
            let reply = state
                .credits()
                .adjust(credits::AdjustRequest {
                    user_id: user_id.clone(),
                    amount_micros: signed.0,
                    idempotency_key: key.clone(),
                    reason: reason.clone(),
                })
                .await?
                .into_inner();
            let note = if reply.duplicate {
                " (already applied)"
            } else {
                ""
            };
            if restore {
                Ok(("credited", format!("gave {amount} back to {user_id}{note}")))
            } else {
                Ok(("debited", format!("debited {amount} from {user_id}{note}")))
            }
        }
        Action::Ignore { outcome, detail } => Ok((outcome, detail.clone())),
        Action::NeedsAttention(detail) => Ok(("needs_attention", detail.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(event_type: &str, object: Value, previous: Option<Value>) -> Verified {
        Verified {
            id: "evt_1".to_owned(),
            event_type: event_type.to_owned(),
            object,
            previous,
            payload: String::new(),
        }
    }

    #[test]
    fn payment_intent_credits_amount_received_in_micros() {
        let pi = json!({"id": "pi_1", "amount_received": 2500, "currency": "usd", "metadata": {"user_id": "alice"}});
        assert_eq!(
            plan(&event("payment_intent.succeeded", pi, None), "usd", None),
            Action::Credit {
                user_id: "alice".to_owned(),
                amount: Micros(25_000_000),
                key: "pi_1".to_owned(),
                description: "Stripe payment pi_1".to_owned()
            }
        );
    }

    #[test]
    fn other_currency_and_missing_user_are_not_credited() {
        let eur = json!({"id": "pi_1", "amount_received": 2500, "currency": "eur", "metadata": {"user_id": "alice"}});
        assert!(matches!(
            plan(&event("payment_intent.succeeded", eur, None), "usd", None),
            Action::Ignore {
                outcome: "ignored_currency",
                ..
            }
        ));
        let anonymous =
            json!({"id": "pi_1", "amount_received": 2500, "currency": "usd", "metadata": {}});
        assert!(matches!(
            plan(
                &event("payment_intent.succeeded", anonymous, None),
                "usd",
                None
            ),
            Action::NeedsAttention(_)
        ));
    }

    #[test]
    fn partial_refunds_debit_each_step_once() {
        let charge = |after: i64| json!({"id": "ch_1", "amount_refunded": after, "currency": "usd", "payment_intent": "pi_1"});
        let first = plan(
            &event(
                "charge.refunded",
                charge(500),
                Some(json!({"amount_refunded": 0})),
            ),
            "usd",
            Some("bob".to_owned()),
        );
        let second = plan(
            &event(
                "charge.refunded",
                charge(800),
                Some(json!({"amount_refunded": 500})),
            ),
            "usd",
            Some("bob".to_owned()),
        );
        let Action::Debit {
            amount: a1,
            key: k1,
            ..
        } = first
        else {
            panic!("{first:?}")
        };
        let Action::Debit {
            amount: a2,
            key: k2,
            ..
        } = second
        else {
            panic!("{second:?}")
        };
        assert_eq!((a1, a2), (Micros(5_000_000), Micros(3_000_000)));
        assert_ne!(k1, k2);
    }

    #[test]
    fn dispute_needs_a_known_user() {
        let dispute = json!({"id": "dp_1", "amount": 1000, "currency": "usd", "charge": "ch_1"});
        assert!(matches!(
            plan(
                &event("charge.dispute.created", dispute.clone(), None),
                "usd",
                None
            ),
            Action::NeedsAttention(_)
        ));
        assert!(matches!(
            plan(
                &event("charge.dispute.created", dispute, None),
                "usd",
                Some("bob".to_owned())
            ),
            Action::Debit {
                amount: Micros(10_000_000),
                ..
            }
        ));
    }
}
