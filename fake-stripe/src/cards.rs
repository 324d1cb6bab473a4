//! Saved cards and off-session payments, as Stripe does them, for auto top-up.
//!
//! A Checkout Session created with `payment_intent_data[setup_future_usage]` (and a
//! `customer`, or `customer_creation=always`) saves the card it is paid with: paying
//! it creates the customer when none was given and attaches a new payment method
//! (`pm_…`) that behaves like the test card the payer chose (`?payment_method=` on the
//! pay URL, default `pm_card_visa`). The checkout payment itself always succeeds (the
//! customer is present); the card's behaviour applies to later off-session charges:
//!
//! | test card | off-session `POST /v1/payment_intents` |
//! |---|---|
//! | `pm_card_visa` | 200, status `succeeded`, `payment_intent.succeeded` sent |
//! | `pm_card_chargeDeclined`, `pm_card_chargeCustomerFail` | 402 `card_error`, code `card_declined`, `payment_intent.payment_failed` sent |
//! | `pm_card_authenticationRequired` | 200, status `requires_action` (a `redirect_to_url` next action; visiting it completes the payment and sends `payment_intent.succeeded`; visiting it with `/fail` appended fails the authentication and sends `payment_intent.payment_failed`) |
//!
//! `Idempotency-Key` is honoured as Stripe does: the same key with the same parameters
//! answers the first answer again (`Idempotent-Replayed: true`) and charges nothing;
//! the same key with other parameters is a 400 `idempotency_error`.

use std::collections::HashMap;

use serde_json::{Value, json};

/// How a saved card behaves off-session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardBehaviour {
    Succeeds,
    Declines,
    RequiresAction,
}

impl CardBehaviour {
    /// The behaviour of one of Stripe's test payment methods, by its name.
    pub fn of_test_card(name: &str) -> Option<CardBehaviour> {
        match name {
            "pm_card_visa" | "pm_card_mastercard" => Some(CardBehaviour::Succeeds),
            "pm_card_chargeDeclined" | "pm_card_chargeCustomerFail" => {
                Some(CardBehaviour::Declines)
            }
            "pm_card_authenticationRequired" => Some(CardBehaviour::RequiresAction),
            _ => None,
        }
    }
}

/// A payment method attached to a customer.
#[derive(Debug, Clone)]
pub struct SavedCard {
    pub customer: String,
    pub behaviour: CardBehaviour,
    /// The test card it was made from, e.g. `pm_card_visa`.
    pub test_card: String,
}

/// What a checkout session must do with its card once paid.
#[derive(Debug, Clone, Default)]
pub struct SessionSetup {
    /// `payment_intent_data[setup_future_usage]`.
    pub setup_future_usage: Option<String>,
    /// `customer`: an existing customer of ours.
    pub customer: Option<String>,
    /// `customer_creation`.
    pub customer_creation: Option<String>,
}

impl SessionSetup {
    /// Whether paying saves the card for later.
    pub fn saves_card(&self) -> bool {
        self.setup_future_usage.is_some()
    }
}

/// The first answer to an idempotency key: what was asked, and what was answered.
#[derive(Debug, Clone)]
pub struct Answered {
    pub fingerprint: String,
    pub status: u16,
    pub body: Value,
}

/// Customers, their cards and the off-session payments made with them.
#[derive(Debug, Default)]
pub struct Cards {
    pub customers: HashMap<String, Vec<String>>,
    pub payment_methods: HashMap<String, SavedCard>,
    pub sessions: HashMap<String, SessionSetup>,
    pub idempotency: HashMap<String, Answered>,
    /// Payment intents waiting for the customer's authentication: id → intent.
    pub awaiting_action: HashMap<String, Value>,
    /// Every off-session payment intent created (not replays), oldest first.
    pub off_session_created: Vec<Value>,
    /// How many requests were answered from a saved idempotency key.
    pub replays: u64,
}

/// Stripe's 402 for a declined card.
pub fn declined_body(payment_intent: &str, payment_method: &str) -> Value {
    json!({"error": {
        "type": "card_error",
        "code": "card_declined",
        "decline_code": "generic_decline",
        "message": "Your card was declined.",
        "charge": null,
        "doc_url": "https://stripe.com/docs/error-codes/card-declined",
        "param": null,
        "payment_method_type": "card",
        "request_log_url": null,
        "payment_intent_id": payment_intent,
        "payment_method_id": payment_method,
    }})
}
