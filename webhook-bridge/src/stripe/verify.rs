//! Stripe's signed deliveries: checking the signature and reading the event.
//!
//! The signature (`Stripe-Signature`, 5-minute tolerance) is checked by async-stripe's
//! webhook support before anything else; an unverified body is never stored or acted
//! upon. This module only says whether a body is a genuine event and reads the fields
//! acted upon; what the event means is [`crate::stripe::interpret`], acting on it is
//! [`crate::stripe::apply`].

use serde_json::Value;

use crate::error::ApiError;

/// A verified event, read leniently: only the fields acted upon are required.
#[derive(Debug, Clone)]
pub struct Verified {
    pub id: String,
    pub event_type: String,
    pub object: Value,
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

/// The fields acted upon, from an event's JSON (as received, or as stored after it was
/// verified); `None` without an id or a type.
pub fn read_event(payload: &str) -> Option<Verified> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_unit";

    #[test]
    fn a_signed_event_is_read() {
        let payload = r#"{"id":"evt_1","type":"charge.refunded","data":{"object":{"id":"ch_1"},"previous_attributes":{"amount_refunded":0}}}"#;
        let header = stripe_webhook::Webhook::generate_test_header(payload, SECRET, None);
        let event =
            verify(payload.as_bytes(), Some(&header), SECRET).map_err(|e| e.code().to_owned());
        let event = event.as_ref().map(|e| {
            (
                e.id.as_str(),
                e.event_type.as_str(),
                e.object["id"].as_str(),
            )
        });
        assert_eq!(event, Ok(("evt_1", "charge.refunded", Some("ch_1"))));
    }

    #[test]
    fn unverified_bodies_are_refused_with_their_code() {
        let payload = r#"{"id":"evt_1","type":"x","data":{"object":{}}}"#;
        let other = stripe_webhook::Webhook::generate_test_header(payload, "whsec_other", None);
        let cases = [
            (None, "missing_signature"),
            (Some("garbage".to_owned()), "malformed_signature"),
            (Some(other), "invalid_signature"),
        ];
        for (header, code) in cases {
            let refused = verify(payload.as_bytes(), header.as_deref(), SECRET).err();
            assert_eq!(refused.as_ref().map(ApiError::code), Some(code));
        }
        assert!(read_event(r#"{"type":"x"}"#).is_none(), "an id is required");
    }
}
