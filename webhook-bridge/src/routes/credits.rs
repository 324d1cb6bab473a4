//! `/api/credits/*`: balance (with its paid and promotional parts), purchase and
//! history for the signed-in user; deduct and batch deduct for services (the gateway).
//! Lots and grants are in [`crate::routes::lots`]. Amounts go out as exact decimal strings
//! with six places, beside the integer micros.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use reeve_proto::credits::v1 as pb;
use reeve_runtime::Micros;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::AppState;
use crate::amount;
use crate::auth::{Service, User};
use crate::error::ApiError;
use crate::routes::{JsonBody, QueryParams, timestamp};

/// Most items one batch may carry (the same bound as credits-svc's).
pub const MAX_BATCH_ITEMS: usize = 10_000;

#[derive(Debug, Serialize, ToSchema)]
pub struct Balance {
    pub user_id: String,
    /// Decimal credits with six places, e.g. "12.500000".
    pub balance: String,
    pub balance_micros: i64,
    /// What is left of the live paid lots (purchases, paid grants).
    pub paid: String,
    pub paid_micros: i64,
    /// What is left of the live promotional lots (grants given away).
    pub promotional: String,
    pub promotional_micros: i64,
    /// The live lot that expires first and what will leave with it; null when no live
    /// lot expires.
    pub next_expiry: Option<NextExpiry>,
    /// What active holds reserve.
    pub held: String,
    pub held_micros: i64,
    /// What may be spent or held now: balance minus held.
    pub available: String,
    pub available_micros: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NextExpiry {
    /// RFC 3339, UTC: from this instant on the lot is no longer spent.
    pub at: String,
    /// Its remainder, decimal credits with six places.
    pub amount: String,
    pub amount_micros: i64,
}

#[utoipa::path(get, path = "/api/credits/balance", tag = "credits",
    responses((status = 200, body = Balance), (status = 401, body = crate::openapi::ErrorBody)),
    security(("user_jwt" = [])))]
pub async fn balance(
    State(state): State<Arc<AppState>>,
    User(user_id): User,
) -> Result<Json<Balance>, ApiError> {
    let reply = state.balances().get(user_id).await?;
    let next_expiry = reply.next_expiry_at.map(|at| NextExpiry {
        at: timestamp(at),
        amount: Micros(reply.next_expiry_micros).to_string(),
        amount_micros: reply.next_expiry_micros,
    });
    Ok(Json(Balance {
        user_id: reply.user_id,
        balance: Micros(reply.balance_micros).to_string(),
        balance_micros: reply.balance_micros,
        paid: Micros(reply.paid_micros).to_string(),
        paid_micros: reply.paid_micros,
        promotional: Micros(reply.promotional_micros).to_string(),
        promotional_micros: reply.promotional_micros,
        next_expiry,
        held: Micros(reply.held_micros).to_string(),
        held_micros: reply.held_micros,
        available: Micros(reply.available_micros).to_string(),
        available_micros: reply.available_micros,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PurchaseBody {
    /// Whole credits (1 credit = 1 USD), as a JSON number or a string.
    #[schema(value_type = String, example = "25")]
    pub amount: Box<RawValue>,
    /// Save the card for auto top-up (Stripe keeps it for off-session charges).
    /// Absent or null: false.
    #[serde(default)]
    pub save_payment_method: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Purchase {
    pub checkout_url: String,
    pub session_id: String,
    /// What will be credited once Stripe confirms the payment.
    pub amount: String,
    pub amount_micros: i64,
}

#[utoipa::path(post, path = "/api/credits/purchase", tag = "credits", request_body = PurchaseBody,
    responses((status = 200, body = Purchase), (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody)),
    security(("user_jwt" = [])))]
pub async fn purchase(
    State(state): State<Arc<AppState>>,
    User(user_id): User,
    JsonBody(body): JsonBody<PurchaseBody>,
) -> Result<Json<Purchase>, ApiError> {
    let amount_credits = amount::parse_whole_credits(&body.amount)?;
    let reply = state
        .credits()
        .purchase(pb::PurchaseRequest {
            user_id,
            amount_credits,
            save_payment_method: body.save_payment_method.unwrap_or(false),
        })
        .await?
        .into_inner();
    Ok(Json(Purchase {
        checkout_url: reply.checkout_url,
        session_id: reply.session_id,
        amount: Micros(reply.amount_micros).to_string(),
        amount_micros: reply.amount_micros,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DeductBody {
    pub user_id: String,
    /// Positive decimal credits, e.g. 0.0125 or "0.0125" (at most six decimals).
    #[schema(value_type = String, example = "0.0125")]
    pub amount: Box<RawValue>,
    pub idempotency_key: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Entry {
    pub id: i64,
    pub user_id: String,
    /// deduction | purchase | grant | adjustment | expiration | revocation
    pub kind: String,
    /// Signed decimal credits: negative for deductions and debits.
    pub amount: String,
    pub amount_micros: i64,
    pub balance_after: String,
    pub balance_after_micros: i64,
    pub idempotency_key: String,
    pub description: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// What this entry took from each lot, in the order drawn (empty for credits).
    pub draws: Vec<Draw>,
}

/// Micros one entry took from one lot.
#[derive(Debug, Serialize, ToSchema)]
pub struct Draw {
    pub lot_id: i64,
    /// Decimal credits with six places, positive.
    pub amount: String,
    pub amount_micros: i64,
}

/// The REST name of an entry kind.
pub fn kind_name(kind: i32) -> &'static str {
    match pb::EntryKind::try_from(kind) {
        Ok(pb::EntryKind::Deduction) => "deduction",
        Ok(pb::EntryKind::Purchase) => "purchase",
        Ok(pb::EntryKind::Grant) => "grant",
        Ok(pb::EntryKind::Adjustment) => "adjustment",
        Ok(pb::EntryKind::Expiration) => "expiration",
        Ok(pb::EntryKind::Revocation) => "revocation",
        _ => "unknown",
    }
}

impl From<pb::LedgerEntry> for Entry {
    fn from(entry: pb::LedgerEntry) -> Entry {
        Entry {
            id: entry.id,
            user_id: entry.user_id,
            kind: kind_name(entry.kind).to_owned(),
            amount: Micros(entry.amount_micros).to_string(),
            amount_micros: entry.amount_micros,
            balance_after: Micros(entry.balance_after_micros).to_string(),
            balance_after_micros: entry.balance_after_micros,
            idempotency_key: entry.idempotency_key,
            description: entry.description,
            created_at: entry.created_at.map(timestamp).unwrap_or_default(),
            draws: entry
                .draws
                .into_iter()
                .map(|draw| Draw {
                    lot_id: draw.lot_id,
                    amount: Micros(draw.amount_micros).to_string(),
                    amount_micros: draw.amount_micros,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Deducted {
    pub entry: Entry,
    /// True when the key had been applied before: `entry` is the original.
    pub duplicate: bool,
}

fn deduct_request(body: DeductBody) -> Result<pb::DeductRequest, ApiError> {
    let amount = amount::parse_positive(&body.amount)?;
    Ok(pb::DeductRequest {
        user_id: body.user_id,
        amount_micros: amount.0,
        idempotency_key: body.idempotency_key,
        description: body.description,
    })
}

#[utoipa::path(post, path = "/api/credits/deduct", tag = "credits", request_body = DeductBody,
    responses((status = 200, body = Deducted), (status = 400, body = crate::openapi::ErrorBody),
        (status = 402, description = "insufficient credits: `error.balance` and `error.required`", body = crate::openapi::ErrorBody),
        (status = 409, description = "idempotency key reused for another request", body = crate::openapi::ErrorBody)),
    security(("service_token" = [])))]
pub async fn deduct(
    State(state): State<Arc<AppState>>,
    _service: Service,
    JsonBody(body): JsonBody<DeductBody>,
) -> Result<Json<Deducted>, ApiError> {
    let request = deduct_request(body)?;
    let reply = state.credits().deduct(request).await?.into_inner();
    let entry = reply.entry.ok_or_else(|| ApiError::Internal {
        code: "backend_error",
        message: "credits-svc sent no entry".to_owned(),
    })?;
    Ok(Json(Deducted {
        entry: entry.into(),
        duplicate: reply.duplicate,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DeductBatchBody {
    /// At most 10,000 deductions, applied one by one in order.
    pub items: Vec<DeductBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Outcome {
    pub idempotency_key: String,
    /// applied | duplicate | insufficient | invalid
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Outcome {
    fn new(idempotency_key: String, status: &'static str) -> Outcome {
        Outcome {
            idempotency_key,
            status,
            entry_id: None,
            balance_after: None,
            balance: None,
            required: None,
            code: None,
            message: None,
        }
    }

    fn invalid(idempotency_key: String, code: String, message: String) -> Outcome {
        Outcome {
            code: Some(code),
            message: Some(message),
            ..Outcome::new(idempotency_key, "invalid")
        }
    }

    fn from_proto(outcome: pb::DeductOutcome) -> Outcome {
        use pb::deduct_outcome::Result as R;
        let key = outcome.idempotency_key;
        let applied = |key: String, status, a: pb::Applied| Outcome {
            entry_id: Some(a.entry_id),
            balance_after: Some(Micros(a.balance_after_micros).to_string()),
            ..Outcome::new(key, status)
        };
        match outcome.result {
            Some(R::Applied(a)) => applied(key, "applied", a),
            Some(R::Duplicate(a)) => applied(key, "duplicate", a),
            Some(R::Insufficient(i)) => Outcome {
                balance: Some(Micros(i.balance_micros).to_string()),
                required: Some(Micros(i.required_micros).to_string()),
                ..Outcome::new(key, "insufficient")
            },
            Some(R::Invalid(i)) => Outcome::invalid(key, i.code, i.message),
            None => Outcome::invalid(
                key,
                "internal".to_owned(),
                "credits-svc sent no outcome".to_owned(),
            ),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchOutcomes {
    /// One outcome per item, in request order.
    pub outcomes: Vec<Outcome>,
}

/// Items whose amount cannot be read are answered `invalid` here; the rest go to
/// credits-svc as one batch, and the outcomes are put back in request order.
#[utoipa::path(post, path = "/api/credits/deduct/batch", tag = "credits", request_body = DeductBatchBody,
    responses((status = 200, body = BatchOutcomes), (status = 400, body = crate::openapi::ErrorBody)),
    security(("service_token" = [])))]
pub async fn deduct_batch(
    State(state): State<Arc<AppState>>,
    _service: Service,
    JsonBody(body): JsonBody<DeductBatchBody>,
) -> Result<Json<BatchOutcomes>, ApiError> {
    if body.items.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!(
                "a batch holds at most {MAX_BATCH_ITEMS} items, got {}",
                body.items.len()
            ),
        ));
    }
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(body.items.len());
    let mut valid = Vec::new();
    for item in body.items {
        let key = item.idempotency_key.clone();
        match deduct_request(item) {
            Ok(request) => {
                valid.push(request);
                outcomes.push(None);
            }
            Err(error) => outcomes.push(Some(Outcome::invalid(
                key,
                error.code().to_owned(),
                error.to_string(),
            ))),
        }
    }
    let mut applied = if valid.is_empty() {
        Vec::new()
    } else {
        state
            .credits()
            .deduct_batch(pb::DeductBatchRequest { items: valid })
            .await?
            .into_inner()
            .outcomes
    }
    .into_iter();
    let outcomes = outcomes
        .into_iter()
        .map(|slot| match slot {
            Some(outcome) => Ok(outcome),
            None => applied
                .next()
                .map(Outcome::from_proto)
                .ok_or_else(|| ApiError::Internal {
                    code: "backend_error",
                    message: "credits-svc sent too few outcomes".to_owned(),
                }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(BatchOutcomes { outcomes }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// 1 to 500; default 50.
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    /// Newest first.
    pub entries: Vec<Entry>,
    /// Absent on the last page.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/credits/history", tag = "credits", params(HistoryQuery),
    responses((status = 200, body = History), (status = 400, body = crate::openapi::ErrorBody)),
    security(("user_jwt" = [])))]
pub async fn history(
    State(state): State<Arc<AppState>>,
    User(user_id): User,
    QueryParams(query): QueryParams<HistoryQuery>,
) -> Result<Json<History>, ApiError> {
    let page_size = match query.limit.as_deref() {
        None => 0,
        Some(text) => text
            .parse::<i32>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| ApiError::bad_request("invalid_limit", "limit must be 1 to 500"))?,
    };
    // An empty cursor is no cursor a page ever gave: refused, as the document says.
    if query.cursor.as_deref() == Some("") {
        return Err(ApiError::bad_request(
            "invalid_cursor",
            "cursor must be the next_cursor of a previous page",
        ));
    }
    let page_token = query.cursor.unwrap_or_default();
    let reply = state
        .credits()
        .history(pb::HistoryRequest {
            user_id,
            page_size,
            page_token,
        })
        .await
        .map_err(|status| match ApiError::from(status) {
            ApiError::BadRequest { code, message } if code == "invalid_page_token" => {
                ApiError::bad_request("invalid_cursor", message)
            }
            other => other,
        })?
        .into_inner();
    Ok(Json(History {
        entries: reply.entries.into_iter().map(Entry::from).collect(),
        next_cursor: Some(reply.next_page_token).filter(|t| !t.is_empty()),
    }))
}
