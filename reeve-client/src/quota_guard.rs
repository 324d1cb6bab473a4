//! The quota guard for Rust callers, the counterpart of the seed's
//! `Depends(require_tier("ad_generations"))`: before doing metered work, call
//! [`QuotaGuard::require`]; it consumes the units atomically in quota-svc and turns a
//! refusal into a typed error that maps to HTTP 429 (quota exceeded), 403 (unknown
//! feature) or 503 (quota-svc unreachable). If the work then fails, give the units
//! back with [`QuotaGuard::release`]. Calls go through the typed [`QuotaClient`], so a
//! transient failure is retried with the same key (never counted twice).

use std::fmt;

use reeve_proto::quota::v1::quota_service_client::QuotaServiceClient;
use reeve_proto::quota::v1::{CheckQuotaRequest, CheckQuotaResponse, ReleaseRequest};
use reeve_runtime::auth::BearerToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::connect::Connection;
use crate::quota::QuotaClient;
use crate::retry::RetryPolicy;

/// Why metered work may not go ahead.
#[derive(Debug, Clone)]
pub enum GuardError {
    /// The user's quota for the feature is used up (HTTP 429).
    Exceeded {
        feature: String,
        reply: CheckQuotaResponse,
    },
    /// The feature or request is not valid (HTTP 403: never a silent allow).
    Refused(Status),
    /// quota-svc could not answer (HTTP 503).
    Unavailable(Status),
}

impl GuardError {
    /// The HTTP status a handler should answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            GuardError::Exceeded { .. } => 429,
            GuardError::Refused(_) => 403,
            GuardError::Unavailable(_) => 503,
        }
    }
}

impl fmt::Display for GuardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuardError::Exceeded { feature, reply } => {
                write!(f, "quota for {feature} exceeded ({} used)", reply.used)
            }
            GuardError::Refused(status) => write!(f, "quota check refused: {}", status.message()),
            GuardError::Unavailable(status) => {
                write!(f, "quota service unavailable: {}", status.message())
            }
        }
    }
}

impl std::error::Error for GuardError {}

fn from_status(status: Status) -> GuardError {
    match status.code() {
        Code::InvalidArgument | Code::NotFound | Code::PermissionDenied | Code::AlreadyExists => {
            GuardError::Refused(status)
        }
        _ => GuardError::Unavailable(status),
    }
}

/// A cheap-to-clone handle that checks and consumes quota before work.
#[derive(Debug, Clone)]
pub struct QuotaGuard {
    client: QuotaClient,
}

/// Proof that the units were consumed; [`QuotaGuard::release`] gives them back.
#[derive(Debug, Clone)]
pub struct Permit {
    pub user_id: String,
    pub feature: String,
    pub idempotency_key: String,
    pub reply: CheckQuotaResponse,
}

impl QuotaGuard {
    /// A guard over a connection made by [`crate::ClientBuilder`] (its token and retries).
    pub fn from_connection(connection: &Connection) -> QuotaGuard {
        QuotaGuard {
            client: connection.quota(),
        }
    }

    /// A guard over a typed quota client.
    pub fn from_client(client: QuotaClient) -> QuotaGuard {
        QuotaGuard { client }
    }

    /// A guard over `channel`, sending `service_token` as the bearer token (and the
    /// trace context), with the default retries.
    pub fn new(channel: Channel, service_token: &str) -> Result<QuotaGuard, Status> {
        let raw = QuotaServiceClient::with_interceptor(channel, BearerToken::new(service_token)?);
        Ok(QuotaGuard {
            client: QuotaClient::from_raw(raw, RetryPolicy::default()),
        })
    }

    /// Consumes one unit of `feature` for `user_id`, keyed by `idempotency_key` (the
    /// request's id, so a retried request is not counted twice).
    pub async fn require(
        &self,
        user_id: &str,
        feature: &str,
        idempotency_key: &str,
    ) -> Result<Permit, GuardError> {
        let reply = self
            .client
            .check_quota(CheckQuotaRequest {
                user_id: user_id.to_owned(),
                feature: feature.to_owned(),
                consume: 1,
                idempotency_key: idempotency_key.to_owned(),
            })
            .await
            .map_err(from_status)?;
        if !reply.allowed {
            return Err(GuardError::Exceeded {
                feature: feature.to_owned(),
                reply,
            });
        }
        Ok(Permit {
            user_id: user_id.to_owned(),
            feature: feature.to_owned(),
            idempotency_key: idempotency_key.to_owned(),
            reply,
        })
    }

    /// Gives back the units of `permit` (the work failed). Safe to call twice.
    pub async fn release(&self, permit: &Permit) -> Result<bool, GuardError> {
        let reply = self
            .client
            .release(ReleaseRequest {
                user_id: permit.user_id.clone(),
                feature: permit.feature.clone(),
                idempotency_key: permit.idempotency_key.clone(),
            })
            .await
            .map_err(from_status)?;
        Ok(reply.released)
    }
}
