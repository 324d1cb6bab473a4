//! The gRPC face of the ledger: decode, call the store (or the group commit), encode.
//! Rules live in [`crate::ledger`]; status mapping in [`crate::error`].

use std::sync::Arc;

use reeve_proto::credits::v1 as pb;
use reeve_runtime::Micros;
use reeve_runtime::clock::Clock;
use tonic::{Request, Response, Status};

use crate::checkout::Checkout;
use crate::error::CreditsError;
use crate::group_commit::{GroupCommit, HoldCommit};
use crate::holds::{Hold, HoldOp, HoldOutcome, HoldRequest, HoldStatus};
use crate::ledger::{EntryKind, LedgerEntry, WriteOutcome, WriteRequest};
use crate::lots::{Category, Lot, LotTerms};
use crate::payments::{PaymentEvent, PaymentEventKind};
use crate::store::{BalanceDetails, LedgerStore, PaymentOutcome};

/// Most items one `DeductBatch` or `SettleHoldBatch` may carry.
pub const MAX_BATCH_ITEMS: usize = 10_000;

/// Refuses a batch of more than [`MAX_BATCH_ITEMS`] items as a whole.
fn check_batch_len(len: usize) -> Result<(), CreditsError> {
    if len > MAX_BATCH_ITEMS {
        return Err(CreditsError::invalid(
            "batch_too_large",
            format!("a batch holds at most {MAX_BATCH_ITEMS} items, got {len}"),
        ));
    }
    Ok(())
}

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 500;

pub struct CreditsApi {
    store: Arc<dyn LedgerStore>,
    deductions: GroupCommit,
    holds: HoldCommit,
    checkout: Checkout,
    clock: Clock,
}

impl CreditsApi {
    pub fn new(
        store: Arc<dyn LedgerStore>,
        deductions: GroupCommit,
        holds: HoldCommit,
        checkout: Checkout,
        clock: Clock,
    ) -> CreditsApi {
        CreditsApi {
            store,
            deductions,
            holds,
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
        WriteOutcome::Insufficient {
            balance,
            held,
            required,
        } => Err(CreditsError::insufficient(balance, held, required)),
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

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the range of `google.protobuf.Timestamp`.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A protobuf timestamp as microseconds, refusing what micros cannot hold exactly
/// under `code`. Bounds of a query (`since`, `until`) may lie past the timestamp's
/// range.
fn micros_of(
    timestamp: &prost_types::Timestamp,
    field: &str,
    code: &'static str,
) -> Result<i64, CreditsError> {
    let refused = || not_a_timestamp(field, code);
    if !(0..1_000_000_000).contains(&timestamp.nanos) || timestamp.nanos % 1_000 != 0 {
        return Err(refused());
    }
    timestamp
        .seconds
        .checked_mul(1_000_000)
        .and_then(|us| us.checked_add(i64::from(timestamp.nanos / 1_000)))
        .ok_or_else(refused)
}

/// An instant that is stored and answered back (a lot's expiry): also within the
/// timestamp's own range, since one past it (year 10000) no client library nor
/// RFC 3339 can read.
fn stored_micros_of(
    timestamp: &prost_types::Timestamp,
    field: &str,
    code: &'static str,
) -> Result<i64, CreditsError> {
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&timestamp.seconds) {
        return Err(not_a_timestamp(field, code));
    }
    micros_of(timestamp, field, code)
}

fn not_a_timestamp(field: &str, code: &'static str) -> CreditsError {
    CreditsError::invalid(
        code,
        format!("{field} is not a valid timestamp to the microsecond"),
    )
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
        .map(|at| stored_micros_of(at, "expires_at", "invalid_expires_at"))
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
        WriteOutcome::Insufficient {
            balance,
            held,
            required,
        } => R::Insufficient(pb::InsufficientCredits {
            balance_micros: balance.0,
            required_micros: required.0,
            held_micros: held.0,
        }),
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

/// Most users one `GetBalances` call may ask about.
pub const MAX_BALANCES_PER_CALL: usize = 1_000;

/// A balance answer as `GetBalance` and `GetBalances` give it.
fn balance_response(user_id: String, details: &BalanceDetails) -> pb::GetBalanceResponse {
    pb::GetBalanceResponse {
        user_id,
        balance_micros: details.balance.0,
        paid_micros: details.paid.0,
        promotional_micros: details.promotional.0,
        next_expiry_at: details.next_expiry.map(|(at, _)| timestamp(at)),
        next_expiry_micros: details.next_expiry.map_or(0, |(_, amount)| amount.0),
        held_micros: details.held.0,
        available_micros: details.available().0,
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

fn page_size(requested: i32) -> Result<u32, CreditsError> {
    match u32::try_from(requested) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) if size <= MAX_PAGE_SIZE => Ok(size),
        _ => Err(CreditsError::invalid(
            "invalid_page_size",
            format!("page_size must be 0 to {MAX_PAGE_SIZE}"),
        )),
    }
}

/// A hold as answered at `now_us`: a HELD hold past its instant is EXPIRED.
pub fn hold_to_proto(hold: Hold, now_us: i64) -> pb::Hold {
    let lapsed = hold.status == HoldStatus::Held && hold.expires_at_us <= now_us;
    let status = match (hold.status, lapsed) {
        (_, true) | (HoldStatus::Expired, _) => pb::HoldStatus::Expired,
        (HoldStatus::Held, false) => pb::HoldStatus::Held,
        (HoldStatus::Settled, _) => pb::HoldStatus::Settled,
        (HoldStatus::Released, _) => pb::HoldStatus::Released,
    };
    pb::Hold {
        hold_id: hold.hold_id,
        user_id: hold.user_id,
        amount_micros: hold.amount.0,
        status: status.into(),
        settled_micros: hold.settled.map_or(0, |m| m.0),
        entry_id: hold.entry_id.unwrap_or(0),
        created_at: Some(timestamp(hold.created_at_us)),
        expires_at: Some(timestamp(hold.expires_at_us)),
        resolved_at: if lapsed {
            Some(timestamp(hold.expires_at_us))
        } else {
            hold.resolved_at_us.map(timestamp)
        },
        shortfall_micros: hold.shortfall.0,
        late: hold.late,
        description: hold.description,
        reservations: if lapsed || hold.status != HoldStatus::Held {
            Vec::new()
        } else {
            hold.reservations
                .into_iter()
                .map(|(lot_id, amount)| pb::LotDraw {
                    lot_id,
                    amount_micros: amount.0,
                })
                .collect()
        },
    }
}

/// A hold operation's outcome as an RPC result.
enum HoldAnswer {
    Hold { hold: Hold, duplicate: bool },
    Settled(Box<pb::SettleHoldResponse>),
}

fn hold_answer(outcome: HoldOutcome, now_us: i64) -> Result<HoldAnswer, CreditsError> {
    match outcome {
        HoldOutcome::Hold { hold, duplicate } => Ok(HoldAnswer::Hold { hold, duplicate }),
        HoldOutcome::Settled {
            hold,
            entry,
            duplicate,
        } => Ok(HoldAnswer::Settled(Box::new(pb::SettleHoldResponse {
            shortfall_micros: hold.shortfall.0,
            hold: Some(hold_to_proto(hold, now_us)),
            entry: Some(entry_to_proto(entry)),
            duplicate,
        }))),
        HoldOutcome::Insufficient {
            balance,
            held,
            required,
        } => Err(CreditsError::insufficient(balance, held, required)),
        HoldOutcome::AlreadyResolved(hold) => Err(CreditsError::HoldResolved(Box::new(hold))),
        HoldOutcome::NotFound => Err(CreditsError::NotFound("no hold with this id".to_owned())),
        HoldOutcome::Invalid(invalid) => Err(CreditsError::Invalid(invalid)),
    }
}

impl CreditsApi {
    async fn hold_op(&self, op: HoldOp) -> Result<HoldAnswer, CreditsError> {
        op.validate().map_err(CreditsError::Invalid)?;
        let outcome = self.holds.submit(op).await?;
        let label = match &outcome {
            HoldOutcome::Hold {
                duplicate: true, ..
            }
            | HoldOutcome::Settled {
                duplicate: true, ..
            } => "duplicate",
            HoldOutcome::Hold { .. } | HoldOutcome::Settled { .. } => "applied",
            HoldOutcome::Insufficient { .. } => "insufficient",
            HoldOutcome::AlreadyResolved(_) => "already_resolved",
            HoldOutcome::NotFound => "not_found",
            HoldOutcome::Invalid(_) => "invalid",
        };
        metrics::counter!("reeve_hold_operations_total", "outcome" => label).increment(1);
        hold_answer(outcome, self.clock.now_us())
    }

    fn hold_reply(&self, answer: HoldAnswer) -> (pb::Hold, bool) {
        match answer {
            HoldAnswer::Hold { hold, duplicate } => {
                (hold_to_proto(hold, self.clock.now_us()), duplicate)
            }
            HoldAnswer::Settled(settled) => (settled.hold.unwrap_or_default(), settled.duplicate),
        }
    }
}

fn ttl_or_default(ttl_seconds: i64) -> i64 {
    if ttl_seconds == 0 {
        crate::holds::DEFAULT_TTL_SECS
    } else {
        ttl_seconds
    }
}

#[tonic::async_trait]
impl pb::credit_service_server::CreditService for CreditsApi {
    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id, hold_id = %request.get_ref().hold_id))]
    async fn hold(
        &self,
        request: Request<pb::HoldRequest>,
    ) -> Result<Response<pb::HoldResponse>, Status> {
        let request = request.into_inner();
        let answer = self
            .hold_op(HoldOp::Hold(HoldRequest {
                hold_id: request.hold_id,
                user_id: request.user_id,
                amount: Micros(request.amount_micros),
                ttl_secs: ttl_or_default(request.ttl_seconds),
                description: request.description,
            }))
            .await?;
        let (hold, duplicate) = self.hold_reply(answer);
        Ok(Response::new(pb::HoldResponse {
            hold: Some(hold),
            duplicate,
        }))
    }

    #[tracing::instrument(skip_all, fields(hold_id = %request.get_ref().hold_id))]
    async fn settle_hold(
        &self,
        request: Request<pb::SettleHoldRequest>,
    ) -> Result<Response<pb::SettleHoldResponse>, Status> {
        let request = request.into_inner();
        let answer = self
            .hold_op(HoldOp::Settle {
                hold_id: request.hold_id,
                amount: Micros(request.amount_micros),
                description: request.description,
            })
            .await?;
        Ok(Response::new(match answer {
            HoldAnswer::Settled(settled) => *settled,
            // A settle of 0 (a release).
            HoldAnswer::Hold { hold, duplicate } => pb::SettleHoldResponse {
                shortfall_micros: 0,
                hold: Some(hold_to_proto(hold, self.clock.now_us())),
                entry: None,
                duplicate,
            },
        }))
    }

    #[tracing::instrument(skip_all, fields(items = request.get_ref().items.len()))]
    async fn settle_hold_batch(
        &self,
        request: Request<pb::SettleHoldBatchRequest>,
    ) -> Result<Response<pb::SettleHoldBatchResponse>, Status> {
        let items = request.into_inner().items;
        check_batch_len(items.len())?;
        let ids: Vec<String> = items.iter().map(|i| i.hold_id.clone()).collect();
        let ops: Vec<HoldOp> = items
            .into_iter()
            .map(|item| HoldOp::Settle {
                hold_id: item.hold_id,
                amount: Micros(item.amount_micros),
                description: item.description,
            })
            .collect();
        let now_us = self.clock.now_us();
        let outcomes = self
            .store
            .apply_holds(&ops, now_us)
            .await
            .map_err(CreditsError::from)?;
        use pb::settle_hold_outcome::Result as R;
        let outcomes = ids
            .into_iter()
            .zip(outcomes)
            .map(|(hold_id, outcome)| {
                let result = match hold_answer(outcome, now_us) {
                    Ok(HoldAnswer::Settled(settled)) => R::Settled(*settled),
                    Ok(HoldAnswer::Hold { hold, duplicate }) => {
                        R::Settled(pb::SettleHoldResponse {
                            shortfall_micros: 0,
                            hold: Some(hold_to_proto(hold, now_us)),
                            entry: None,
                            duplicate,
                        })
                    }
                    Err(CreditsError::HoldResolved(hold)) => {
                        R::AlreadyResolved(hold_to_proto(*hold, now_us))
                    }
                    Err(CreditsError::NotFound(message)) => R::Invalid(pb::Invalid {
                        code: crate::holds::HOLD_NOT_FOUND.to_owned(),
                        message,
                    }),
                    Err(other) => R::Invalid(pb::Invalid {
                        code: match &other {
                            CreditsError::Invalid(invalid) => invalid.code.to_owned(),
                            _ => "invalid".to_owned(),
                        },
                        message: other.to_string(),
                    }),
                };
                pb::SettleHoldOutcome {
                    hold_id,
                    result: Some(result),
                }
            })
            .collect();
        Ok(Response::new(pb::SettleHoldBatchResponse { outcomes }))
    }

    #[tracing::instrument(skip_all, fields(hold_id = %request.get_ref().hold_id))]
    async fn release_hold(
        &self,
        request: Request<pb::ReleaseHoldRequest>,
    ) -> Result<Response<pb::ReleaseHoldResponse>, Status> {
        let answer = self
            .hold_op(HoldOp::Release {
                hold_id: request.into_inner().hold_id,
            })
            .await?;
        let (hold, duplicate) = self.hold_reply(answer);
        Ok(Response::new(pb::ReleaseHoldResponse {
            hold: Some(hold),
            duplicate,
        }))
    }

    #[tracing::instrument(skip_all, fields(hold_id = %request.get_ref().hold_id))]
    async fn extend_hold(
        &self,
        request: Request<pb::ExtendHoldRequest>,
    ) -> Result<Response<pb::ExtendHoldResponse>, Status> {
        let request = request.into_inner();
        let answer = self
            .hold_op(HoldOp::Extend {
                hold_id: request.hold_id,
                ttl_secs: ttl_or_default(request.ttl_seconds),
            })
            .await?;
        let (hold, _) = self.hold_reply(answer);
        Ok(Response::new(pb::ExtendHoldResponse { hold: Some(hold) }))
    }

    #[tracing::instrument(skip_all, fields(hold_id = %request.get_ref().hold_id))]
    async fn get_hold(
        &self,
        request: Request<pb::GetHoldRequest>,
    ) -> Result<Response<pb::GetHoldResponse>, Status> {
        let hold_id = request.into_inner().hold_id;
        reeve_runtime::ids::check_key(&hold_id, "hold_id")
            .map_err(|invalid| CreditsError::Invalid(invalid.into()))?;
        let hold = self
            .store
            .hold(&hold_id)
            .await
            .map_err(CreditsError::from)?
            .ok_or_else(|| CreditsError::NotFound(format!("no hold {hold_id:?}")))?;
        Ok(Response::new(pb::GetHoldResponse {
            hold: Some(hold_to_proto(hold, self.clock.now_us())),
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id))]
    async fn list_holds(
        &self,
        request: Request<pb::ListHoldsRequest>,
    ) -> Result<Response<pb::ListHoldsResponse>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        let status = match pb::HoldStatus::try_from(request.status) {
            Ok(pb::HoldStatus::Unspecified) => None,
            Ok(pb::HoldStatus::Held) => Some(HoldStatus::Held),
            Ok(pb::HoldStatus::Settled) => Some(HoldStatus::Settled),
            Ok(pb::HoldStatus::Released) => Some(HoldStatus::Released),
            Ok(pb::HoldStatus::Expired) => Some(HoldStatus::Expired),
            Err(_) => {
                return Err(CreditsError::invalid("invalid_status", "unknown hold status").into());
            }
        };
        let page_size = page_size(request.page_size)?;
        let before = match request.page_token.as_str() {
            "" => None,
            token => Some(
                token
                    .split_once(':')
                    .and_then(|(us, id)| Some((us.parse::<i64>().ok()?, id.to_owned())))
                    .ok_or_else(|| {
                        CreditsError::invalid(
                            "invalid_page_token",
                            "page_token is not one this service issued",
                        )
                    })?,
            ),
        };
        let mut holds = self
            .store
            .holds(&request.user_id, status, before, page_size + 1)
            .await
            .map_err(CreditsError::from)?;
        let next_page_token = if holds.len() > page_size as usize {
            holds.truncate(page_size as usize);
            holds
                .last()
                .map(|h| format!("{}:{}", h.created_at_us, h.hold_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let now_us = self.clock.now_us();
        Ok(Response::new(pb::ListHoldsResponse {
            holds: holds
                .into_iter()
                .map(|h| hold_to_proto(h, now_us))
                .collect(),
            next_page_token,
        }))
    }

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
        Ok(Response::new(balance_response(user_id, &details)))
    }

    #[tracing::instrument(skip_all, fields(users = request.get_ref().user_ids.len()))]
    async fn get_balances(
        &self,
        request: Request<pb::GetBalancesRequest>,
    ) -> Result<Response<pb::GetBalancesResponse>, Status> {
        let user_ids = request.into_inner().user_ids;
        if user_ids.len() > MAX_BALANCES_PER_CALL {
            return Err(CreditsError::invalid(
                "too_many_user_ids",
                format!(
                    "at most {MAX_BALANCES_PER_CALL} user_ids per call, got {}",
                    user_ids.len()
                ),
            )
            .into());
        }
        for (at, user_id) in user_ids.iter().enumerate() {
            reeve_runtime::ids::check_user_id(user_id).map_err(|invalid| {
                CreditsError::invalid(invalid.code, format!("user_ids[{at}]: {}", invalid.message))
            })?;
        }
        // One instant for the call; on PostgreSQL the questions are coalesced into as
        // few statements as the store's batches allow.
        let now_us = self.clock.now_us();
        let details = futures::future::try_join_all(
            user_ids
                .iter()
                .map(|user_id| self.store.balance(user_id, now_us)),
        )
        .await
        .map_err(CreditsError::from)?;
        Ok(Response::new(pb::GetBalancesResponse {
            balances: user_ids
                .into_iter()
                .zip(details)
                .map(|(user_id, details)| balance_response(user_id, &details))
                .collect(),
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
        check_batch_len(items.len())?;
        let writes: Vec<WriteRequest> = items.into_iter().map(deduction).collect();
        let outcomes = self
            .store
            .apply_independent(&writes, self.clock.now_us())
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
        let page_size = page_size(request.page_size)?;
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
            .start(
                &request.user_id,
                request.amount_credits,
                self.card_saving(&request.user_id, request.save_payment_method)
                    .await?,
            )
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
        let request = request.into_inner();
        if request.kind == i32::from(pb::PaymentEventKind::TopupFailed) {
            return Ok(Response::new(self.topup_failed(request).await?));
        }
        let topup = TopUpFacts::of(&request);
        let event = payment_event(request)?;
        let outcome = self.record_payment(&event).await?;
        self.after_payment(&event, &outcome, topup).await?;
        Ok(Response::new(payment_response(outcome)?))
    }

    #[tracing::instrument(skip_all, fields(payment_ids = request.get_ref().payment_ids.len()))]
    async fn list_payment_entries(
        &self,
        request: Request<pb::ListPaymentEntriesRequest>,
    ) -> Result<Response<pb::ListPaymentEntriesResponse>, Status> {
        let request = request.into_inner();
        if request.payment_ids.len() > 10_000 {
            return Err(CreditsError::invalid(
                "too_many_payment_ids",
                "at most 10,000 payment_ids per call",
            )
            .into());
        }
        for id in &request.payment_ids {
            reeve_runtime::ids::check_key(id, "payment_ids")
                .map_err(|invalid| CreditsError::Invalid(invalid.into()))?;
        }
        let bound = |at: Option<&prost_types::Timestamp>, field, default| {
            at.map_or(Ok(default), |t| micros_of(t, field, "invalid_timestamp"))
        };
        let since_us = bound(request.since.as_ref(), "since", i64::MIN)?;
        let until_us = bound(request.until.as_ref(), "until", i64::MAX)?;
        let page_size = match u32::try_from(request.page_size) {
            Ok(0) => 500,
            Ok(size) if size <= 1_000 => size,
            _ => {
                return Err(CreditsError::invalid(
                    "invalid_page_size",
                    "page_size must be 0 to 1000",
                )
                .into());
            }
        };
        let after_id = match request.page_token.as_str() {
            "" => 0,
            token => token
                .parse::<i64>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| {
                    CreditsError::invalid(
                        "invalid_page_token",
                        "page_token is not one this service issued",
                    )
                })?,
        };
        let mut entries = self
            .store
            .payment_entries(
                &request.payment_ids,
                since_us,
                until_us,
                after_id,
                page_size + 1,
            )
            .await
            .map_err(CreditsError::from)?;
        let next_page_token = if entries.len() > page_size as usize {
            entries.truncate(page_size as usize);
            entries.last().map(|e| e.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let entries = entries
            .into_iter()
            .map(|entry| pb::PaymentEntry {
                payment_id: entry.payment_id.clone().unwrap_or_default(),
                key_source: entry.key_source.as_str().to_owned(),
                entry: Some(entry_to_proto(entry)),
            })
            .collect();
        Ok(Response::new(pb::ListPaymentEntriesResponse {
            entries,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id))]
    async fn set_balance_alert(
        &self,
        request: Request<pb::SetBalanceAlertRequest>,
    ) -> Result<Response<pb::SetBalanceAlertResponse>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        let threshold = match request.threshold_micros {
            0 => None,
            micros if micros > 0 && micros <= MAX_ALERT_THRESHOLD_MICROS => Some(Micros(micros)),
            _ => {
                return Err(CreditsError::invalid(
                    "invalid_threshold",
                    "threshold_micros must be 0 (remove) to 10^15",
                )
                .into());
            }
        };
        self.store
            .set_balance_alert(&request.user_id, threshold, self.clock.now_us())
            .await
            .map_err(CreditsError::from)?;
        Ok(Response::new(pb::SetBalanceAlertResponse {
            user_id: request.user_id,
            threshold_micros: request.threshold_micros,
        }))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id))]
    async fn get_auto_top_up(
        &self,
        request: Request<pb::GetAutoTopUpRequest>,
    ) -> Result<Response<pb::AutoTopUp>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        let view = self
            .store
            .topups()
            .view(&request.user_id, self.clock.now_us())
            .await
            .map_err(CreditsError::from)?;
        Ok(Response::new(auto_topup_to_proto(request.user_id, view)))
    }

    #[tracing::instrument(skip_all, fields(user_id = %request.get_ref().user_id, enabled = request.get_ref().enabled))]
    async fn set_auto_top_up(
        &self,
        request: Request<pb::SetAutoTopUpRequest>,
    ) -> Result<Response<pb::AutoTopUp>, Status> {
        let request = request.into_inner();
        check_user_id(&request.user_id)?;
        let settings = crate::topup::Settings::validate(
            request.enabled,
            request.threshold_micros,
            request.amount_micros,
            request.monthly_cap_micros,
        )
        .map_err(CreditsError::Invalid)?;
        let topups = self.store.topups();
        let now_us = self.clock.now_us();
        topups
            .set(&request.user_id, &settings, now_us)
            .await
            .map_err(CreditsError::from)?;
        let view = topups
            .view(&request.user_id, now_us)
            .await
            .map_err(CreditsError::from)?;
        Ok(Response::new(auto_topup_to_proto(request.user_id, view)))
    }
}

/// What a payment event says about auto top-up: a card it saved, an attempt it paid.
struct TopUpFacts {
    card: Option<crate::topup::Card>,
    attempt_id: Option<String>,
}

impl TopUpFacts {
    fn of(request: &pb::PaymentEventRequest) -> TopUpFacts {
        let card = (!request.saved_customer_id.is_empty()
            && !request.saved_payment_method_id.is_empty())
        .then(|| crate::topup::Card {
            customer_id: request.saved_customer_id.clone(),
            payment_method_id: request.saved_payment_method_id.clone(),
        });
        TopUpFacts {
            card,
            attempt_id: Some(request.topup_attempt_id.clone()).filter(|a| !a.is_empty()),
        }
    }
}

impl CreditsApi {
    /// How a purchase saves its card: not at all, or for the user's Stripe customer
    /// (a new one when they have none yet).
    async fn card_saving(
        &self,
        user_id: &str,
        save: bool,
    ) -> Result<crate::checkout::CardSaving, CreditsError> {
        use crate::checkout::CardSaving;
        if !save {
            return Ok(CardSaving::No);
        }
        check_user_id(user_id)?;
        Ok(match self.store.topups().card(user_id).await? {
            Some(card) => CardSaving::Customer(card.customer_id),
            None => CardSaving::NewCustomer,
        })
    }

    /// `TOPUP_FAILED`: the attempt waiting for its user's action on this payment intent
    /// fails and counts as a decline (nothing moves in the ledger).
    async fn topup_failed(
        &self,
        request: pb::PaymentEventRequest,
    ) -> Result<pb::PaymentEventResponse, CreditsError> {
        let invalid =
            |invalid: reeve_runtime::ids::InvalidId| CreditsError::Invalid(invalid.into());
        check_user_id(&request.user_id)?;
        reeve_runtime::ids::check_key(&request.payment_id, "payment_id").map_err(invalid)?;
        reeve_runtime::ids::check_key(&request.topup_attempt_id, "topup_attempt_id")
            .map_err(invalid)?;
        reeve_runtime::ids::check_key(&request.failure_code, "failure_code").map_err(invalid)?;
        reeve_runtime::ids::check_description(&request.description).map_err(invalid)?;
        let failed = self
            .store
            .topups()
            .answer_from_webhook(
                &request.topup_attempt_id,
                &request.user_id,
                &crate::topup::ChargeResult::Declined {
                    code: request.failure_code.clone(),
                    message: request.description.clone(),
                    payment_intent_id: Some(request.payment_id.clone()),
                },
                self.clock.now_us(),
            )
            .await?;
        let attempt = &request.topup_attempt_id;
        let (outcome, detail) = if failed {
            tracing::info!(user_id = %request.user_id, %attempt, code = %request.failure_code, "auto top-up failed after waiting for the user");
            (
                pb::PaymentEventOutcome::Applied,
                format!(
                    "auto top-up attempt {attempt} failed: {}",
                    request.failure_code
                ),
            )
        } else {
            (
                pb::PaymentEventOutcome::NothingToApply,
                format!(
                    "auto top-up attempt {attempt} was not waiting on payment {}",
                    request.payment_id
                ),
            )
        };
        Ok(pb::PaymentEventResponse {
            outcome: outcome.into(),
            entry: None,
            user_id: request.user_id,
            capped_micros: 0,
            detail,
        })
    }

    /// After a payment was credited (now or before): save the card it was made to
    /// save, and complete the auto top-up attempt it paid. Both are idempotent, so a
    /// redelivered webhook (answered only once this is done) changes nothing more.
    async fn after_payment(
        &self,
        event: &PaymentEvent,
        outcome: &PaymentOutcome,
        facts: TopUpFacts,
    ) -> Result<(), CreditsError> {
        if event.kind != PaymentEventKind::PaymentSucceeded {
            return Ok(());
        }
        let entry = match outcome {
            PaymentOutcome::Applied { entry, .. } | PaymentOutcome::Duplicate(entry) => entry,
            _ => return Ok(()),
        };
        if entry.user_id != event.user_id {
            return Ok(());
        }
        let topups = self.store.topups();
        if let Some(card) = &facts.card {
            reeve_runtime::ids::check_key(&card.customer_id, "saved_customer_id")
                .and_then(|()| {
                    reeve_runtime::ids::check_key(
                        &card.payment_method_id,
                        "saved_payment_method_id",
                    )
                })
                .map_err(|invalid| CreditsError::Invalid(invalid.into()))?;
            let fresh = topups
                .save_card(&event.user_id, &event.payment_id, card, self.clock.now_us())
                .await?;
            if fresh {
                tracing::info!(user_id = %event.user_id, payment_id = %event.payment_id, "card saved for auto top-up");
            }
        }
        if let Some(attempt_id) = &facts.attempt_id {
            let completed = topups
                .complete(
                    attempt_id,
                    &event.user_id,
                    &event.payment_id,
                    self.clock.now_us(),
                )
                .await?;
            if completed {
                tracing::info!(user_id = %event.user_id, %attempt_id, "auto top-up completed by its payment");
            }
        }
        Ok(())
    }
}

fn auto_topup_to_proto(user_id: String, view: crate::store::TopUpView) -> pb::AutoTopUp {
    let settings = view.settings;
    pb::AutoTopUp {
        user_id,
        configured: settings.is_some(),
        enabled: settings.is_some_and(|s| s.enabled),
        threshold_micros: settings.map_or(0, |s| s.threshold.0),
        amount_micros: settings.map_or(0, |s| s.amount.0),
        monthly_cap_micros: settings.map_or(0, |s| s.monthly_cap.0),
        payment_method_saved: view.card_saved,
        suspended: view.suspended.is_some(),
        suspended_reason: view
            .suspended
            .map(|r| r.as_str().to_owned())
            .unwrap_or_default(),
        consecutive_failures: view.consecutive_failures,
        retry_after: (view.retry_after_us > 0).then(|| timestamp(view.retry_after_us)),
        month_used_micros: view.month_used.0,
        last_attempt: view.last_attempt.map(|a| pb::TopUpAttempt {
            attempt_id: a.attempt_id,
            amount_micros: a.amount.0,
            state: a.state.as_str().to_owned(),
            payment_intent_id: a.payment_intent_id.unwrap_or_default(),
            failure_code: a.failure_code.unwrap_or_default(),
            created_at: Some(timestamp(a.created_at_us)),
            action_url: a.action_url.unwrap_or_default(),
        }),
    }
}

/// The largest low-balance threshold: 10^9 credits, the services' amount bound.
const MAX_ALERT_THRESHOLD_MICROS: i64 = 1_000_000_000 * 1_000_000;
