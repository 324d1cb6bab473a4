//! Stripe-shaped JSON objects (checkout.session, payment_intent, charge, dispute, event),
//! with the fields Stripe's API reference lists for them, so that Stripe's own client
//! library parses them as it parses the real ones.

use serde_json::{Value, json};

/// A checkout session as Stripe answers `POST /v1/checkout/sessions`.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub created: i64,
    pub amount_total: i64,
    pub currency: String,
    pub client_reference_id: Option<String>,
    pub metadata: serde_json::Map<String, Value>,
    pub payment_intent_metadata: serde_json::Map<String, Value>,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
    pub url: String,
    /// Set once paid.
    pub payment_intent: Option<String>,
}

impl Session {
    pub fn to_json(&self) -> Value {
        let paid = self.payment_intent.is_some();
        json!({
            "id": self.id,
            "object": "checkout.session",
            "adaptive_pricing": {"enabled": false},
            "after_expiration": null,
            "allow_promotion_codes": null,
            "amount_subtotal": self.amount_total,
            "amount_total": self.amount_total,
            "automatic_tax": {"enabled": false, "liability": null, "provider": null, "status": null},
            "billing_address_collection": null,
            "cancel_url": self.cancel_url,
            "client_reference_id": self.client_reference_id,
            "client_secret": null,
            "collected_information": null,
            "consent": null,
            "consent_collection": null,
            "created": self.created,
            "currency": self.currency,
            "currency_conversion": null,
            "custom_fields": [],
            "custom_text": {"after_submit": null, "shipping_address": null, "submit": null, "terms_of_service_acceptance": null},
            "customer": null,
            "customer_account": null,
            "customer_creation": "if_required",
            "customer_details": null,
            "customer_email": null,
            "discounts": [],
            "expires_at": self.created + 24 * 3600,
            "integration_identifier": null,
            "invoice": null,
            "invoice_creation": {"enabled": false, "invoice_data": {"account_tax_ids": null, "custom_fields": null, "description": null, "footer": null, "issuer": null, "metadata": {}, "rendering_options": null}},
            "livemode": false,
            "locale": null,
            "metadata": self.metadata,
            "mode": "payment",
            "origin_context": null,
            "payment_intent": self.payment_intent,
            "payment_link": null,
            "payment_method_collection": "if_required",
            "payment_method_configuration_details": null,
            "payment_method_options": {},
            "payment_method_types": ["card"],
            "payment_status": if paid { "paid" } else { "unpaid" },
            "permissions": null,
            "phone_number_collection": {"enabled": false},
            "recovered_from": null,
            "saved_payment_method_options": null,
            "setup_intent": null,
            "shipping_address_collection": null,
            "shipping_cost": null,
            "shipping_options": [],
            "status": if paid { "complete" } else { "open" },
            "submit_type": null,
            "subscription": null,
            "success_url": self.success_url,
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted",
            "url": if paid { Value::Null } else { Value::String(self.url.clone()) },
            "wallet_options": null
        })
    }
}

/// A succeeded payment intent of `amount` (smallest currency unit).
pub fn payment_intent(
    id: &str,
    charge_id: &str,
    amount: i64,
    currency: &str,
    metadata: &serde_json::Map<String, Value>,
    created: i64,
) -> Value {
    json!({
        "id": id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_details": {"tip": {}},
        "amount_received": amount,
        "application": null,
        "application_fee_amount": null,
        "automatic_payment_methods": null,
        "canceled_at": null,
        "cancellation_reason": null,
        "capture_method": "automatic",
        "client_secret": format!("{id}_secret_fake"),
        "confirmation_method": "automatic",
        "created": created,
        "currency": currency,
        "customer": null,
        "customer_account": null,
        "description": null,
        "excluded_payment_method_types": null,
        "last_payment_error": null,
        "latest_charge": charge_id,
        "livemode": false,
        "metadata": metadata,
        "next_action": null,
        "on_behalf_of": null,
        "payment_method": "pm_card_visa",
        "payment_method_configuration_details": null,
        "payment_method_options": {},
        "payment_method_types": ["card"],
        "processing": null,
        "receipt_email": null,
        "review": null,
        "setup_future_usage": null,
        "shipping": null,
        "source": null,
        "statement_descriptor": null,
        "statement_descriptor_suffix": null,
        "status": "succeeded",
        "transfer_data": null,
        "transfer_group": null
    })
}

/// A charge of a payment intent, `amount_refunded` of it refunded so far.
pub fn charge(
    id: &str,
    payment_intent: &str,
    amount: i64,
    amount_refunded: i64,
    currency: &str,
    created: i64,
) -> Value {
    json!({
        "id": id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "application": null,
        "application_fee": null,
        "application_fee_amount": null,
        "balance_transaction": null,
        "billing_details": {"address": null, "email": null, "name": null, "phone": null, "tax_id": null},
        "calculated_statement_descriptor": "REEVE CREDITS",
        "captured": true,
        "created": created,
        "currency": currency,
        "customer": null,
        "description": null,
        "disputed": false,
        "failure_balance_transaction": null,
        "failure_code": null,
        "failure_message": null,
        "fraud_details": {},
        "livemode": false,
        "metadata": {},
        "on_behalf_of": null,
        "outcome": null,
        "paid": true,
        "payment_intent": payment_intent,
        "payment_method": "pm_card_visa",
        "payment_method_details": null,
        "receipt_email": null,
        "receipt_number": null,
        "receipt_url": null,
        "refunded": amount_refunded >= amount,
        "review": null,
        "shipping": null,
        "source": null,
        "source_transfer": null,
        "statement_descriptor": null,
        "statement_descriptor_suffix": null,
        "status": "succeeded",
        "transfer_data": null,
        "transfer_group": null
    })
}

/// An event wrapping `object`; `previous` becomes `data.previous_attributes`.
pub fn event(
    id: &str,
    event_type: &str,
    object: Value,
    previous: Option<Value>,
    created: i64,
) -> Value {
    let mut data = json!({ "object": object });
    if let (Some(previous), Some(map)) = (previous, data.as_object_mut()) {
        map.insert("previous_attributes".to_owned(), previous);
    }
    json!({
        "id": id,
        "object": "event",
        "api_version": null,
        "created": created,
        "data": data,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": event_type
    })
}
