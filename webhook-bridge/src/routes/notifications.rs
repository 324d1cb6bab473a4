//! Notification settings on REST (service token, `admin` scope):
//! `PUT /api/notifications/threshold` sets a user's low-balance alert, after which
//! credits-svc emits `credits.balance_low` when the user's available balance goes below
//! it (re-armed once it is back at or above). Amounts are read as every amount is;
//! credits-svc decides and stores, this module only translates.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::put;
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
use crate::routes::JsonBody;

/// The notification routes, merged into the bridge's router.
pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/notifications/threshold", put(set_threshold))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ThresholdBody {
    pub user_id: String,
    /// Decimal credits (at most six decimals); 0 or null removes the alert.
    #[schema(value_type = Option<String>, example = "10")]
    pub threshold: Option<Box<RawValue>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Threshold {
    pub user_id: String,
    /// Decimal credits with six places; null when the alert was removed.
    pub threshold: Option<String>,
    pub threshold_micros: Option<i64>,
}

/// The threshold of a body: `None` removes (null, or zero).
fn threshold_of(raw: Option<&RawValue>) -> Result<Option<Micros>, ApiError> {
    let Some(raw) = raw.filter(|raw| raw.get().trim() != "null") else {
        return Ok(None);
    };
    match amount::parse_positive(raw) {
        Ok(micros) => Ok(Some(micros)),
        Err(error)
            if error.code() == "amount_not_positive"
                && !raw.get().trim().trim_matches('"').starts_with('-') =>
        {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

#[utoipa::path(put, path = "/api/notifications/threshold", tag = "credits", request_body = ThresholdBody,
    responses((status = 200, body = Threshold),
        (status = 400, description = "a refused value: invalid_amount (and the other amount codes), invalid_user_id, invalid_threshold", body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody),
        (status = 403, description = "insufficient_scope: the admin scope is needed", body = crate::openapi::ErrorBody)),
    security(("service_token" = [])))]
pub async fn set_threshold(
    State(state): State<Arc<AppState>>,
    _service: Service,
    JsonBody(body): JsonBody<ThresholdBody>,
) -> Result<Json<Threshold>, ApiError> {
    let threshold = threshold_of(body.threshold.as_deref())?;
    let reply = state
        .credits()
        .set_balance_alert(pb::SetBalanceAlertRequest {
            user_id: body.user_id,
            threshold_micros: threshold.map_or(0, |t| t.0),
        })
        .await?
        .into_inner();
    Ok(Json(Threshold {
        user_id: reply.user_id,
        threshold: threshold.map(|t| t.to_string()),
        threshold_micros: threshold.map(|t| t.0),
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
    fn thresholds_are_read_exactly_and_zero_or_null_removes() {
        assert_eq!(
            threshold_of(Some(&raw("10"))).unwrap(),
            Some(Micros(10_000_000))
        );
        assert_eq!(
            threshold_of(Some(&raw("\"0.5\""))).unwrap(),
            Some(Micros(500_000))
        );
        assert_eq!(threshold_of(Some(&raw("0"))).unwrap(), None);
        assert_eq!(threshold_of(Some(&raw("null"))).unwrap(), None);
        assert_eq!(threshold_of(None).unwrap(), None);
        assert!(threshold_of(Some(&raw("-1"))).is_err());
        assert!(threshold_of(Some(&raw("\"abc\""))).is_err());
        assert!(threshold_of(Some(&raw("0.0000001"))).is_err());
    }
}
