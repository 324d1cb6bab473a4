//! The typed credits-svc client: the generated client behind the retry rule. Each
//! method takes the generated request and sends that same request on every attempt,
//! so a retried Deduct carries the caller's idempotency key and is applied once.
//! Purchase is the one call not retried (it has no key: a retry could open a second
//! Checkout Session). RPCs not wrapped here are reached through [`CreditsClient::raw`].

use reeve_proto::credits::v1 as pb;
use tonic::Status;

use crate::connect::{Connection, RawCreditsClient};
use crate::retry::{self, RetryPolicy};

/// A cheap-to-clone credits-svc client.
#[derive(Debug, Clone)]
pub struct CreditsClient {
    raw: RawCreditsClient,
    retry: RetryPolicy,
}

macro_rules! retried {
    ($(#[$doc:meta])* $name:ident, $method:literal, $request:ty, $response:ty) => {
        $(#[$doc])*
        pub async fn $name(&self, request: $request) -> Result<$response, Status> {
            retry::run(&self.retry, $method, || {
                let mut raw = self.raw.clone();
                let request = request.clone();
                async move { raw.$name(request).await.map(tonic::Response::into_inner) }
            })
            .await
        }
    };
}

impl CreditsClient {
    pub fn new(connection: &Connection) -> CreditsClient {
        CreditsClient {
            raw: connection.raw_credits(),
            retry: connection.retry_policy(),
        }
    }

    /// The same client with another retry policy.
    pub fn with_retry(mut self, policy: RetryPolicy) -> CreditsClient {
        self.retry = policy;
        self
    }

    /// The generated client (no retries), for every other RPC.
    pub fn raw(&self) -> RawCreditsClient {
        self.raw.clone()
    }

    retried!(
        get_balance,
        "GetBalance",
        pb::GetBalanceRequest,
        pb::GetBalanceResponse
    );
    retried!(
        /// One deduction, keyed: retried with the same key.
        deduct, "Deduct", pb::DeductRequest, pb::DeductResponse
    );
    retried!(
        /// Up to 10,000 keyed deductions with one outcome each (for steady traffic,
        /// prefer the [`crate::Recorder`]).
        deduct_batch, "DeductBatch", pb::DeductBatchRequest, pb::DeductBatchResponse
    );
    retried!(
        add_credits,
        "AddCredits",
        pb::AddCreditsRequest,
        pb::AddCreditsResponse
    );
    retried!(adjust, "Adjust", pb::AdjustRequest, pb::AdjustResponse);
    retried!(history, "History", pb::HistoryRequest, pb::HistoryResponse);
    retried!(
        record_payment_event,
        "RecordPaymentEvent",
        pb::PaymentEventRequest,
        pb::PaymentEventResponse
    );

    /// Starts a purchase; not retried (no idempotency key).
    pub async fn purchase(
        &self,
        request: pb::PurchaseRequest,
    ) -> Result<pb::PurchaseResponse, Status> {
        self.raw
            .clone()
            .purchase(request)
            .await
            .map(tonic::Response::into_inner)
    }
}
