//! The typed credits-svc client: the generated client behind the retry rule. Each
//! method takes the generated request and sends that same request on every attempt,
//! so a retried Deduct carries the caller's idempotency key and is applied once.
//! Purchase is the one call not retried (it has no key: a retry could open a second
//! Checkout Session). RPCs not wrapped here are reached through [`CreditsClient::raw`].
//!
//! Holds are keyed by `hold_id`: a retried Hold answers the original hold
//! (`duplicate`), a retried settle of the same amount the stored result. Refusals the
//! caller acts on (insufficient credits, a hold already resolved) are read out of the
//! status's `ErrorInfo` by [`Refusal::of`].

use std::collections::HashMap;

use reeve_proto::credits::v1 as pb;
use tonic::Status;
use tonic_types::StatusExt;

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
        /// Up to 1,000 users' balances, one answer per id in order (for many concurrent
        /// questions, prefer the coalescing [`crate::BalanceReader`]).
        get_balances,
        "GetBalances",
        pb::GetBalancesRequest,
        pb::GetBalancesResponse
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

    retried!(
        /// Reserves credits for `ttl_seconds` under the caller's `hold_id` (the key).
        hold, "Hold", pb::HoldRequest, pb::HoldResponse
    );
    retried!(
        /// Records the real cost of a hold once (0 releases it). For steady traffic,
        /// prefer [`crate::Recorder::settle`], which batches through SettleHoldBatch.
        settle_hold, "SettleHold", pb::SettleHoldRequest, pb::SettleHoldResponse
    );
    retried!(
        /// Up to 10,000 settles with one outcome each.
        settle_hold_batch,
        "SettleHoldBatch",
        pb::SettleHoldBatchRequest,
        pb::SettleHoldBatchResponse
    );
    retried!(
        /// Frees a hold's reservation (repeatable; refused after a settle).
        release_hold,
        "ReleaseHold",
        pb::ReleaseHoldRequest,
        pb::ReleaseHoldResponse
    );
    retried!(
        /// Moves an active hold's expiry to now + `ttl_seconds` (long streams).
        extend_hold, "ExtendHold", pb::ExtendHoldRequest, pb::ExtendHoldResponse
    );
    retried!(get_hold, "GetHold", pb::GetHoldRequest, pb::GetHoldResponse);
    retried!(
        list_holds,
        "ListHolds",
        pb::ListHoldsRequest,
        pb::ListHoldsResponse
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

/// A refusal credits-svc explains in the status's `ErrorInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `INSUFFICIENT_CREDITS` (Deduct, Hold): nothing was written.
    Insufficient {
        balance_micros: i64,
        /// What active holds reserve (0 in a Deduct's refusal from older servers).
        held_micros: i64,
        required_micros: i64,
    },
    /// `HOLD_ALREADY_RESOLVED` (SettleHold, ReleaseHold, ExtendHold): the hold's
    /// stored outcome refuses the call.
    HoldAlreadyResolved {
        hold_id: String,
        /// `settled`, `released` or `expired`.
        status: String,
        settled_micros: i64,
        entry_id: i64,
    },
}

impl Refusal {
    /// The refusal `status` carries, if it is one of these.
    pub fn of(status: &Status) -> Option<Refusal> {
        if status.code() != tonic::Code::FailedPrecondition {
            return None;
        }
        let info = status.get_details_error_info()?;
        let metadata: &HashMap<String, String> = &info.metadata;
        let micros = |key: &str| {
            metadata
                .get(key)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        match info.reason.as_str() {
            "INSUFFICIENT_CREDITS" => Some(Refusal::Insufficient {
                balance_micros: micros("balance_micros"),
                held_micros: micros("held_micros"),
                required_micros: micros("required_micros"),
            }),
            "HOLD_ALREADY_RESOLVED" => Some(Refusal::HoldAlreadyResolved {
                hold_id: metadata.get("hold_id").cloned().unwrap_or_default(),
                status: metadata.get("status").cloned().unwrap_or_default(),
                settled_micros: micros("settled_micros"),
                entry_id: micros("entry_id"),
            }),
            _ => None,
        }
    }
}
