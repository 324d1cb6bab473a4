//! Holds on REST (service token, `deduct` scope): the gateway reserves credits before
//! an LLM call (`POST /api/credits/holds`), then settles the real cost
//! (`POST /api/credits/holds/{hold_id}/settle`) or releases it
//! (`POST /api/credits/holds/{hold_id}/release`); `GET /api/credits/holds/{hold_id}`
//! reads one.
//!
//! The hold id is the idempotency key: a retried call answers the stored outcome with
//! `duplicate`, a conflicting one is 409 (`idempotency_key_reused` for another hold
//! request, `hold_already_resolved` with the stored outcome for a settle or release the
//! outcome refuses). Every decision about money and states is credits-svc's; this
//! module only reads requests (amounts exactly as deductions are, a settle may be 0)
//! and writes answers, and never retries a write under another id.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use reeve_proto::credits::v1 as pb;
use reeve_runtime::Micros;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::AppState;
use crate::amount;
use crate::auth::Service;
use crate::error::ApiError;
use crate::routes::credits::{Draw, Entry};
use crate::routes::{JsonBody, timestamp};

/// Longest time to live of a hold, in seconds (credits-svc's bound).
pub const MAX_TTL_SECS: i64 = 86_400;

/// The hold routes, merged into the bridge's router.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/credits/holds", post(create))
        .route("/api/credits/holds/{hold_id}", get(read))
        .route("/api/credits/holds/{hold_id}/settle", post(settle))
        .route("/api/credits/holds/{hold_id}/release", post(release))
}

/// Where a hold is: `held` reserves until `expires_at`; the others are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HoldStatus {
    Held,
    Settled,
    Released,
    Expired,
}

impl HoldStatus {
    fn from_proto(status: i32) -> Result<HoldStatus, ApiError> {
        match pb::HoldStatus::try_from(status) {
            Ok(pb::HoldStatus::Held) => Ok(HoldStatus::Held),
            Ok(pb::HoldStatus::Settled) => Ok(HoldStatus::Settled),
            Ok(pb::HoldStatus::Released) => Ok(HoldStatus::Released),
            Ok(pb::HoldStatus::Expired) => Ok(HoldStatus::Expired),
            _ => Err(backend_error("credits-svc sent a hold without a status")),
        }
    }
}

/// One hold.
#[derive(Debug, Serialize, ToSchema)]
pub struct Hold {
    pub hold_id: String,
    pub user_id: String,
    /// What was reserved, decimal credits with six places.
    pub amount: String,
    pub amount_micros: i64,
    pub status: HoldStatus,
    /// The cost the settle recorded; null unless `status` is `settled`.
    pub settled: Option<String>,
    pub settled_micros: Option<i64>,
    /// The settle's deduction entry; null when none.
    pub entry_id: Option<i64>,
    /// What the settle could not draw from any lot, left as a debt ("0.000000" when none).
    pub shortfall: String,
    pub shortfall_micros: i64,
    /// Settled after its expiry.
    pub late: bool,
    pub description: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// RFC 3339, UTC: from this instant a `held` hold reserves nothing.
    pub expires_at: String,
    /// RFC 3339, UTC; null while `held`.
    pub resolved_at: Option<String>,
    /// The lots it reserves from while `held` (empty once resolved).
    pub reservations: Vec<Draw>,
}

impl Hold {
    fn from_proto(hold: Option<pb::Hold>) -> Result<Hold, ApiError> {
        let hold = hold.ok_or_else(|| backend_error("credits-svc sent no hold"))?;
        let status = HoldStatus::from_proto(hold.status)?;
        let settled = (status == HoldStatus::Settled).then_some(hold.settled_micros);
        Ok(Hold {
            hold_id: hold.hold_id,
            user_id: hold.user_id,
            amount: Micros(hold.amount_micros).to_string(),
            amount_micros: hold.amount_micros,
            status,
            settled: settled.map(|m| Micros(m).to_string()),
            settled_micros: settled,
            entry_id: Some(hold.entry_id).filter(|id| *id != 0),
            shortfall: Micros(hold.shortfall_micros).to_string(),
            shortfall_micros: hold.shortfall_micros,
            late: hold.late,
            description: hold.description,
            created_at: hold.created_at.map(timestamp).unwrap_or_default(),
            expires_at: hold.expires_at.map(timestamp).unwrap_or_default(),
            resolved_at: hold.resolved_at.map(timestamp),
            reservations: hold
                .reservations
                .into_iter()
                .map(|draw| Draw {
                    lot_id: draw.lot_id,
                    amount: Micros(draw.amount_micros).to_string(),
                    amount_micros: draw.amount_micros,
                })
                .collect(),
        })
    }
}

fn backend_error(message: &str) -> ApiError {
    ApiError::Internal {
        code: "backend_error",
        message: message.to_owned(),
    }
}

/// The one rule of ids (`reeve_runtime::ids::check_key`), refused as `invalid_hold_id`.
fn check_hold_id(hold_id: &str) -> Result<(), ApiError> {
    reeve_runtime::ids::check_key(hold_id, "hold_id")
        .map_err(|invalid| ApiError::bad_request("invalid_hold_id", invalid.message))
}

/// `ttl_seconds`: a whole number of seconds, 1 to 86,400; absent or null means 0,
/// which credits-svc reads as its default (600).
fn ttl_seconds(raw: Option<&RawValue>) -> Result<i64, ApiError> {
    let Some(raw) = raw else {
        return Ok(0);
    };
    crate::routes::whole_number(raw)
        .filter(|ttl| (1..=MAX_TTL_SECS).contains(ttl))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_ttl",
                format!("ttl_seconds must be a whole number of seconds from 1 to {MAX_TTL_SECS}"),
            )
        })
}

/// A settle's cost: what a deduction's amount accepts, and zero (a release).
fn settle_amount(raw: &RawValue) -> Result<Micros, ApiError> {
    match amount::parse_positive(raw) {
        Err(error) if error.code() == "amount_not_positive" => {
            let text = raw.get().trim();
            let text = serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_owned());
            if !text.starts_with('-') && text.parse::<Micros>() == Ok(Micros::ZERO) {
                Ok(Micros::ZERO)
            } else {
                Err(ApiError::bad_request(
                    "amount_negative",
                    "a settle's amount must be 0 or more",
                ))
            }
        }
        other => other,
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct HoldBody {
    pub user_id: String,
    /// Positive decimal credits to reserve, e.g. "0.25" (at most six decimals).
    #[schema(value_type = String, example = "0.25")]
    pub amount: Box<RawValue>,
    /// The idempotency key of the hold, and its id in the routes below.
    pub hold_id: String,
    /// 1 to 86,400; absent or null: 600.
    #[serde(default)]
    #[schema(value_type = Option<i64>, example = 600)]
    pub ttl_seconds: Option<Box<RawValue>>,
    #[serde(default)]
    pub description: String,
}

/// The hold, and whether this id had been held before (the original answer).
#[derive(Debug, Serialize, ToSchema)]
pub struct HoldCreated {
    #[serde(flatten)]
    pub hold: Hold,
    pub duplicate: bool,
}

/// Reserves `amount` of the user's available credits (balance minus active holds), in
/// spending order, for `ttl_seconds`.
#[utoipa::path(post, path = "/api/credits/holds", tag = "holds", request_body = HoldBody,
    responses((status = 200, body = HoldCreated),
        (status = 400, description = "a refused value: invalid_amount (and the other amount codes), invalid_hold_id, invalid_user_id, invalid_description, invalid_ttl", body = crate::openapi::ErrorBody),
        (status = 402, description = "insufficient_credits: `error.balance`, `error.held` and `error.required`; nothing is reserved", body = crate::openapi::ErrorBody),
        (status = 409, description = "idempotency_key_reused: this hold_id was used for another request", body = crate::openapi::ErrorBody)),
    security(("service_token" = [])))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    _service: Service,
    JsonBody(body): JsonBody<HoldBody>,
) -> Result<Json<HoldCreated>, ApiError> {
    check_hold_id(&body.hold_id)?;
    let amount = amount::parse_positive(&body.amount)?;
    let ttl_seconds = ttl_seconds(body.ttl_seconds.as_deref())?;
    tracing::Span::current().record("user_id", body.user_id.as_str());
    let reply = state
        .credits()
        .hold(pb::HoldRequest {
            user_id: body.user_id,
            hold_id: body.hold_id,
            amount_micros: amount.0,
            ttl_seconds,
            description: body.description,
        })
        .await?
        .into_inner();
    Ok(Json(HoldCreated {
        hold: Hold::from_proto(reply.hold)?,
        duplicate: reply.duplicate,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SettleBody {
    /// The real cost: decimal credits, 0 or more (0 releases the hold).
    #[schema(value_type = String, example = "0.0125")]
    pub amount: Box<RawValue>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Settled {
    pub hold: Hold,
    /// The deduction entry; null for a settle of 0.
    pub entry: Option<Entry>,
    /// True when this settle had been recorded before: the stored result.
    pub duplicate: bool,
    /// What no lot could pay, left as a debt.
    pub shortfall: String,
    pub shortfall_micros: i64,
}

/// Records the real cost as one deduction: the reservations first, the excess from
/// available lots, past them a debt (`shortfall`). After expiry the cost is still
/// recorded (`late`).
#[utoipa::path(post, path = "/api/credits/holds/{hold_id}/settle", tag = "holds", request_body = SettleBody,
    params(("hold_id" = String, Path, description = "The hold's id (its idempotency key).")),
    responses((status = 200, body = Settled),
        (status = 400, description = "a refused value: invalid_amount (and the other amount codes, amount_negative), invalid_hold_id, invalid_description", body = crate::openapi::ErrorBody),
        (status = 404, description = "not_found: no hold with this id", body = crate::openapi::ErrorBody),
        (status = 409, description = "hold_already_resolved: the hold was settled with another amount, or released; `error.status`, `error.settled`, `error.entry_id` give the stored outcome", body = crate::openapi::ErrorBody)),
    security(("service_token" = [])))]
pub async fn settle(
    State(state): State<Arc<AppState>>,
    _service: Service,
    Path(hold_id): Path<String>,
    JsonBody(body): JsonBody<SettleBody>,
) -> Result<Json<Settled>, ApiError> {
    check_hold_id(&hold_id)?;
    let amount = settle_amount(&body.amount)?;
    let reply = state
        .credits()
        .settle_hold(pb::SettleHoldRequest {
            hold_id,
            amount_micros: amount.0,
            description: body.description,
        })
        .await?
        .into_inner();
    Ok(Json(Settled {
        hold: Hold::from_proto(reply.hold)?,
        entry: reply.entry.map(Entry::from),
        duplicate: reply.duplicate,
        shortfall: Micros(reply.shortfall_micros).to_string(),
        shortfall_micros: reply.shortfall_micros,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Released {
    pub hold: Hold,
    /// True when it had been released before.
    pub duplicate: bool,
}

/// Frees the reservation.
#[utoipa::path(post, path = "/api/credits/holds/{hold_id}/release", tag = "holds",
    params(("hold_id" = String, Path, description = "The hold's id (its idempotency key).")),
    responses((status = 200, body = Released),
        (status = 400, description = "invalid_hold_id", body = crate::openapi::ErrorBody),
        (status = 404, description = "not_found: no hold with this id", body = crate::openapi::ErrorBody),
        (status = 409, description = "hold_already_resolved: the hold was settled; `error.status`, `error.settled`, `error.entry_id` give the stored outcome", body = crate::openapi::ErrorBody)),
    security(("service_token" = [])))]
pub async fn release(
    State(state): State<Arc<AppState>>,
    _service: Service,
    Path(hold_id): Path<String>,
) -> Result<Json<Released>, ApiError> {
    check_hold_id(&hold_id)?;
    let reply = state
        .credits()
        .release_hold(pb::ReleaseHoldRequest { hold_id })
        .await?
        .into_inner();
    Ok(Json(Released {
        hold: Hold::from_proto(reply.hold)?,
        duplicate: reply.duplicate,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HoldView {
    pub hold: Hold,
}

/// One hold as it is now (a `held` hold past `expires_at` reads `expired`).
#[utoipa::path(get, path = "/api/credits/holds/{hold_id}", tag = "holds",
    params(("hold_id" = String, Path, description = "The hold's id (its idempotency key).")),
    responses((status = 200, body = HoldView),
        (status = 400, description = "invalid_hold_id", body = crate::openapi::ErrorBody),
        (status = 404, description = "not_found: no hold with this id", body = crate::openapi::ErrorBody)),
    security(("service_token" = [])))]
pub async fn read(
    State(state): State<Arc<AppState>>,
    _service: Service,
    Path(hold_id): Path<String>,
) -> Result<Json<HoldView>, ApiError> {
    check_hold_id(&hold_id)?;
    let reply = state
        .credits()
        .get_hold(pb::GetHoldRequest { hold_id })
        .await?
        .into_inner();
    Ok(Json(HoldView {
        hold: Hold::from_proto(reply.hold)?,
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
    fn a_settle_reads_amounts_as_deductions_do_and_accepts_zero() {
        for zero in ["0", "\"0\"", "\"0.000000\"", "0.0"] {
            assert_eq!(settle_amount(&raw(zero)).unwrap(), Micros::ZERO, "{zero}");
        }
        assert_eq!(settle_amount(&raw("\"0.0125\"")).unwrap(), Micros(12_500));
        assert_eq!(settle_amount(&raw("3")).unwrap(), Micros(3_000_000));
        let code = |text: &str| settle_amount(&raw(text)).unwrap_err().code().to_owned();
        assert_eq!(code("-1"), "amount_negative");
        assert_eq!(code("\"-0.5\""), "amount_negative");
        assert_eq!(code("\"0.0000001\""), "amount_too_precise");
        assert_eq!(code("1e3"), "invalid_amount");
        assert_eq!(code("null"), "invalid_amount");
        assert_eq!(code("99999999999999999999"), "amount_overflow");
    }

    #[test]
    fn ttl_is_whole_seconds_within_a_day() {
        assert_eq!(ttl_seconds(None).unwrap(), 0);
        assert_eq!(ttl_seconds(Some(&*raw("1"))).unwrap(), 1);
        assert_eq!(ttl_seconds(Some(&*raw("86400"))).unwrap(), 86_400);
        assert_eq!(
            ttl_seconds(Some(&*raw("222.0"))).unwrap(),
            222,
            "JSON Schema's 222"
        );
        for bad in ["0", "86401", "-5", "1.5", "\"60\"", "true", "6e1", "60.0e0"] {
            assert_eq!(
                ttl_seconds(Some(&*raw(bad))).unwrap_err().code(),
                "invalid_ttl",
                "{bad}"
            );
        }
    }
}
