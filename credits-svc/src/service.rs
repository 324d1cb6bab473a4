//! The gRPC face of the ledger: decode, call the store (or the group commit), encode.
//! Rules live in [`crate::ledger`]; status mapping in [`crate::error`].

use std::sync::Arc;

use reeve_proto::credits::v1 as pb;
use reeve_runtime::Micros;
use reeve_runtime::clock::Clock;
use tonic::{Request, Response, Status};

use crate::checkout::Checkout;
use crate::error::CreditsError;
use crate::group_commit::GroupCommit;
use crate::ledger::{EntryKind, LedgerEntry, WriteOutcome, WriteRequest};
use crate::lots::{Category, Lot, LotTerms};
use crate::payments::{PaymentEvent, PaymentEventKind};
use crate::store::{LedgerStore, PaymentOutcome};

/// Most items one `DeductBatch` may carry.
pub const MAX_BATCH_ITEMS: usize = 10_000;
pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 500;

pub struct CreditsApi {
    store: Arc<dyn LedgerStore>,
    deductions: GroupCommit,
    checkout: Checkout,
    clock: Clock,
}

impl CreditsApi {
    pub fn new(
        store: Arc<dyn LedgerStore>,
        deductions: GroupCommit,
        checkout: Checkout,
        clock: Clock,
    ) -> CreditsApi {
        CreditsApi {
            store,
            deductions,
            checkout,
            clock,
        }
    }

    async fn record_payment(&self, event: &PaymentEvent) -> Result<PaymentOutcome, CreditsError> {
        let outcome = self
            .store
            .record_payment_event(event, self.clock.now_us())
            .await?;
        let label = match &outcome {
            PaymentOutcome::Applied { .. } => "applied",
            PaymentOutcome::Duplicate(_) => "duplicate",
            PaymentOutcome::Nothing { .. } => "nothing",
            PaymentOutcome::UnknownPayment => "unknown_payment",
            PaymentOutcome::Invalid(_) => "invalid",
        };
        metrics::counter!("reeve_payment_events_total", "outcome" => label).increment(1);
        if let PaymentOutcome::Applied { entry, .. } = &outcome {
            record(entry.kind, &WriteOutcome::Applied(entry.clone()));
        }
        Ok(outcome)
    }

    async fn apply_one(&self, write: WriteRequest) -> Result<(LedgerEntry, bool), CreditsError> {
        let outcome = self
            .store
            .apply(std::slice::from_ref(&write), self.clock.now_us())
            .await?
            .pop()
            .ok_or_else(|| CreditsError::invalid("internal", "the store returned no outcome"))?;
        record(write.kind, &outcome);
        single_result(outcome)
    }
}

/// Counts one write outcome: `reeve_ledger_writes_total` by kind and outcome, and the
/// micros moved by applied credits and deductions.
fn record(kind: EntryKind, outcome: &WriteOutcome) {
    let (label, moved) = match outcome {
        WriteOutcome::Applied(entry) => ("applied", Some(entry.amount.0)),
        WriteOutcome::Duplicate(_) => ("duplicate", None),
        WriteOutcome::Insufficient { .. } => ("insufficient", None),
        WriteOutcome::Invalid(_) => ("invalid", None),
    };
    let kind = kind.as_str();
    metrics::counter!("reeve_ledger_writes_total", "kind" => kind, "outcome" => label).increment(1);
    match moved {
        Some(amount) if amount > 0 => {
            metrics::counter!("reeve_credits_added_micros_total", "kind" => kind)
                .increment(amount.unsigned_abs())
        }
        Some(amount) => metrics::counter!("reeve_credits_removed_micros_total", "kind" => kind)
            .increment(amount.unsigned_abs()),
        None => {}
    }
}

/// A single write's outcome as the RPC's result: the entry and whether it is a duplicate.
fn single_result(outcome: WriteOutcome) -> Result<(LedgerEntry, bool), CreditsError> {
    match outcome {
        WriteOutcome::Applied(entry) => Ok((entry, false)),
        WriteOutcome::Duplicate(entry) => Ok((entry, true)),
        WriteOutcome::Insufficient { balance, required } => {
            Err(CreditsError::insufficient(balance, required))
        }
        WriteOutcome::Invalid(invalid) => Err(CreditsError::Invalid(invalid)),
    }
}

fn deduction(item: pb::DeductRequest) -> WriteRequest {
    WriteRequest::caller(
        item.user_id,
        EntryKind::Deduction,
        // A non-positive request amount stays non-negative here and fails validation;
        // i64::MIN cannot be negated and is mapped to a positive value for the same end.
        Micros(item.amount_micros.checked_neg().unwrap_or(i64::MAX)),
        item.idempotency_key,
        item.description,
    )
}

/// Microseconds since the epoch as a protobuf timestamp.
pub fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

/// A protobuf timestamp as microseconds, refusing what micros cannot hold exactly.
fn micros_of(timestamp: &prost_types::Timestamp, field: &str) -> Result<i64, CreditsError> {
    let invalid = || {
        CreditsError::invalid(
            "invalid_expires_at",
            format!("{field} is not a valid timestamp to the microsecond"),
        )
    };
    if !(0..1_000_000_000).contains(&timestamp.nanos) || timestamp.nanos % 1_000 != 0 {
        return Err(invalid());
    }
    timestamp
        .seconds
        .checked_mul(1_000_000)
        .and_then(|us| us.checked_add(i64::from(timestamp.nanos / 1_000)))
        .ok_or_else(invalid)
}

fn category_to_proto(category: Category) -> pb::CreditCategory {
    match category {
        Category::Paid => pb::CreditCategory::Paid,
        Category::Promotional => pb::CreditCategory::Promotional,
    }
}

pub fn lot_to_proto(lot: Lot) -> pb::Lot {
    pb::Lot {
        lot_id: lot.id,
        user_id: lot.user_id,
        category: category_to_proto(lot.category).into(),
        priority: lot.priority,
        original_micros: lot.original.0,
        remaining_micros: lot.remaining.0,
        expires_at: lot.expires_at_us.map(timestamp),
        source: lot.source,
        created_at: Some(timestamp(lot.created_at_us)),
    }
}

pub fn entry_to_proto(entry: LedgerEntry) -> pb::LedgerEntry {
    let kind = match entry.kind {
        EntryKind::Deduction => pb::EntryKind::Deduction,
        EntryKind::Purchase => pb::EntryKind::Purchase,
        EntryKind::Grant => pb::EntryKind::Grant,
        EntryKind::Adjustment => pb::EntryKind::Adjustment,
        EntryKind::Expiration => pb::EntryKind::Expiration,
        EntryKind::Revocation => pb::EntryKind::Revocation,
    };
    pb::LedgerEntry {
        id: entry.id,
        user_id: entry.user_id,
        kind: kind.into(),
        amount_micros: entry.amount.0,
        balance_after_micros: entry.balance_after.0,
        idempotency_key: entry.idempotency_key,
        description: entry.description,
        created_at: Some(timestamp(entry.created_at_us)),
        draws: entry
            .draws
            .into_iter()
            .map(|draw| pb::LotDraw {
                lot_id: draw.lot_id,
                amount_micros: draw.amount.0,
            })
            .collect(),
    }
}

/// The lot terms an AddCredits request asks for (`None`: the kind's defaults).
fn lot_terms(
    request: &pb::AddCreditsRequest,
    kind: EntryKind,
) -> Result<Option<LotTerms>, CreditsError> {
    let category = match pb::CreditCategory::try_from(request.category) {
        Ok(pb::CreditCategory::Unspecified) => None,
        Ok(pb::CreditCategory::Paid) => Some(Category::Paid),
        Ok(pb::CreditCategory::Promotional) => Some(Category::Promotional),
        Err(_) => {
            return Err(CreditsError::invalid(
                "invalid_category",
                "category must be CREDIT_CATEGORY_PAID or CREDIT_CATEGORY_PROMOTIONAL",
            ));
        }
    };
    if kind == EntryKind::Purchase && category == Some(Category::Promotional) {
        return Err(CreditsError::invalid(
            "invalid_category",
            "a purchase is always paid",
        ));
    }
    let expires_at_us = request
        .expires_at
        .as_ref()
        .map(|at| micros_of(at, "expires_at"))
        .transpose()?;
    if category.is_none() && request.priority.is_none() && expires_at_us.is_none() {
        return Ok(None);
    }
    let defaults = LotTerms::default_for(kind);
    let category = category.unwrap_or(defaults.category);
    Ok(Some(LotTerms {
        category,
        priority: request.priority.unwrap_or(category.default_priority()),
        expires_at_us,
    }))
}

fn outcome_to_proto(key: String, outcome: WriteOutcome) -> pb::DeductOutcome {
    use pb::deduct_outcome::Result as R;
    let applied = |entry: &LedgerEntry| pb::Applied {
        entry_id: entry.id,
        balance_after_micros: entry.balance_after.0,
    };
    let result = match outcome {
        WriteOutcome::Applied(entry) => R::Applied(applied(&entry)),
        WriteOutcome::Duplicate(entry) => R::Duplicate(applied(&entry)),
        WriteOutcome::Insufficient { balance, required } => {
            R::Insufficient(pb::InsufficientCredits {
                balance_micros: balance.0,
                required_micros: required.0,
            })
        }
        WriteOutcome::Invalid(invalid) => R::Invalid(pb::Invalid {
            code: invalid.code.to_owned(),
            message: invalid.message,
        }),
    };
    pb::DeductOutcome {
        idempotency_key: key,
        result: Some(result),
    }
}

fn check_user_id(user_id: &str) -> Result<(), CreditsError> {
    reeve_runtime::ids::check_user_id(user_id)
        .map_err(|invalid| CreditsError::Invalid(invalid.into()))
}

fn payment_event(request: pb::PaymentEventRequest) -> Result<PaymentEvent, CreditsError> {
    let kind = match pb::PaymentEventKind::try_from(request.kind) {
        Ok(pb::PaymentEventKind::PaymentSucceeded) => PaymentEventKind::PaymentSucceeded,
        Ok(pb::PaymentEventKind::Refunded) => PaymentEventKind::Refunded,
        Ok(pb::PaymentEventKind::RefundFailed) => PaymentEventKind::RefundFailed,
        Ok(pb::PaymentEventKind::DisputeFundsWithdrawn) => PaymentEventKind::DisputeFundsWithdrawn,
        Ok(pb::PaymentEventKind::DisputeFundsReinstated) => {
            PaymentEventKind::DisputeFundsReinstated
        }
        _ => {
            return Err(CreditsError::invalid(
                "invalid_kind",
                "kind must be one of the PAYMENT_EVENT_KIND_* values",
            ));
        }
    };
    Ok(PaymentEvent {
        kind,
        payment_id: request.payment_id,
        user_id: request.user_id,
        amount: Micros(request.amount_micros),
        object_id: request.object_id,
        description: request.description,
    })
}

fn payment_response(outcome: PaymentOutcome) -> Result<pb::PaymentEventResponse, CreditsError> {
    use pb::PaymentEventOutcome as O;
    let (outcome, entry, user_id, capped, detail) = match outcome {
        PaymentOutcome::Applied { entry, capped } => {
            (O::Applied, Some(entry), None, capped, String::new())
        }
        PaymentOutcome::Duplicate(entry) => {
            (O::Duplicate, Some(entry), None, Micros::ZERO, String::new())
        }
        PaymentOutcome::Nothing {
            user_id,
            detail,
            capped,
        } => (O::NothingToApply, None, Some(user_id), capped, detail),
        PaymentOutcome::UnknownPayment => (
            O::UnknownPayment,
            None,
            None,
            Micros::ZERO,
            "no payment with this id was credited".to_owned(),
        ),
        PaymentOutcome::Invalid(invalid) => return Err(CreditsError::Invalid(invalid)),
    };
    let user_id = user_id
        .or_else(|| entry.as_ref().map(|e| e.user_id.clone()))
        .unwrap_or_default();
    Ok(pb::PaymentEventResponse {
        outcome: outcome.into(),
        entry: entry.map(entry_to_proto),
        user_id,
        capped_micros: capped.0,
        detail,
    })
}

#[tonic::async_trait]
impl pb::credit_service_server::CreditService for CreditsApi {
    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id))]
    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let user_id = request.into_inner().user_id;
        check_user_id(&user_id)?;
        let details = self
            .store
            .balance(&user_id, self.clock.now_us())
            .await
            .map_err(CreditsError::from)?;
        Ok(Response::new(pb::GetBalanceResponse {
            user_id,
            balance_micros: details.balance.0,
            paid_micros: details.paid.0,
            promotional_micros: details.promotional.0,
            next_expiry_at: details.next_expiry.map(|(at, _)| timestamp(at)),
            next_expiry_micros: details.next_expiry.map_or(0, |(_, amount)| amount.0),
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id, idempotency_key = %request.get_ref().idempotency_key))]
    async fn deduct(
        &self,
        request: Request<pb::DeductRequest>,
    ) -> Result<Response<pb::DeductResponse>, Status> {
        let write = deduction(request.into_inner());
        write.validate().map_err(CreditsError::Invalid)?;
        let outcome = self
            .deductions
            .submit(write)
            .await
            .map_err(CreditsError::from)?;
        record(EntryKind::Deduction, &outcome);
        let (entry, duplicate) = single_result(outcome)?;
        Ok(Response::new(pb::DeductResponse {
            entry: Some(entry_to_proto(entry)),
            duplicate,
        }))
    }

    #[tracing::instrument(skip_all, fields(items = request.get_ref().items.len()))]
    async fn deduct_batch(
        &self,
        request: Request<pb::DeductBatchRequest>,
    ) -> Result<Response<pb::DeductBatchResponse>, Status> {
        let items = request.into_inner().items;
        if items.len() > MAX_BATCH_ITEMS {
            return Err(CreditsError::invalid(
                "batch_too_large",
                format!(
                    "a batch holds at most {MAX_BATCH_ITEMS} items, got {}",
                    items.len()
                ),
            )
            .into());
        }
        let writes: Vec<WriteRequest> = items.into_iter().map(deduction).collect();
        let outcomes = self
            .store
            .apply(&writes, self.clock.now_us())
            .await
            .map_err(CreditsError::from)?;
        let outcomes = writes
            .into_iter()
            .zip(outcomes)
            .map(|(write, outcome)| {
                record(EntryKind::Deduction, &outcome);
                outcome_to_proto(write.idempotency_key, outcome)
            })
            .collect();
        Ok(Response::new(pb::DeductBatchResponse { outcomes }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id, idempotency_key = %request.get_ref().idempotency_key))]
    async fn add_credits(
        &self,
        request: Request<pb::AddCreditsRequest>,
    ) -> Result<Response<pb::AddCreditsResponse>, Status> {
        let request = request.into_inner();
        let (entry, duplicate) = match pb::CreditKind::try_from(request.kind) {
            // A purchase is a Stripe payment: keyed by its payment intent id in the
            // Stripe key source, the same write as RecordPaymentEvent's, so a webhook
            // and this call credit it once between them.
            Ok(pb::CreditKind::Purchase) => {
                lot_terms(&request, EntryKind::Purchase)?;
                let event = PaymentEvent {
                    kind: PaymentEventKind::PaymentSucceeded,
                    payment_id: request.idempotency_key,
                    user_id: request.user_id,
                    amount: Micros(request.amount_micros),
                    object_id: String::new(),
                    description: request.description,
                };
                self.record_payment(&event)
                    .await
                    .and_then(|outcome| match outcome {
                        PaymentOutcome::Applied { entry, .. } => Ok((entry, false)),
                        PaymentOutcome::Duplicate(entry) => Ok((entry, true)),
                        PaymentOutcome::Invalid(invalid) => Err(CreditsError::Invalid(invalid)),
                        other => Err(CreditsError::invalid(
                            "internal",
                            format!("a purchase answered {other:?}"),
                        )),
                    })?
            }
            Ok(pb::CreditKind::Grant) => {
                let lot_terms = lot_terms(&request, EntryKind::Grant)?;
                self.apply_one(WriteRequest {
                    lot_terms,
                    ..WriteRequest::caller(
                        request.user_id,
                        EntryKind::Grant,
                        Micros(request.amount_micros),
                        request.idempotency_key,
                        request.description,
                    )
                })
                .await?
            }
            _ => {
                return Err(CreditsError::invalid(
                    "invalid_kind",
                    "kind must be CREDIT_KIND_PURCHASE or CREDIT_KIND_GRANT",
                )
                .into());
            }
        };
        Ok(Response::new(pb::AddCreditsResponse {
            entry: Some(entry_to_proto(entry)),
            duplicate,
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id, idempotency_key = %request.get_ref().idempotency_key))]
    async fn adjust(
        &self,
        request: Request<pb::AdjustRequest>,
    ) -> Result<Response<pb::AdjustResponse>, Status> {
        let request = request.into_inner();
        let write = WriteRequest::caller(
            request.user_id,
            EntryKind::Adjustment,
            Micros(request.amount_micros),
            request.idempotency_key,
            request.reason,
        );
        let (entry, duplicate) = self.apply_one(write).await?;
        Ok(Response::new(pb::AdjustResponse {
            entry: Some(entry_to_proto(entry)),
            duplicate,
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id))]
    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        let page_size = match u32::try_from(request.page_size) {
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(size) if size <= MAX_PAGE_SIZE => size,
            _ => {
                return Err(CreditsError::invalid(
                    "invalid_page_size",
                    format!("page_size must be 0 to {MAX_PAGE_SIZE}"),
                )
                .into());
            }
        };
        let before_id = match request.page_token.as_str() {
            "" => None,
            token => Some(
                token
                    .parse::<i64>()
                    .ok()
                    .filter(|id| *id > 0)
                    .ok_or_else(|| {
                        CreditsError::invalid(
                            "invalid_page_token",
                            "page_token is not one this service issued",
                        )
                    })?,
            ),
        };
        let mut entries = self
            .store
            .history(&request.user_id, before_id, page_size + 1)
            .await
            .map_err(CreditsError::from)?;
        let next_page_token = if entries.len() > page_size as usize {
            entries.truncate(page_size as usize);
            entries.last().map(|e| e.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::HistoryResponse {
            entries: entries.into_iter().map(entry_to_proto).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id, amount_credits = request.get_ref().amount_credits))]
    async fn purchase(
        &self,
        request: Request<pb::PurchaseRequest>,
    ) -> Result<Response<pb::PurchaseResponse>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        let started = self
            .checkout
            .start(&request.user_id, request.amount_credits)
            .await
            .map_err(CreditsError::from)?;
        tracing::info!(session_id = %started.session_id, "checkout session created");
        Ok(Response::new(pb::PurchaseResponse {
            checkout_url: started.checkout_url,
            session_id: started.session_id,
            amount_micros: started.amount.0,
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id))]
    async fn list_lots(
        &self,
        request: Request<pb::ListLotsRequest>,
    ) -> Result<Response<pb::ListLotsResponse>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        let lots = self
            .store
            .lots(&request.user_id, request.include_spent, self.clock.now_us())
            .await
            .map_err(CreditsError::from)?;
        Ok(Response::new(pb::ListLotsResponse {
            lots: lots.into_iter().map(lot_to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(lot_id = request.get_ref().lot_id, idempotency_key = %request.get_ref().idempotency_key))]
    async fn revoke_lot(
        &self,
        request: Request<pb::RevokeLotRequest>,
    ) -> Result<Response<pb::RevokeLotResponse>, Status> {
        let request = request.into_inner();
        let lot = self
            .store
            .lot(request.lot_id)
            .await
            .map_err(CreditsError::from)?
            .ok_or_else(|| {
                CreditsError::NotFound(format!("lot {} does not exist", request.lot_id))
            })?;
        let write =
            WriteRequest::revocation(lot.user_id, lot.id, request.idempotency_key, request.reason);
        let (entry, duplicate) = self.apply_one(write).await?;
        Ok(Response::new(pb::RevokeLotResponse {
            entry: Some(entry_to_proto(entry)),
            duplicate,
        }))
    }

    #[tracing::instrument(skip_all, fields(payment_id = %request.get_ref().payment_id, kind = request.get_ref().kind, object_id = %request.get_ref().object_id))]
    async fn record_payment_event(
        &self,
        request: Request<pb::PaymentEventRequest>,
    ) -> Result<Response<pb::PaymentEventResponse>, Status> {
        let event = payment_event(request.into_inner())?;
        let outcome = self.record_payment(&event).await?;
        Ok(Response::new(payment_response(outcome)?))
    }
}
