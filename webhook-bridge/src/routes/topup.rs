//! Auto top-up on REST, for the signed-in user: `GET /api/credits/auto-topup` and
//! `PUT /api/credits/auto-topup` `{"enabled", "threshold", "amount", "monthly_cap"}`
//! (whole credits, all four required, nothing else accepted). The card is saved by a
//! purchase with `"save_payment_method": true`; the answer also says whether one is
//! saved, whether auto top-up is suspended and why, this month's top-ups and the
//! latest attempt (read-only). credits-svc decides and stores; this module only
//! reads the body exactly and translates, refusing a bad value before anything is
//! written.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use reeve_proto::credits::v1 as pb;
use reeve_runtime::Micros;
use reeve_runtime::money::MICROS_PER_CREDIT;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::User;
use crate::error::ApiError;
use crate::routes::{JsonBody, timestamp, whole_number};

/// Bounds in whole credits (the same as credits-svc's).
pub const MAX_THRESHOLD_CREDITS: i64 = 1_000_000_000;
pub const MAX_AMOUNT_CREDITS: i64 = 999_999;
pub const MAX_MONTHLY_CAP_CREDITS: i64 = 1_000_000_000;

/// The auto top-up routes, merged into the bridge's router.
pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/credits/auto-topup", get(read).put(set))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AutoTopUpBody {
    pub enabled: bool,
    /// Whole credits: top up when the available balance goes below this.
    #[schema(value_type = i64, example = 10)]
    pub threshold: Box<RawValue>,
    /// Whole credits bought by one top-up.
    #[schema(value_type = i64, example = 25)]
    pub amount: Box<RawValue>,
    /// Whole credits: the most top-ups may buy in one calendar month (UTC).
    #[schema(value_type = i64, example = 100)]
    pub monthly_cap: Box<RawValue>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AutoTopUp {
    pub user_id: String,
    /// False until the user set auto top-up once.
    pub configured: bool,
    pub enabled: bool,
    /// Whole credits; null until configured.
    pub threshold: Option<i64>,
    pub amount: Option<i64>,
    pub monthly_cap: Option<i64>,
    /// A card was saved by a purchase with `save_payment_method`.
    pub payment_method_saved: bool,
    /// Suspended until a new card is saved.
    pub suspended: bool,
    /// Why: `card_declined` (three declines in a row); null when not suspended.
    pub suspended_reason: Option<String>,
    /// Declines in a row since the last success or saved card.
    pub consecutive_failures: i32,
    /// RFC 3339, UTC: no top-up before this instant (the hour after a decline).
    pub retry_after: Option<String>,
    /// This calendar month's (UTC) top-ups that succeeded or are in flight, decimal
    /// credits with six places.
    pub month_used: String,
    pub month_used_micros: i64,
    pub last_attempt: Option<TopUpAttempt>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopUpAttempt {
    pub attempt_id: String,
    /// pending | processing | requires_action | succeeded | failed
    pub state: String,
    pub amount: String,
    pub amount_micros: i64,
    pub payment_intent_id: Option<String>,
    /// Stripe's code when failed, e.g. card_declined.
    pub failure_code: Option<String>,
    /// requires_action: where the user completes the payment, when Stripe gave one.
    pub action_url: Option<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
}

fn non_empty(text: String) -> Option<String> {
    Some(text).filter(|t| !t.is_empty())
}

fn credits_of(micros: i64, configured: bool) -> Option<i64> {
    configured.then_some(micros / MICROS_PER_CREDIT)
}

impl From<pb::AutoTopUp> for AutoTopUp {
    fn from(reply: pb::AutoTopUp) -> AutoTopUp {
        let configured = reply.configured;
        AutoTopUp {
            user_id: reply.user_id,
            configured,
            enabled: reply.enabled,
            threshold: credits_of(reply.threshold_micros, configured),
            amount: credits_of(reply.amount_micros, configured),
            monthly_cap: credits_of(reply.monthly_cap_micros, configured),
            payment_method_saved: reply.payment_method_saved,
            suspended: reply.suspended,
            suspended_reason: non_empty(reply.suspended_reason),
            consecutive_failures: reply.consecutive_failures,
            retry_after: reply.retry_after.map(timestamp),
            month_used: Micros(reply.month_used_micros).to_string(),
            month_used_micros: reply.month_used_micros,
            last_attempt: reply.last_attempt.map(|a| TopUpAttempt {
                attempt_id: a.attempt_id,
                state: a.state,
                amount: Micros(a.amount_micros).to_string(),
                amount_micros: a.amount_micros,
                payment_intent_id: non_empty(a.payment_intent_id),
                failure_code: non_empty(a.failure_code),
                action_url: non_empty(a.action_url),
                created_at: a.created_at.map(timestamp).unwrap_or_default(),
            }),
        }
    }
}

/// A whole number of credits from 1 to `max` (a JSON integer; `25.0` is 25), in
/// micros; else 400 with `code`.
fn whole_credits(
    raw: &RawValue,
    max: i64,
    code: &'static str,
    name: &str,
) -> Result<i64, ApiError> {
    whole_number(raw)
        .filter(|credits| (1..=max).contains(credits))
        .map(|credits| credits * MICROS_PER_CREDIT)
        .ok_or_else(|| {
            ApiError::bad_request(
                code,
                format!(
                    "{name} must be a whole number of credits (a JSON integer) from 1 to {max}"
                ),
            )
        })
}

#[utoipa::path(get, path = "/api/credits/auto-topup", tag = "credits",
    responses((status = 200, body = AutoTopUp), (status = 401, body = crate::openapi::ErrorBody)),
    security(("user_jwt" = [])))]
pub async fn read(
    State(state): State<Arc<AppState>>,
    User(user_id): User,
) -> Result<Json<AutoTopUp>, ApiError> {
    let reply = state
        .credits()
        .get_auto_top_up(pb::GetAutoTopUpRequest { user_id })
        .await?
        .into_inner();
    Ok(Json(reply.into()))
}

#[utoipa::path(put, path = "/api/credits/auto-topup", tag = "credits", request_body = AutoTopUpBody,
    responses((status = 200, body = AutoTopUp),
        (status = 400, description = "invalid_json (a missing, unknown or mistyped field), invalid_threshold, invalid_topup_amount, invalid_monthly_cap; nothing is written", body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody)),
    security(("user_jwt" = [])))]
pub async fn set(
    State(state): State<Arc<AppState>>,
    User(user_id): User,
    JsonBody(body): JsonBody<AutoTopUpBody>,
) -> Result<Json<AutoTopUp>, ApiError> {
    let threshold_micros = whole_credits(
        &body.threshold,
        MAX_THRESHOLD_CREDITS,
        "invalid_threshold",
        "threshold",
    )?;
    let amount_micros = whole_credits(
        &body.amount,
        MAX_AMOUNT_CREDITS,
        "invalid_topup_amount",
        "amount",
    )?;
    let monthly_cap_micros = whole_credits(
        &body.monthly_cap,
        MAX_MONTHLY_CAP_CREDITS,
        "invalid_monthly_cap",
        "monthly_cap",
    )?;
    let reply = state
        .credits()
        .set_auto_top_up(pb::SetAutoTopUpRequest {
            user_id,
            enabled: body.enabled,
            threshold_micros,
            amount_micros,
            monthly_cap_micros,
        })
        .await?
        .into_inner();
    Ok(Json(reply.into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn whole_credits_within_bounds_only() {
        let read =
            |text: &str| whole_credits(&raw(text), 999_999, "invalid_topup_amount", "amount");
        assert_eq!(read("25").unwrap(), 25 * MICROS_PER_CREDIT);
        assert_eq!(read("25.0").unwrap(), 25 * MICROS_PER_CREDIT);
        assert_eq!(read("999999").unwrap(), 999_999 * MICROS_PER_CREDIT);
        for bad in [
            "0",
            "-1",
            "1.5",
            "1e3",
            "\"25\"",
            "null",
            "true",
            "[1]",
            "1000000",
            "99999999999999999999",
            "\"\\u0000\"",
        ] {
            assert_eq!(
                read(bad).unwrap_err().code(),
                "invalid_topup_amount",
                "{bad}"
            );
        }
    }
}
