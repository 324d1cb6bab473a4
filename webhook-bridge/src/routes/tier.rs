//! `/api/tier/*`: the signed-in user's quota usage, and one feature's check. A check
//! only asks (it consumes nothing): being over quota is an answer, not an error.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use reeve_proto::quota::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::User;
use crate::error::ApiError;
use crate::routes::{QueryParams, timestamp};

#[derive(Debug, Serialize, ToSchema)]
pub struct FeatureUsage {
    pub feature: String,
    /// Units per rolling 30-day window; absent when unlimited.
    pub limit: Option<i64>,
    pub unlimited: bool,
    pub used: i64,
    /// Absent when unlimited.
    pub remaining: Option<i64>,
    /// When the oldest counted unit leaves the window (RFC 3339), if one is counted.
    pub next_free_at: Option<String>,
    /// True when an admin override replaces the tier's limit.
    pub overridden: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub user_id: String,
    pub tier: String,
    pub features: Vec<FeatureUsage>,
}

fn limit_of(limit: Option<pb::Limit>) -> (Option<i64>, bool) {
    match limit {
        Some(pb::Limit {
            unlimited: true, ..
        }) => (None, true),
        Some(limit) => (Some(limit.units), false),
        None => (None, true),
    }
}

#[utoipa::path(get, path = "/api/tier/usage", tag = "tier",
    responses((status = 200, body = Usage), (status = 401, body = crate::openapi::ErrorBody)),
    security(("user_jwt" = [])))]
pub async fn usage(
    State(state): State<Arc<AppState>>,
    User(user_id): User,
) -> Result<Json<Usage>, ApiError> {
    let reply = state
        .quota()
        .get_usage(pb::GetUsageRequest { user_id })
        .await?
        .into_inner();
    let features = reply
        .features
        .into_iter()
        .map(|f| {
            let (limit, unlimited) = limit_of(f.limit);
            FeatureUsage {
                feature: f.feature,
                limit,
                unlimited,
                used: f.used,
                remaining: (!unlimited).then_some(f.remaining),
                next_free_at: f.next_free_at.map(timestamp),
                overridden: f.overridden,
            }
        })
        .collect();
    Ok(Json(Usage {
        user_id: reply.user_id,
        tier: reply.tier,
        features,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CheckQuery {
    /// A feature of the quota registry, e.g. `ad_generations`.
    pub feature: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    pub feature: String,
    /// Whether one more unit fits now.
    pub allowed: bool,
    pub tier: String,
    pub limit: Option<i64>,
    pub unlimited: bool,
    pub used: i64,
    pub remaining: Option<i64>,
    pub next_free_at: Option<String>,
}

#[utoipa::path(get, path = "/api/tier/check", tag = "tier", params(CheckQuery),
    responses((status = 200, body = Check), (status = 400, description = "missing or unknown feature", body = crate::openapi::ErrorBody)),
    security(("user_jwt" = [])))]
pub async fn check(
    State(state): State<Arc<AppState>>,
    User(user_id): User,
    QueryParams(query): QueryParams<CheckQuery>,
) -> Result<Json<Check>, ApiError> {
    let feature = query.feature.filter(|f| !f.is_empty()).ok_or_else(|| {
        ApiError::bad_request("missing_feature", "the feature query parameter is required")
    })?;
    let reply = state
        .quota()
        .check_quota(pb::CheckQuotaRequest {
            user_id,
            feature: feature.clone(),
            consume: 0,
            idempotency_key: String::new(),
        })
        .await?
        .into_inner();
    let (limit, unlimited) = limit_of(reply.limit);
    Ok(Json(Check {
        feature,
        allowed: reply.allowed,
        tier: reply.tier,
        limit,
        unlimited,
        used: reply.used,
        remaining: (!unlimited).then_some(reply.remaining),
        next_free_at: reply.next_free_at.map(timestamp),
    }))
}
