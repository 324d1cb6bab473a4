//! The typed quota-svc client: the generated client behind the retry rule. A consuming
//! CheckQuota is retried only when it carries an idempotency key (without one, a retry
//! after a lost answer could count the units twice); questions and keyed calls always.

use reeve_proto::quota::v1 as pb;
use tonic::Status;

use crate::connect::{Connection, RawQuotaClient};
use crate::retry::{self, RetryPolicy};

/// A cheap-to-clone quota-svc client.
#[derive(Debug, Clone)]
pub struct QuotaClient {
    raw: RawQuotaClient,
    retry: RetryPolicy,
}

macro_rules! retried {
    ($(#[$doc:meta])* $name:ident, $method:literal, $request:ty, $response:ty) => {
        $(#[$doc])*
        pub async fn $name(&self, request: $request) -> Result<$response, Status> {
            self.call($method, request, |mut raw, request| async move {
                raw.$name(request).await.map(tonic::Response::into_inner)
            })
            .await
        }
    };
}

impl QuotaClient {
    pub fn new(connection: &Connection) -> QuotaClient {
        QuotaClient {
            raw: connection.raw_quota(),
            retry: connection.retry_policy(),
        }
    }

    /// A client over an existing generated client (its interceptor included).
    pub fn from_raw(raw: RawQuotaClient, retry: RetryPolicy) -> QuotaClient {
        QuotaClient { raw, retry }
    }

    pub fn with_retry(mut self, policy: RetryPolicy) -> QuotaClient {
        self.retry = policy;
        self
    }

    /// The generated client (no retries).
    pub fn raw(&self) -> RawQuotaClient {
        self.raw.clone()
    }

    async fn call<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        request: Req,
        send: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(RawQuotaClient, Req) -> Fut,
        Fut: std::future::Future<Output = Result<Resp, Status>>,
    {
        self.call_with(&self.retry, method, request, send).await
    }

    async fn call_with<Req, Resp, F, Fut>(
        &self,
        policy: &RetryPolicy,
        method: &'static str,
        request: Req,
        send: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(RawQuotaClient, Req) -> Fut,
        Fut: std::future::Future<Output = Result<Resp, Status>>,
    {
        retry::run(policy, method, || send(self.raw.clone(), request.clone())).await
    }

    /// Checks (consume 0) or consumes units; a consume without a key is not retried.
    pub async fn check_quota(
        &self,
        request: pb::CheckQuotaRequest,
    ) -> Result<pb::CheckQuotaResponse, Status> {
        let policy = if request.consume > 0 && request.idempotency_key.is_empty() {
            RetryPolicy::none()
        } else {
            self.retry
        };
        self.call_with(
            &policy,
            "CheckQuota",
            request,
            |mut raw, request| async move {
                raw.check_quota(request)
                    .await
                    .map(tonic::Response::into_inner)
            },
        )
        .await
    }

    retried!(
        get_usage,
        "GetUsage",
        pb::GetUsageRequest,
        pb::GetUsageResponse
    );
    retried!(get_tier, "GetTier", pb::GetTierRequest, pb::GetTierResponse);
    retried!(set_tier, "SetTier", pb::SetTierRequest, pb::SetTierResponse);
    retried!(
        set_override,
        "SetOverride",
        pb::SetOverrideRequest,
        pb::SetOverrideResponse
    );
    retried!(
        clear_override,
        "ClearOverride",
        pb::ClearOverrideRequest,
        pb::ClearOverrideResponse
    );
    retried!(
        /// Gives back the units consumed under a key (safe to repeat).
        release, "Release", pb::ReleaseRequest, pb::ReleaseResponse
    );
}
