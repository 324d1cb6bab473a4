//! Standard Webhooks signatures (through the `standardwebhooks` crate) and endpoint
//! secrets (`whsec_` and base64 of 24 random bytes). During a rotation the message is
//! signed with each live secret: `webhook-signature` holds several `v1,…`, separated by
//! spaces, and a receiver accepts any one it knows.

use base64::Engine;

use crate::EventsError;

pub const SECRET_PREFIX: &str = "whsec_";

/// A new endpoint secret.
pub fn generate_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The `webhook-signature` value: one `v1,<base64>` per secret.
pub fn signature_header(
    secrets: &[&str],
    msg_id: &str,
    timestamp_secs: i64,
    payload: &[u8],
) -> Result<String, EventsError> {
    let mut signatures = Vec::with_capacity(secrets.len());
    for secret in secrets {
        let webhook = standardwebhooks::Webhook::new(secret)
            .map_err(|error| EventsError::Signing(error.to_string()))?;
        signatures.push(
            webhook
                .sign(msg_id, timestamp_secs, payload)
                .map_err(|error| EventsError::Signing(error.to_string()))?,
        );
    }
    Ok(signatures.join(" "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_live_secret_verifies_alone() {
        let (old, new) = (generate_secret(), generate_secret());
        assert!(old.starts_with("whsec_"));
        let payload = br#"{"id":"evt_1"}"#;
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap();
        let header = signature_header(&[&new, &old], "evt_1", now, payload).unwrap();
        assert_eq!(header.split(' ').count(), 2);
        for secret in [&old, &new] {
            let mut headers = http::HeaderMap::new();
            headers.insert("webhook-id", "evt_1".parse().unwrap());
            headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
            headers.insert("webhook-signature", header.parse().unwrap());
            standardwebhooks::Webhook::new(secret)
                .unwrap()
                .verify(payload, &headers)
                .unwrap();
        }
    }
}
