//! What a Stripe event means for the ledger, decided without I/O and without a clock.
//!
//! [`interpret`] reads one plain Stripe object (the `data.object` of an event, or an
//! object listed from Stripe's API by a reconciliation) and says which
//! `RecordPaymentEvent` it asks of credits-svc, or why it asks none. It must never look
//! anything up, read the time, or decide *who* a refund or dispute belongs to: the
//! user of a refund or dispute is the user credits-svc credited for that payment, found
//! there from its own record, never from the event. Nor does it compute the step of a
//! refund: `charge.refunded` carries the charge's cumulative `amount_refunded`, and
//! credits-svc debits what refunds of that payment have not debited yet, so
//! `previous_attributes` is not needed and any order or redelivery is safe.
//!
//! | event (object) | asks | amount, object id |
//! |---|---|---|
//! | `payment_intent.succeeded` (payment intent) | `PAYMENT_SUCCEEDED` for `metadata.user_id` | `amount_received`, the payment intent |
//! | `charge.refunded` (charge) | `REFUNDED` | the cumulative `amount_refunded`, the charge |
//! | `charge.refund.updated`, `refund.updated`, `refund.failed` (refund, status `failed`) | `REFUND_FAILED` | the refund's amount, the refund |
//! | `charge.dispute.created` (dispute, status not `warning_*`), `charge.dispute.funds_withdrawn` | `DISPUTE_FUNDS_WITHDRAWN` | the disputed amount, the dispute |
//! | `charge.dispute.funds_reinstated` | `DISPUTE_FUNDS_REINSTATED` | the disputed amount, the dispute |
//! | `charge.dispute.created` with a `warning_*` status (an inquiry) | nothing: no funds were withdrawn | — |
//! | `checkout.session.completed` | nothing: the payment intent credits | — |
//! | `payment_intent.payment_failed`, `payment_intent.canceled` of an auto top-up (`metadata.reeve_topup_attempt_id`) | `TOPUP_FAILED`: the attempt fails (a decline), unless the code is `authentication_required` (the attempt already waits for the user) | nothing moves, the payment intent |
//! | the same of another payment | nothing: nothing was credited | — |
//!
//! Anything in another currency than the configured one is ignored as
//! `ignored_currency` (a person sees it); an object lacking what its action needs is
//! `needs_attention`.

use reeve_proto::credits::v1 as credits;
use reeve_runtime::Micros;
use serde_json::Value;

use crate::stripe::events::Outcome;

/// One `RecordPaymentEvent` to ask of credits-svc, before the payment intent of a
/// charge is resolved (a dispute or a refund may name only its charge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerAction {
    pub kind: credits::PaymentEventKind,
    /// The payment intent (`pi_…`), when the object names it.
    pub payment_intent: Option<String>,
    /// The charge (`ch_…`), when the object names it: how a payment intent is found
    /// for an object that names only its charge.
    pub charge: Option<String>,
    /// `PAYMENT_SUCCEEDED` only: who paid. Never set for refunds and disputes.
    pub user_id: Option<String>,
    /// See `PaymentEventRequest.amount_micros`: for `REFUNDED`, the cumulative amount.
    pub amount: Micros,
    /// The payment intent, charge, refund or dispute id, per kind.
    pub object_id: String,
    pub description: String,
    /// `PAYMENT_SUCCEEDED` of a payment made to save its card (`setup_future_usage`
    /// `off_session`): the customer and payment method to save for auto top-up.
    pub saved_card: Option<(String, String)>,
    /// `PAYMENT_SUCCEEDED` or `TOPUP_FAILED` of an auto top-up
    /// (`metadata.reeve_topup_attempt_id`).
    pub topup_attempt_id: Option<String>,
    /// `TOPUP_FAILED` only: Stripe's code for the failure.
    pub failure_code: Option<String>,
}

impl LedgerAction {
    /// The request, once the payment intent is known.
    pub fn request(&self, payment_id: &str) -> credits::PaymentEventRequest {
        credits::PaymentEventRequest {
            kind: self.kind.into(),
            payment_id: payment_id.to_owned(),
            user_id: self.user_id.clone().unwrap_or_default(),
            amount_micros: self.amount.0,
            object_id: self.object_id.clone(),
            description: self.description.clone(),
            saved_customer_id: self
                .saved_card
                .as_ref()
                .map(|(customer, _)| customer.clone())
                .unwrap_or_default(),
            saved_payment_method_id: self
                .saved_card
                .as_ref()
                .map(|(_, method)| method.clone())
                .unwrap_or_default(),
            topup_attempt_id: self.topup_attempt_id.clone().unwrap_or_default(),
            failure_code: self.failure_code.clone().unwrap_or_default(),
        }
    }

    /// Whether applying it moves money towards the user (a credit) or away (a debit).
    pub fn credits_user(&self) -> bool {
        matches!(
            self.kind,
            credits::PaymentEventKind::PaymentSucceeded
                | credits::PaymentEventKind::RefundFailed
                | credits::PaymentEventKind::DisputeFundsReinstated
        )
    }
}

/// What one event asks. One lives for the handling of one event, so the size of its
/// largest variant does not matter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Interpretation {
    /// One ledger action through credits-svc.
    Record(LedgerAction),
    /// Nothing to do; `outcome` is [`Outcome::Ignored`] or [`Outcome::IgnoredCurrency`].
    Ignore { outcome: Outcome, detail: String },
    /// Cannot be acted upon without a person (e.g. a payment without a user id).
    NeedsAttention(String),
}

/// Event types whose object belongs to a payment that may arrive after them: stored
/// as needing attention until it does, then applied.
pub const PAYMENT_FOLLOWERS: [&str; 7] = [
    "charge.refunded",
    "charge.refund.updated",
    "refund.updated",
    "refund.failed",
    "charge.dispute.created",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
];

fn text<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn owned(object: &Value, key: &str) -> Option<String> {
    text(object, key).map(str::to_owned)
}

fn cents(object: &Value, key: &str) -> Option<i64> {
    object.get(key).and_then(Value::as_i64)
}

fn positive_micros(cents: i64) -> Option<Micros> {
    Micros::from_cents(cents).filter(|m| m.0 > 0)
}

/// The customer and payment method a payment intent saved for off-session use (its
/// `setup_future_usage` is `off_session`), as ids (or expanded objects' ids).
fn saved_card(object: &Value) -> Option<(String, String)> {
    if text(object, "setup_future_usage") != Some("off_session") {
        return None;
    }
    let id_of =
        |key: &str| owned(object, key).or_else(|| object.get(key).and_then(|o| owned(o, "id")));
    Some((id_of("customer")?, id_of("payment_method")?))
}

/// The payment intent and charge an object names (a charge names itself).
pub fn payment_of(event_type: &str, object: &Value) -> (Option<String>, Option<String>) {
    match event_type {
        "payment_intent.succeeded" => (owned(object, "id"), owned(object, "latest_charge")),
        "checkout.session.completed" => (owned(object, "payment_intent"), None),
        "charge.refunded" => (owned(object, "payment_intent"), owned(object, "id")),
        t if PAYMENT_FOLLOWERS.contains(&t) => {
            (owned(object, "payment_intent"), owned(object, "charge"))
        }
        _ => (None, None),
    }
}

/// Decides what an event of `event_type` about `object` asks of the ledger.
pub fn interpret(event_type: &str, object: &Value, currency: &str) -> Interpretation {
    let currency_ok = object
        .get("currency")
        .and_then(Value::as_str)
        .is_some_and(|c| c.eq_ignore_ascii_case(currency));
    let wrong_currency = || Interpretation::Ignore {
        outcome: Outcome::IgnoredCurrency,
        detail: format!(
            "currency {:?} is not the configured {currency}; not applied",
            object.get("currency").and_then(Value::as_str).unwrap_or("")
        ),
    };
    let ignore = |detail: String| Interpretation::Ignore {
        outcome: Outcome::Ignored,
        detail,
    };
    let (payment_intent, charge) = payment_of(event_type, object);
    let action = |kind, amount, object_id: &str, description: String| {
        Interpretation::Record(LedgerAction {
            kind,
            payment_intent: payment_intent.clone(),
            charge: charge.clone(),
            // Only a payment names its user (below); never a refund or a dispute.
            user_id: None,
            amount,
            object_id: object_id.to_owned(),
            description,
            saved_card: None,
            topup_attempt_id: None,
            failure_code: None,
        })
    };
    match event_type {
        "payment_intent.succeeded" => {
            let Some(id) = text(object, "id") else {
                return Interpretation::NeedsAttention("payment intent without an id".to_owned());
            };
            if !currency_ok {
                return wrong_currency();
            }
            let Some(user_id) = object.get("metadata").and_then(|m| text(m, "user_id")) else {
                return Interpretation::NeedsAttention(format!(
                    "payment intent {id} has no metadata.user_id"
                ));
            };
            let Some(amount) = cents(object, "amount_received").and_then(positive_micros) else {
                return Interpretation::NeedsAttention(format!(
                    "payment intent {id} has no positive amount_received"
                ));
            };
            Interpretation::Record(LedgerAction {
                kind: credits::PaymentEventKind::PaymentSucceeded,
                payment_intent: Some(id.to_owned()),
                charge: charge.clone(),
                user_id: Some(user_id.to_owned()),
                amount,
                object_id: id.to_owned(),
                description: format!("Stripe payment {id}"),
                saved_card: saved_card(object),
                topup_attempt_id: object
                    .get("metadata")
                    .and_then(|m| owned(m, "reeve_topup_attempt_id")),
                failure_code: None,
            })
        }
        "payment_intent.payment_failed" | "payment_intent.canceled" => {
            topup_failed(event_type, object)
        }
        "checkout.session.completed" => {
            ignore("credited through payment_intent.succeeded".to_owned())
        }
        "charge.refunded" => {
            let Some(charge_id) = text(object, "id") else {
                return Interpretation::NeedsAttention("refunded charge without an id".to_owned());
            };
            if !currency_ok {
                return wrong_currency();
            }
            let Some(refunded) = cents(object, "amount_refunded") else {
                return Interpretation::NeedsAttention(format!(
                    "refunded charge {charge_id} has no amount_refunded"
                ));
            };
            let Some(amount) = positive_micros(refunded) else {
                return ignore(format!("charge {charge_id} has nothing refunded"));
            };
            action(
                credits::PaymentEventKind::Refunded,
                amount,
                charge_id,
                format!("Stripe refunds of {charge_id}"),
            )
        }
        "charge.refund.updated" | "refund.updated" | "refund.failed" => {
            let Some(refund) = text(object, "id") else {
                return Interpretation::NeedsAttention("refund without an id".to_owned());
            };
            match text(object, "status") {
                Some("failed") => {}
                // Stripe cancels only refunds that needed an action and never
                // completed; whether the charge reported them as refunded is for a
                // person to check against the ledger.
                Some("canceled") => {
                    return Interpretation::NeedsAttention(format!(
                        "refund {refund} was canceled; check whether it was debited"
                    ));
                }
                status => {
                    return ignore(format!(
                        "refund {refund} is {}: charge.refunded carries refunds",
                        status.unwrap_or("without a status")
                    ));
                }
            }
            if !currency_ok {
                return wrong_currency();
            }
            let Some(amount) = cents(object, "amount").and_then(positive_micros) else {
                return Interpretation::NeedsAttention(format!(
                    "failed refund {refund} has no positive amount"
                ));
            };
            action(
                credits::PaymentEventKind::RefundFailed,
                amount,
                refund,
                format!("Stripe refund {refund} failed: given back"),
            )
        }
        "charge.dispute.created"
        | "charge.dispute.funds_withdrawn"
        | "charge.dispute.funds_reinstated" => {
            let Some(dispute) = text(object, "id") else {
                return Interpretation::NeedsAttention("dispute without an id".to_owned());
            };
            let status = text(object, "status");
            if event_type == "charge.dispute.created" {
                match status {
                    Some(s) if s.starts_with("warning_") => {
                        return ignore(format!(
                            "dispute {dispute} is an inquiry ({s}): no funds withdrawn, not debited"
                        ));
                    }
                    Some(_) => {}
                    None => {
                        return Interpretation::NeedsAttention(format!(
                            "dispute {dispute} has no status: inquiry or withdrawal?"
                        ));
                    }
                }
            }
            if !currency_ok {
                return wrong_currency();
            }
            let Some(amount) = cents(object, "amount").and_then(positive_micros) else {
                return Interpretation::NeedsAttention(format!(
                    "dispute {dispute} has no positive amount"
                ));
            };
            if event_type == "charge.dispute.funds_reinstated" {
                action(
                    credits::PaymentEventKind::DisputeFundsReinstated,
                    amount,
                    dispute,
                    format!("Stripe dispute {dispute} won: funds reinstated"),
                )
            } else {
                action(
                    credits::PaymentEventKind::DisputeFundsWithdrawn,
                    amount,
                    dispute,
                    format!("Stripe dispute {dispute}"),
                )
            }
        }
        other => ignore(format!("event type {other} is not acted upon")),
    }
}

/// The code Stripe gives an off-session payment that needs the customer to
/// authenticate: the auto top-up worker left its attempt waiting for the user, and
/// the payment intent's `payment_intent.payment_failed` says only that again.
const AUTHENTICATION_REQUIRED: &str = "authentication_required";

/// The longest failure message passed on (a description holds 1,024 characters).
const MAX_FAILURE_MESSAGE_CHARS: usize = 500;

/// `payment_intent.payment_failed` or `payment_intent.canceled`: an auto top-up's
/// payment that will not complete fails its attempt (which otherwise waits for the
/// user, blocking every later top-up). Nothing was credited, so a payment that is not
/// an auto top-up's asks nothing.
fn topup_failed(event_type: &str, object: &Value) -> Interpretation {
    let Some(id) = text(object, "id") else {
        return Interpretation::NeedsAttention("payment intent without an id".to_owned());
    };
    let metadata = object.get("metadata");
    let Some(attempt) = metadata.and_then(|m| text(m, "reeve_topup_attempt_id")) else {
        return Interpretation::Ignore {
            outcome: Outcome::Ignored,
            detail: format!("payment intent {id} did not complete: nothing was credited"),
        };
    };
    let Some(user_id) = metadata.and_then(|m| text(m, "user_id")) else {
        return Interpretation::NeedsAttention(format!(
            "payment intent {id} of auto top-up {attempt} has no metadata.user_id"
        ));
    };
    let well_formed = reeve_runtime::ids::check_key(id, "payment_id")
        .and_then(|()| reeve_runtime::ids::check_key(attempt, "topup_attempt_id"))
        .and_then(|()| reeve_runtime::ids::check_user_id(user_id));
    if let Err(invalid) = well_formed {
        return Interpretation::NeedsAttention(format!(
            "a failed auto top-up payment names no usable payment, attempt or user: {}",
            invalid.message
        ));
    }
    let (code, message) = if event_type == "payment_intent.canceled" {
        let reason = text(object, "cancellation_reason").unwrap_or("unspecified");
        (
            "canceled",
            format!("the payment intent was canceled ({reason})"),
        )
    } else {
        let error = object.get("last_payment_error");
        // Without a code, whether the payment still waits for the user is unknown.
        let Some(code) = error.and_then(|e| text(e, "code")) else {
            return Interpretation::NeedsAttention(format!(
                "payment intent {id} of auto top-up {attempt} failed without a code: \
                 check whether it still waits for the user"
            ));
        };
        let message = error
            .and_then(|e| text(e, "message"))
            .unwrap_or("the payment failed");
        (code, message.to_owned())
    };
    if code == AUTHENTICATION_REQUIRED {
        return Interpretation::Ignore {
            outcome: Outcome::Ignored,
            detail: format!(
                "payment intent {id} of auto top-up {attempt} waits for the user's authentication"
            ),
        };
    }
    // Stripe's codes are short snake_case words; anything else is named generically.
    let stripe_like = code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    let code = if stripe_like { code } else { "payment_failed" };
    let message: String = message
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_FAILURE_MESSAGE_CHARS)
        .collect();
    Interpretation::Record(LedgerAction {
        kind: credits::PaymentEventKind::TopupFailed,
        payment_intent: Some(id.to_owned()),
        charge: None,
        user_id: Some(user_id.to_owned()),
        amount: Micros::ZERO,
        object_id: id.to_owned(),
        description: message,
        saved_card: None,
        topup_attempt_id: Some(attempt.to_owned()),
        failure_code: Some(code.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use credits::PaymentEventKind as Kind;
    use serde_json::json;

    const CREDIT: i64 = 1_000_000;

    fn charge(refunded: i64) -> Value {
        json!({"id": "ch_1", "object": "charge", "amount": 2500, "amount_refunded": refunded,
               "currency": "usd", "payment_intent": "pi_1", "metadata": {}})
    }

    fn dispute(status: &str) -> Value {
        json!({"id": "dp_1", "object": "dispute", "amount": 1000, "currency": "usd",
               "charge": "ch_1", "payment_intent": null, "status": status, "metadata": {}})
    }

    fn refund(status: &str) -> Value {
        json!({"id": "re_1", "object": "refund", "amount": 500, "currency": "usd",
               "charge": "ch_1", "payment_intent": "pi_1", "status": status})
    }

    fn recorded(event_type: &str, object: &Value) -> LedgerAction {
        match interpret(event_type, object, "usd") {
            Interpretation::Record(action) => action,
            other => panic!("{event_type}: {other:?}"),
        }
    }

    fn outcome(event_type: &str, object: &Value) -> Option<Outcome> {
        match interpret(event_type, object, "usd") {
            Interpretation::Record(_) => None,
            Interpretation::Ignore { outcome, .. } => Some(outcome),
            Interpretation::NeedsAttention(_) => Some(Outcome::NeedsAttention),
        }
    }

    #[test]
    fn a_payment_saving_its_card_names_it_and_a_top_up_names_its_attempt() {
        let pi = json!({"id": "pi_1", "amount_received": 2500, "currency": "usd",
                        "customer": "cus_1", "payment_method": "pm_1",
                        "setup_future_usage": "off_session",
                        "metadata": {"user_id": "alice"}});
        let request = recorded("payment_intent.succeeded", &pi).request("pi_1");
        assert_eq!(request.saved_customer_id, "cus_1");
        assert_eq!(request.saved_payment_method_id, "pm_1");
        let pi = json!({"id": "pi_2", "amount_received": 2500, "currency": "usd",
                        "customer": "cus_1", "payment_method": "pm_1",
                        "setup_future_usage": null,
                        "metadata": {"user_id": "alice", "reeve_topup_attempt_id": "topup_1"}});
        let request = recorded("payment_intent.succeeded", &pi).request("pi_2");
        assert_eq!(request.saved_customer_id, "");
        assert_eq!(request.topup_attempt_id, "topup_1");
    }

    /// `payment_intent.payment_failed` and `payment_intent.canceled`, as a table: only
    /// an auto top-up's payment asks anything, and never for money.
    #[test]
    fn a_failed_or_canceled_top_up_payment_fails_its_attempt_and_nothing_else_does() {
        let top_up = |error: Value| {
            json!({"id": "pi_9", "object": "payment_intent", "status": "requires_payment_method",
                   "amount": 2000, "amount_received": 0, "currency": "usd",
                   "last_payment_error": error, "cancellation_reason": null,
                   "metadata": {"user_id": "bob", "reeve_topup_attempt_id": "topup_7"}})
        };
        let failed_auth = top_up(json!({"type": "card_error",
            "code": "payment_intent_authentication_failure",
            "message": "The provided PaymentMethod has failed authentication.\u{0}\n"}));
        let mut canceled = top_up(Value::Null);
        canceled["status"] = json!("canceled");
        canceled["cancellation_reason"] = json!("abandoned");
        let mut checkout = top_up(json!({"code": "card_declined"}));
        checkout["metadata"] = json!({"user_id": "bob"});
        let mut odd_code = top_up(json!({"code": "drop table;", "message": "x"}));
        odd_code["currency"] = json!("eur");
        let mut no_user = top_up(json!({"code": "card_declined"}));
        no_user["metadata"] = json!({"reeve_topup_attempt_id": "topup_7"});
        let mut bad_attempt = top_up(json!({"code": "card_declined"}));
        bad_attempt["metadata"]["reeve_topup_attempt_id"] = json!("a\u{0}b");
        // (event, object, the failure code asked; None: nothing asked)
        let cases: [(&str, &Value, Option<&str>); 6] = [
            (
                "payment_intent.payment_failed",
                &failed_auth,
                Some("payment_intent_authentication_failure"),
            ),
            ("payment_intent.canceled", &canceled, Some("canceled")),
            // Another currency moves nothing either way: still failed.
            (
                "payment_intent.payment_failed",
                &odd_code,
                Some("payment_failed"),
            ),
            // The worker's own answer: the attempt already waits for the user.
            (
                "payment_intent.payment_failed",
                &top_up(json!({"code": "authentication_required"})),
                None,
            ),
            ("payment_intent.payment_failed", &checkout, None),
            ("payment_intent.canceled", &checkout, None),
        ];
        for (event_type, object, expected) in cases {
            match (interpret(event_type, object, "usd"), expected) {
                (Interpretation::Record(action), Some(code)) => {
                    assert_eq!(action.kind, Kind::TopupFailed, "{event_type} {object}");
                    assert_eq!(action.amount, Micros::ZERO);
                    assert!(!action.credits_user());
                    let request = action.request("pi_9");
                    assert_eq!(request.failure_code, code, "{object}");
                    assert_eq!(request.topup_attempt_id, "topup_7");
                    assert_eq!(request.user_id, "bob");
                    assert_eq!(request.payment_id, "pi_9");
                    assert!(
                        reeve_runtime::ids::check_description(&request.description).is_ok(),
                        "{:?}",
                        request.description
                    );
                }
                (Interpretation::Ignore { outcome, .. }, None) => {
                    assert_eq!(outcome, Outcome::Ignored, "{event_type} {object}");
                }
                (other, _) => panic!("{event_type} {object}: {other:?}"),
            }
        }
        let no_code = top_up(Value::Null);
        for object in [&no_user, &bad_attempt, &no_code] {
            assert!(
                matches!(
                    interpret("payment_intent.payment_failed", object, "usd"),
                    Interpretation::NeedsAttention(_)
                ),
                "{object}"
            );
        }
    }

    #[test]
    fn payment_intent_credits_amount_received_to_its_metadata_user() {
        let pi = json!({"id": "pi_1", "amount_received": 2500, "currency": "usd",
                        "latest_charge": "ch_1", "metadata": {"user_id": "alice"}});
        let action = recorded("payment_intent.succeeded", &pi);
        assert_eq!(
            action,
            LedgerAction {
                kind: Kind::PaymentSucceeded,
                payment_intent: Some("pi_1".to_owned()),
                charge: Some("ch_1".to_owned()),
                user_id: Some("alice".to_owned()),
                amount: Micros(25 * CREDIT),
                object_id: "pi_1".to_owned(),
                description: "Stripe payment pi_1".to_owned(),
                saved_card: None,
                topup_attempt_id: None,
                failure_code: None,
            }
        );
        let request = action.request("pi_1");
        assert_eq!(
            (
                request.kind,
                request.user_id.as_str(),
                request.amount_micros
            ),
            (Kind::PaymentSucceeded as i32, "alice", 25 * CREDIT)
        );
    }

    #[test]
    fn unusable_payments_are_not_credited() {
        let eur = json!({"id": "pi_1", "amount_received": 2500, "currency": "eur", "metadata": {"user_id": "alice"}});
        let anonymous =
            json!({"id": "pi_1", "amount_received": 2500, "currency": "usd", "metadata": {}});
        let nothing = json!({"id": "pi_1", "amount_received": 0, "currency": "usd", "metadata": {"user_id": "alice"}});
        let table = [
            (eur, Outcome::IgnoredCurrency),
            (anonymous, Outcome::NeedsAttention),
            (nothing, Outcome::NeedsAttention),
        ];
        for (pi, expected) in table {
            assert_eq!(
                outcome("payment_intent.succeeded", &pi),
                Some(expected),
                "{pi}"
            );
        }
        // The session's client_reference_id never credits: the payment intent does.
        let session = json!({"id": "cs_1", "payment_intent": "pi_1", "client_reference_id": "alice", "currency": "usd"});
        assert_eq!(
            outcome("checkout.session.completed", &session),
            Some(Outcome::Ignored)
        );
    }

    /// Item 1: a refund or dispute never names a user, whatever its metadata says.
    #[test]
    fn refunds_and_disputes_never_carry_a_user() {
        let mut named = charge(2500);
        named["metadata"] = json!({"user_id": "mallory"});
        let mut dispute_named = dispute("needs_response");
        dispute_named["metadata"] = json!({"user_id": "mallory"});
        for (event_type, object) in [
            ("charge.refunded", named),
            ("charge.dispute.created", dispute_named.clone()),
            ("charge.dispute.funds_withdrawn", dispute_named.clone()),
            ("charge.dispute.funds_reinstated", dispute_named),
            ("charge.refund.updated", refund("failed")),
        ] {
            let action = recorded(event_type, &object);
            assert_eq!(action.user_id, None, "{event_type}");
            assert_eq!(action.request("pi_1").user_id, "", "{event_type}");
        }
    }

    /// Item 2: every `charge.refunded` asks for the cumulative amount refunded, with or
    /// without `previous_attributes` (which the interpretation never reads).
    #[test]
    fn refunds_ask_for_the_cumulative_amount_refunded() {
        let table = [(500, 5 * CREDIT), (1300, 13 * CREDIT), (2500, 25 * CREDIT)];
        for (refunded, micros) in table {
            let action = recorded("charge.refunded", &charge(refunded));
            assert_eq!(
                (
                    action.kind,
                    action.amount,
                    action.object_id.as_str(),
                    action.payment_intent.as_deref()
                ),
                (Kind::Refunded, Micros(micros), "ch_1", Some("pi_1")),
            );
        }
        assert_eq!(
            outcome("charge.refunded", &charge(0)),
            Some(Outcome::Ignored)
        );
        let mut missing = charge(500);
        missing.as_object_mut().map(|o| o.remove("amount_refunded"));
        assert_eq!(
            outcome("charge.refunded", &missing),
            Some(Outcome::NeedsAttention)
        );
        let mut eur = charge(500);
        eur["currency"] = json!("eur");
        assert_eq!(
            outcome("charge.refunded", &eur),
            Some(Outcome::IgnoredCurrency)
        );
    }

    /// Items 3 and 4: inquiries withdraw nothing; a withdrawal and a reinstatement are
    /// keyed by the dispute, so credits-svc can give back exactly what it took.
    #[test]
    fn disputes_debit_only_when_funds_are_withdrawn() {
        let table: [(&str, &str, Option<Kind>); 10] = [
            ("charge.dispute.created", "warning_needs_response", None),
            ("charge.dispute.created", "warning_under_review", None),
            ("charge.dispute.created", "warning_closed", None),
            (
                "charge.dispute.created",
                "needs_response",
                Some(Kind::DisputeFundsWithdrawn),
            ),
            (
                "charge.dispute.created",
                "under_review",
                Some(Kind::DisputeFundsWithdrawn),
            ),
            (
                "charge.dispute.created",
                "lost",
                Some(Kind::DisputeFundsWithdrawn),
            ),
            (
                "charge.dispute.funds_withdrawn",
                "needs_response",
                Some(Kind::DisputeFundsWithdrawn),
            ),
            (
                "charge.dispute.funds_reinstated",
                "won",
                Some(Kind::DisputeFundsReinstated),
            ),
            ("charge.dispute.closed", "lost", None),
            ("charge.dispute.updated", "under_review", None),
        ];
        for (event_type, status, expected) in table {
            match (interpret(event_type, &dispute(status), "usd"), expected) {
                (Interpretation::Record(action), Some(kind)) => {
                    assert_eq!(
                        (
                            action.kind,
                            action.amount,
                            action.object_id.as_str(),
                            action.charge.as_deref(),
                            action.payment_intent
                        ),
                        (kind, Micros(10 * CREDIT), "dp_1", Some("ch_1"), None),
                        "{event_type} {status}"
                    );
                }
                (Interpretation::Ignore { outcome, .. }, None) => {
                    assert_eq!(outcome, Outcome::Ignored, "{event_type} {status}")
                }
                (other, expected) => panic!("{event_type} {status}: {other:?}, not {expected:?}"),
            }
        }
        let mut unknown = dispute("needs_response");
        unknown.as_object_mut().map(|o| o.remove("status"));
        assert_eq!(
            outcome("charge.dispute.created", &unknown),
            Some(Outcome::NeedsAttention)
        );
    }

    /// Item 16: a failed refund gives its amount back; other refund updates do nothing.
    #[test]
    fn failed_refunds_give_back_their_amount() {
        for event_type in ["charge.refund.updated", "refund.updated", "refund.failed"] {
            let action = recorded(event_type, &refund("failed"));
            assert_eq!(
                (
                    action.kind,
                    action.amount,
                    action.object_id.as_str(),
                    action.payment_intent.as_deref(),
                    action.charge.as_deref()
                ),
                (
                    Kind::RefundFailed,
                    Micros(5 * CREDIT),
                    "re_1",
                    Some("pi_1"),
                    Some("ch_1")
                ),
            );
            assert!(action.credits_user());
        }
        for status in ["succeeded", "pending", "requires_action"] {
            assert_eq!(
                outcome("charge.refund.updated", &refund(status)),
                Some(Outcome::Ignored)
            );
        }
        assert_eq!(
            outcome("charge.refund.updated", &refund("canceled")),
            Some(Outcome::NeedsAttention)
        );
        assert_eq!(
            outcome("refund.created", &refund("succeeded")),
            Some(Outcome::Ignored)
        );
    }

    #[test]
    fn objects_are_found_by_their_payment() {
        assert_eq!(
            payment_of("charge.dispute.created", &dispute("lost")),
            (None, Some("ch_1".to_owned()))
        );
        assert_eq!(
            payment_of("charge.refunded", &charge(1)),
            (Some("pi_1".to_owned()), Some("ch_1".to_owned()))
        );
        assert_eq!(
            payment_of("customer.created", &json!({"id": "cus_1"})),
            (None, None)
        );
    }
}
