//! Credit lots on REST: `GET /api/credits/lots` (the signed-in user's live lots, in the
//! order deductions spend them) and `POST /api/credits/grants` (an operator's grant,
//! service token with the `admin` scope, paid or promotional, with a priority and an
//! expiry).
//!
//! The request's lot terms are read here into their gRPC form, each refusal with its
//! own code (`invalid_category`, `invalid_priority`, `invalid_expires_at`); whether an
//! expiry is still in the future is decided by credits-svc on the ledger's clock, never
//! here, so the bridge and the ledger cannot disagree about an instant.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use reeve_proto::credits::v1 as pb;
use reeve_runtime::Micros;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::AppState;
use crate::amount;
use crate::auth::{Service, User};
use crate::error::ApiError;
use crate::routes::credits::Entry;
use crate::routes::{JsonBody, timestamp};

/// Highest (last spent) lot priority; 0 is spent first.
pub const MAX_PRIORITY: i64 = 100;

/// One lot of credits.
#[derive(Debug, Serialize, ToSchema)]
pub struct Lot {
    pub id: i64,
    /// paid | promotional
    pub category: String,
    /// 0 to 100: lower is spent first.
    pub priority: i32,
    /// What the credit put in, decimal credits with six places.
    pub original: String,
    pub original_micros: i64,
    /// What is left of it.
    pub remaining: String,
    pub remaining_micros: i64,
    /// RFC 3339, UTC; null when the lot never expires.
    pub expires_at: Option<String>,
    /// The payment intent id (purchases) or the idempotency key of the credit.
    pub source: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// The REST name of a lot category.
pub fn category_name(category: i32) -> &'static str {
    match pb::CreditCategory::try_from(category) {
        Ok(pb::CreditCategory::Paid) => "paid",
        Ok(pb::CreditCategory::Promotional) => "promotional",
        _ => "unknown",
    }
}

impl From<pb::Lot> for Lot {
    fn from(lot: pb::Lot) -> Lot {
        Lot {
            id: lot.lot_id,
            category: category_name(lot.category).to_owned(),
            priority: lot.priority,
            original: Micros(lot.original_micros).to_string(),
            original_micros: lot.original_micros,
            remaining: Micros(lot.remaining_micros).to_string(),
            remaining_micros: lot.remaining_micros,
            expires_at: lot.expires_at.map(timestamp),
            source: lot.source,
            created_at: lot.created_at.map(timestamp).unwrap_or_default(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Lots {
    pub user_id: String,
    /// The live lots (something left, not expired), in spending order: priority
    /// ascending, then the earliest expiry (never-expiring last), then promotional
    /// before paid, then the oldest.
    pub lots: Vec<Lot>,
}

#[utoipa::path(get, path = "/api/credits/lots", tag = "credits",
    responses((status = 200, body = Lots), (status = 401, body = crate::openapi::ErrorBody)),
    security(("user_jwt" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    User(user_id): User,
) -> Result<Json<Lots>, ApiError> {
    let reply = state
        .credits()
        .list_lots(pb::ListLotsRequest {
            user_id: user_id.clone(),
            include_spent: false,
        })
        .await?
        .into_inner();
    Ok(Json(Lots {
        user_id,
        lots: reply.lots.into_iter().map(Lot::from).collect(),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct GrantBody {
    pub user_id: String,
    /// Positive decimal credits, e.g. 5 or "0.5" (at most six decimals).
    #[schema(value_type = String, example = "5")]
    pub amount: Box<RawValue>,
    /// Unique per grant: a retry with the same key and request grants once.
    pub idempotency_key: String,
    /// "paid" or "promotional" (the default).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "promotional")]
    pub category: Option<Box<RawValue>>,
    /// 0 to 100, lower spent first; default 10 (promotional) or 50 (paid).
    #[serde(default)]
    #[schema(value_type = Option<i32>, example = 10)]
    pub priority: Option<Box<RawValue>>,
    /// RFC 3339, in the future, at most microsecond precision; absent: never expires.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "2030-01-01T00:00:00Z")]
    pub expires_at: Option<Box<RawValue>>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Granted {
    pub entry: Entry,
    /// True when the key had been applied before: `entry` is the original.
    pub duplicate: bool,
}

fn category(raw: &RawValue) -> Result<pb::CreditCategory, ApiError> {
    match serde_json::from_str::<String>(raw.get()).as_deref() {
        Ok("paid") => Ok(pb::CreditCategory::Paid),
        Ok("promotional") => Ok(pb::CreditCategory::Promotional),
        _ => Err(ApiError::bad_request(
            "invalid_category",
            "category must be \"paid\" or \"promotional\"",
        )),
    }
}

fn priority(raw: &RawValue) -> Result<i32, ApiError> {
    crate::routes::whole_number(raw)
        .filter(|p| (0..=MAX_PRIORITY).contains(p))
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_priority",
                format!("priority must be a whole number from 0 to {MAX_PRIORITY}"),
            )
        })
}

/// An RFC 3339 instant as a protobuf timestamp, to the microsecond (the ledger's unit).
pub fn expires_at(text: &str) -> Result<prost_types::Timestamp, ApiError> {
    let invalid = |why: &str| {
        ApiError::bad_request(
            "invalid_expires_at",
            format!("expires_at must be an RFC 3339 instant such as 2030-01-01T00:00:00Z: {why}"),
        )
    };
    let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| invalid(&e.to_string()))?;
    let nanos = at.timestamp_subsec_nanos();
    if nanos % 1_000 != 0 {
        return Err(invalid("at most six decimals of a second"));
    }
    Ok(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(nanos).map_err(|_| invalid("leap seconds are not instants"))?,
    })
}

fn grant_request(body: GrantBody) -> Result<pb::AddCreditsRequest, ApiError> {
    let amount = amount::parse_positive(&body.amount)?;
    let category = body.category.as_deref().map(category).transpose()?;
    let priority = body.priority.as_deref().map(priority).transpose()?;
    let expires_at = match body.expires_at.as_deref() {
        None => None,
        Some(raw) => {
            let text = serde_json::from_str::<String>(raw.get()).map_err(|_| {
                ApiError::bad_request(
                    "invalid_expires_at",
                    "expires_at must be an RFC 3339 string",
                )
            })?;
            Some(expires_at(&text)?)
        }
    };
    Ok(pb::AddCreditsRequest {
        user_id: body.user_id,
        amount_micros: amount.0,
        idempotency_key: body.idempotency_key,
        kind: pb::CreditKind::Grant.into(),
        description: body.description,
        category: category.unwrap_or(pb::CreditCategory::Unspecified).into(),
        priority,
        expires_at,
    })
}

/// A grant makes one lot: promotional unless `category` is "paid". A debt is paid
/// first; only the rest becomes the lot.
#[utoipa::path(post, path = "/api/credits/grants", tag = "credits", request_body = GrantBody,
    responses((status = 200, body = Granted),
        (status = 400, description = "a refused value: invalid_amount (and the other amount codes), invalid_user_id, invalid_idempotency_key, invalid_description, invalid_category, invalid_priority, invalid_expires_at (malformed, or not in the future)", body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody),
        (status = 403, description = "insufficient_scope: grants need the admin scope", body = crate::openapi::ErrorBody),
        (status = 409, description = "idempotency_key_reused: the key was used for another request", body = crate::openapi::ErrorBody)),
    security(("service_token" = [])))]
pub async fn grant(
    State(state): State<Arc<AppState>>,
    _service: Service,
    JsonBody(body): JsonBody<GrantBody>,
) -> Result<Json<Granted>, ApiError> {
    let request = grant_request(body)?;
    let reply = state.credits().add_credits(request).await?.into_inner();
    let entry = reply.entry.ok_or_else(|| ApiError::Internal {
        code: "backend_error",
        message: "credits-svc sent no entry".to_owned(),
    })?;
    Ok(Json(Granted {
        entry: entry.into(),
        duplicate: reply.duplicate,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn lot_terms_are_read_exactly() {
        assert_eq!(
            category(&raw("\"paid\"")).unwrap(),
            pb::CreditCategory::Paid
        );
        assert_eq!(
            category(&raw("\"promotional\"")).unwrap(),
            pb::CreditCategory::Promotional
        );
        for bad in ["\"PAID\"", "\"\"", "1", "true", "[\"paid\"]"] {
            assert_eq!(category(&raw(bad)).unwrap_err().code(), "invalid_category");
        }
        assert_eq!(priority(&raw("0")).unwrap(), 0);
        assert_eq!(priority(&raw("100")).unwrap(), 100);
        for bad in ["-1", "101", "10.5", "\"10\"", "1e1", "99999999999"] {
            assert_eq!(priority(&raw(bad)).unwrap_err().code(), "invalid_priority");
        }
        let at = expires_at("2030-01-01T00:00:00.000001+01:00").unwrap();
        assert_eq!((at.seconds, at.nanos), (1_893_452_400, 1_000));
        for bad in ["2030-01-01", "tomorrow", "2030-01-01T00:00:00.0000001Z", ""] {
            assert_eq!(expires_at(bad).unwrap_err().code(), "invalid_expires_at");
        }
    }
}
