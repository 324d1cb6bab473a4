//! The gRPC face of quota-svc: validate (identifiers by the workspace's one rule,
//! `reeve_runtime::ids`, before any SQL), ask or consume through the store with the
//! rules of [`crate::rules`], encode. Errors map to statuses in one place, below.

use std::collections::HashMap;
use std::sync::Arc;

use reeve_proto::quota::v1 as pb;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::Clock;
use crate::registry::{self, DEFAULT_TIER, Limit, Registry, RegistryError};
use crate::rules;
use crate::store::{Checked, Consume, Consumed, QuotaStore, StoreError, Usage};
use crate::window;

pub const ERROR_DOMAIN: &str = "quota.reeve.v1";

/// Every quota-svc error, mapped to a status by the `From` impl below.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("idempotency key {key:?} was already used for a consume of {units} units")]
    KeyReused { key: String, units: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RegistryError> for QuotaError {
    fn from(error: RegistryError) -> QuotaError {
        let code = match error {
            RegistryError::UnknownFeature(_) => "unknown_feature",
            RegistryError::UnknownTier(_) => "unknown_tier",
        };
        QuotaError::Invalid {
            code,
            message: error.to_string(),
        }
    }
}

impl From<QuotaError> for Status {
    fn from(error: QuotaError) -> Status {
        let message = error.to_string();
        let (code, reason) = match &error {
            QuotaError::Invalid { code, .. } => (Code::InvalidArgument, code.to_ascii_uppercase()),
            QuotaError::KeyReused { .. } => {
                (Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED".to_owned())
            }
            QuotaError::Store(StoreError::Unavailable(_)) => {
                (Code::Unavailable, "STORE_UNAVAILABLE".to_owned())
            }
            QuotaError::Store(_) => (Code::Internal, "STORE_ERROR".to_owned()),
        };
        match &error {
            QuotaError::Store(store @ StoreError::Unavailable(_)) => {
                tracing::warn!(error = %store, "store unavailable or busy; the caller may retry");
            }
            QuotaError::Store(store) => tracing::error!(error = %store, "store failure"),
            _ => {}
        }
        Status::with_error_details(
            code,
            message,
            ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new()),
        )
    }
}

fn invalid(code: &'static str, message: impl Into<String>) -> QuotaError {
    QuotaError::Invalid {
        code,
        message: message.into(),
    }
}

impl From<reeve_runtime::ids::InvalidId> for QuotaError {
    fn from(error: reeve_runtime::ids::InvalidId) -> QuotaError {
        QuotaError::Invalid {
            code: error.code,
            message: error.message,
        }
    }
}

/// A user id by the workspace's rule (1 to 128 characters, no control character).
fn check_user_id(user_id: &str) -> Result<(), QuotaError> {
    Ok(reeve_runtime::ids::check_user_id(user_id)?)
}

/// An idempotency key by the workspace's rule (1 to 256 characters, no control
/// character).
fn check_key(key: &str) -> Result<(), QuotaError> {
    Ok(reeve_runtime::ids::check_key(key, "idempotency_key")?)
}

/// Most units one check may consume: far above any limit, far below an overflow.
pub const MAX_CONSUME: i64 = 1_000_000_000;

pub struct QuotaApi {
    store: Arc<dyn QuotaStore>,
    registry: Arc<Registry>,
    clock: Clock,
}

fn limit_to_proto(limit: Limit) -> pb::Limit {
    match limit {
        Limit::Unlimited => pb::Limit {
            unlimited: true,
            units: 0,
        },
        Limit::Units(units) => pb::Limit {
            unlimited: false,
            units,
        },
    }
}

fn limit_from_proto(limit: Option<pb::Limit>) -> Result<Limit, QuotaError> {
    match limit {
        None => Err(invalid("invalid_limit", "limit is required")),
        Some(pb::Limit {
            unlimited: true, ..
        }) => Ok(Limit::Unlimited),
        Some(pb::Limit { units, .. }) if units >= 0 => Ok(Limit::Units(units)),
        Some(_) => Err(invalid("invalid_limit", "limit units must not be negative")),
    }
}

fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

/// Remaining units and, when none remain, when the next one frees up.
fn remaining_and_next(limit: Limit, usage: Usage) -> (i64, Option<prost_types::Timestamp>) {
    match limit {
        Limit::Unlimited => (0, None),
        Limit::Units(max) => {
            let remaining = (max - usage.used).max(0);
            let next = (remaining == 0)
                .then_some(usage.oldest_us)
                .flatten()
                .map(|us| timestamp(window::frees_at_us(us)));
            (remaining, next)
        }
    }
}

impl QuotaApi {
    pub fn new(store: Arc<dyn QuotaStore>, registry: Arc<Registry>, clock: Clock) -> QuotaApi {
        QuotaApi {
            store,
            registry,
            clock,
        }
    }

    async fn tier_of(&self, user_id: &str) -> Result<String, QuotaError> {
        Ok(self
            .store
            .tier(user_id)
            .await?
            .unwrap_or_else(|| DEFAULT_TIER.to_owned()))
    }
}

#[tonic::async_trait]
impl pb::quota_service_server::QuotaService for QuotaApi {
    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id, feature = %request.get_ref().feature))]
    async fn check_quota(
        &self,
        request: Request<pb::CheckQuotaRequest>,
    ) -> Result<Response<pb::CheckQuotaResponse>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        if !(0..=MAX_CONSUME).contains(&request.consume) {
            return Err(invalid(
                "invalid_consume",
                format!("consume must be 0 to {MAX_CONSUME}"),
            )
            .into());
        }
        // A question needs no key, but one it carries must be storable too.
        if request.consume > 0 || !request.idempotency_key.is_empty() {
            check_key(&request.idempotency_key)?;
        }
        // An unknown feature is refused before any database work.
        let tier_limits = self
            .registry
            .tier_limits(&request.feature)
            .map_err(QuotaError::from)?;
        let now_us = (self.clock)();
        let cutoff_us = window::cutoff_us(now_us);
        // Asking: one round trip for the tier, override and usage. Consuming: one
        // step that resolves the limit and checks-and-records atomically (coalesced with
        // concurrent consumes on PostgreSQL).
        let (allowed, duplicate, usage, tier, limit) = if request.consume == 0 {
            let context = self
                .store
                .check_context(&request.user_id, &request.feature, Some(cutoff_us))
                .await
                .map_err(QuotaError::from)?;
            // The tier is checked against the registry even when an override decides.
            let (tier, limit) = rules::resolve_limit(
                context.tier.as_deref(),
                context.override_limit,
                &tier_limits,
            )
            .map_err(|tier| QuotaError::from(RegistryError::UnknownTier(tier)))?;
            let usage = context.usage;
            (
                rules::allows_more(limit, usage.used),
                false,
                usage,
                tier,
                limit,
            )
        } else {
            let checked = self
                .store
                .consume(&Consume {
                    user_id: &request.user_id,
                    feature: &request.feature,
                    key: &request.idempotency_key,
                    units: request.consume,
                    tier_limits,
                    now_us,
                    cutoff_us,
                })
                .await
                .map_err(QuotaError::from)?;
            let (consumed, usage, tier, limit) = match checked {
                Checked::Done {
                    consumed,
                    usage,
                    tier,
                    limit,
                } => (consumed, usage, tier, limit),
                Checked::UnknownTier(tier) => {
                    return Err(QuotaError::from(RegistryError::UnknownTier(tier)).into());
                }
            };
            match consumed {
                Consumed::Recorded => (true, false, usage, tier, limit),
                Consumed::Duplicate => (true, true, usage, tier, limit),
                Consumed::Refused => (false, false, usage, tier, limit),
                Consumed::KeyReused { units } => {
                    return Err(QuotaError::KeyReused {
                        key: request.idempotency_key,
                        units,
                    }
                    .into());
                }
            }
        };
        let (remaining, next_free_at) = remaining_and_next(limit, usage);
        metrics::counter!(
            "reeve_quota_checks_total",
            "feature" => request.feature.clone(),
            "consume" => if request.consume > 0 { "true" } else { "false" },
            "result" => if allowed { "allowed" } else { "refused" },
        )
        .increment(1);
        Ok(Response::new(pb::CheckQuotaResponse {
            allowed,
            tier,
            limit: Some(limit_to_proto(limit)),
            used: usage.used,
            remaining,
            next_free_at,
            duplicate,
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id))]
    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let user_id = request.into_inner().user_id;
        check_user_id(&user_id)?;
        let tier = self.tier_of(&user_id).await?;
        let overrides = self
            .store
            .overrides(&user_id)
            .await
            .map_err(QuotaError::from)?;
        let usage = self
            .store
            .usage(&user_id, window::cutoff_us((self.clock)()))
            .await
            .map_err(QuotaError::from)?;
        let mut features = Vec::new();
        for feature in self.registry.features() {
            let overridden = overrides.get(feature).copied();
            let tier_limits = self
                .registry
                .tier_limits(feature)
                .map_err(QuotaError::from)?;
            let (_, limit) = rules::resolve_limit(Some(&tier), overridden, &tier_limits)
                .map_err(|tier| QuotaError::from(RegistryError::UnknownTier(tier)))?;
            let used = usage.get(feature).copied().unwrap_or_default();
            let (remaining, next_free_at) = remaining_and_next(limit, used);
            features.push(pb::FeatureUsage {
                feature: feature.to_owned(),
                limit: Some(limit_to_proto(limit)),
                used: used.used,
                remaining,
                next_free_at,
                overridden: overridden.is_some(),
            });
        }
        Ok(Response::new(pb::GetUsageResponse {
            user_id,
            tier,
            features,
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id, tier = %request.get_ref().tier))]
    async fn set_tier(
        &self,
        request: Request<pb::SetTierRequest>,
    ) -> Result<Response<pb::SetTierResponse>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        registry::tier_index(&request.tier).map_err(QuotaError::from)?;
        let previous = self
            .store
            .set_tier(&request.user_id, &request.tier, (self.clock)())
            .await
            .map_err(QuotaError::from)?;
        Ok(Response::new(pb::SetTierResponse {
            user_id: request.user_id,
            tier: request.tier,
            previous_tier: previous.unwrap_or_else(|| DEFAULT_TIER.to_owned()),
        }))
    }

    async fn get_tier(
        &self,
        request: Request<pb::GetTierRequest>,
    ) -> Result<Response<pb::GetTierResponse>, Status> {
        let user_id = request.into_inner().user_id;
        check_user_id(&user_id)?;
        let tier = self.tier_of(&user_id).await?;
        Ok(Response::new(pb::GetTierResponse { user_id, tier }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id, feature = %request.get_ref().feature))]
    async fn set_override(
        &self,
        request: Request<pb::SetOverrideRequest>,
    ) -> Result<Response<pb::SetOverrideResponse>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        if !self.registry.contains(&request.feature) {
            return Err(QuotaError::from(RegistryError::UnknownFeature(request.feature)).into());
        }
        let limit = limit_from_proto(request.limit)?;
        self.store
            .set_override(&request.user_id, &request.feature, limit, (self.clock)())
            .await
            .map_err(QuotaError::from)?;
        Ok(Response::new(pb::SetOverrideResponse {}))
    }

    async fn clear_override(
        &self,
        request: Request<pb::ClearOverrideRequest>,
    ) -> Result<Response<pb::ClearOverrideResponse>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        if !self.registry.contains(&request.feature) {
            return Err(QuotaError::from(RegistryError::UnknownFeature(request.feature)).into());
        }
        let cleared = self
            .store
            .clear_override(&request.user_id, &request.feature)
            .await
            .map_err(QuotaError::from)?;
        Ok(Response::new(pb::ClearOverrideResponse { cleared }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id, feature = %request.get_ref().feature))]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        check_key(&request.idempotency_key)?;
        if !self.registry.contains(&request.feature) {
            return Err(QuotaError::from(RegistryError::UnknownFeature(request.feature)).into());
        }
        let units = self
            .store
            .release(
                &request.user_id,
                &request.feature,
                &request.idempotency_key,
                window::cutoff_us((self.clock)()),
            )
            .await
            .map_err(QuotaError::from)?;
        Ok(Response::new(pb::ReleaseResponse {
            released: units.is_some(),
            units: units.unwrap_or(0),
        }))
    }
}
