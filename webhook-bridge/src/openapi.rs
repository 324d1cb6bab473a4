//! The OpenAPI 3 document of the REST API, generated from the handlers' annotations
//! and served at `/openapi.json`, then made exact by [`document`]: the constraints the
//! server enforces (identifier rules of `reeve_runtime::ids`, amount grammar, `limit`
//! range, required parameters, the quota registry's features) and the refusals every
//! route can answer (401, 403, 413, 503), so that a schema-valid request is never
//! refused for its shape and generated clients and fuzzers agree with the server.
//!
//! The constraints are written here once, from the same constants the checks use; the
//! checks themselves live with the handlers and the services, never here.

use reeve_runtime::ids::{
    MAX_DESCRIPTION_CHARS, MAX_KEY_CHARS, MAX_USER_ID_CHARS, NO_CONTROL_PATTERN,
};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::routes::{credits, history_csv, holds, lots, notifications, tier, topup, webhook};

/// Every error: `{"error": {"code": "...", "message": "..."}}`; insufficient credits
/// adds `balance`, `held`, `required` (decimal strings) and their `_micros`;
/// `hold_already_resolved` adds the hold's stored outcome (`hold_id`, `status`,
/// `settled`, `entry_id`, `shortfall`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `insufficient_credits`, `invalid_amount`.
    pub code: String,
    pub message: String,
    pub balance: Option<String>,
    pub balance_micros: Option<i64>,
    /// What active holds reserve (insufficient_credits).
    pub held: Option<String>,
    pub held_micros: Option<i64>,
    pub required: Option<String>,
    pub required_micros: Option<i64>,
    /// hold_already_resolved: the hold and its stored outcome.
    pub hold_id: Option<String>,
    /// held | settled | released | expired
    pub status: Option<String>,
    /// The settled cost; null unless `status` is settled.
    pub settled: Option<String>,
    pub settled_micros: Option<i64>,
    /// The settle's deduction entry; null when none.
    pub entry_id: Option<i64>,
    pub shortfall: Option<String>,
    pub shortfall_micros: Option<i64>,
}

/// What the webhook answers Stripe.
#[derive(Debug, Serialize, ToSchema)]
pub struct HandledBody {
    pub received: bool,
    pub event_id: String,
    /// credited | debited | ignored | ignored_currency | needs_attention
    pub outcome: String,
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "user_jwt",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "service_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Reeve credits & quotas", description = "Prepaid credits (exact decimal amounts, 1 credit = 1 USD) and tier quotas."),
    paths(
        credits::balance, credits::purchase, credits::deduct, credits::deduct_batch, credits::history,
        history_csv::download,
        lots::list, lots::grant,
        holds::create, holds::settle, holds::release, holds::read,
        notifications::set_threshold,
        topup::read, topup::set,
        webhook::receive, tier::usage, tier::check,
    ),
    components(schemas(ErrorBody, ErrorDetail, HandledBody)),
    modifiers(&SecuritySchemes),
    tags((name = "credits"), (name = "holds"), (name = "tier"), (name = "stripe"))
)]
pub struct ApiDoc;

/// A positive decimal with at most six decimals and no exponent, sign or leading zero:
/// what `Micros::parse_positive_credits` accepts, zero excluded, below the services'
/// bound on one amount (10^15 micros = 10^9 credits, included).
const POSITIVE_DECIMAL_PATTERN: &str = r"^(?:[1-9][0-9]{0,8}(?:\.[0-9]{1,6})?|1000000000(?:\.0{1,6})?|0\.(?:[1-9][0-9]{0,5}|0[1-9][0-9]{0,4}|00[1-9][0-9]{0,3}|000[1-9][0-9]{0,2}|0000[1-9][0-9]?|00000[1-9]))$";
/// A settle's cost: zero (at most six zero decimals) or a positive decimal as above.
const NON_NEGATIVE_DECIMAL_PATTERN: &str = r"^(?:0(?:\.0{1,6})?|[1-9][0-9]{0,8}(?:\.[0-9]{1,6})?|1000000000(?:\.0{1,6})?|0\.(?:[1-9][0-9]{0,5}|0[1-9][0-9]{0,4}|00[1-9][0-9]{0,3}|000[1-9][0-9]{0,2}|0000[1-9][0-9]?|00000[1-9]))$";
/// An RFC 3339 instant from the year 2100 on, to the microsecond at most, without a
/// leap second (what `routes::lots::expires_at` reads and is surely in the future).
const FUTURE_INSTANT_PATTERN: &str = r"^(?:2[1-9][0-9]{2}|[3-9][0-9]{3})-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$";
/// Largest whole amount: the services' bound on one amount, 10^9 credits.
const MAX_DOCUMENTED_CREDITS: i64 = 1_000_000_000;
/// Purchases: whole credits within the default bounds (`REEVE_PURCHASE_MIN` 5,
/// `REEVE_PURCHASE_MAX` 1000), optionally written with zero decimals.
const PURCHASE_PATTERN: &str = r"^(?:[5-9]|[1-9][0-9]|[1-9][0-9]{2}|1000)(?:\.0{1,6})?$";
const PURCHASE_MIN: i64 = 5;
const PURCHASE_MAX: i64 = 1_000;
/// A description: line breaks and tabs allowed, other control characters not.
const DESCRIPTION_PATTERN: &str = r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F]*$";
/// `next_cursor` values: the id of a ledger entry.
const CURSOR_PATTERN: &str = r"^[1-9][0-9]{0,17}$";
/// Most items of a batch (the same bound as the handler's).
const MAX_BATCH_ITEMS: usize = crate::routes::credits::MAX_BATCH_ITEMS;

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

fn identifier(max_chars: usize, description: &str) -> Value {
    json!({
        "type": "string", "minLength": 1, "maxLength": max_chars,
        "pattern": NO_CONTROL_PATTERN, "description": description,
    })
}

/// The served document; `features` (the quota registry's, when quota-svc answered)
/// become the `feature` parameter's enum.
pub fn document(features: Option<&[String]>) -> Value {
    let mut doc = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(doc) => doc,
        Err(error) => {
            tracing::error!(%error, "cannot serialise the OpenAPI document");
            return Value::Null;
        }
    };
    let schemas = &mut doc["components"]["schemas"];
    let amount = json!({
        "description": "Positive decimal credits, at most six decimals: a decimal string such as \"0.0125\", or a whole number.",
        "oneOf": [
            {"type": "string", "pattern": POSITIVE_DECIMAL_PATTERN},
            {"type": "integer", "minimum": 1, "maximum": MAX_DOCUMENTED_CREDITS}
        ]
    });
    let deduct = &mut schemas["DeductBody"]["properties"];
    deduct["user_id"] = identifier(
        MAX_USER_ID_CHARS,
        "1 to 128 characters, no control characters.",
    );
    deduct["idempotency_key"] = identifier(
        MAX_KEY_CHARS,
        "1 to 256 characters, no control characters; unique per deduction.",
    );
    deduct["description"] = json!({
        "type": "string", "maxLength": MAX_DESCRIPTION_CHARS, "pattern": DESCRIPTION_PATTERN,
        "description": "At most 1,024 characters; line breaks and tabs allowed, no other control characters.",
    });
    deduct["amount"] = amount.clone();
    // A grant: the identifiers and amount of a deduction, and the lot's terms. Null is
    // read as absent for the optional fields.
    let identifiers = schemas["DeductBody"]["properties"].clone();
    let grant = &mut schemas["GrantBody"]["properties"];
    for field in ["user_id", "idempotency_key", "description"] {
        grant[field] = identifiers[field].clone();
    }
    grant["amount"] = amount;
    grant["category"] = json!({
        "description": "\"promotional\" (the default) or \"paid\".",
        "enum": ["paid", "promotional", null],
    });
    grant["priority"] = json!({
        "description": "0 to 100, lower spent first; default 10 (promotional) or 50 (paid).",
        "type": ["integer", "null"], "minimum": 0, "maximum": lots::MAX_PRIORITY,
    });
    // "In the future" is no JSON Schema keyword: the document admits the instants from
    // the year 2100 on (always in the future here), the server any future instant.
    grant["expires_at"] = json!({
        "description": "RFC 3339, at most six decimals of a second; must be in the future (else 400 invalid_expires_at): this document admits instants from the year 2100 on, the server any future instant. Absent or null: never expires.",
        "type": ["string", "null"], "format": "date-time", "minLength": 1,
        "pattern": FUTURE_INSTANT_PATTERN,
    });
    // A hold: a deduction's identifiers and amount, the hold id (a key) and a ttl.
    let hold = &mut schemas["HoldBody"]["properties"];
    for field in ["user_id", "description"] {
        hold[field] = identifiers[field].clone();
    }
    hold["hold_id"] = identifier(
        MAX_KEY_CHARS,
        "1 to 256 characters, no control characters; the hold's idempotency key.",
    );
    hold["amount"] = identifiers["amount"].clone();
    hold["ttl_seconds"] = json!({
        "description": "Seconds the hold reserves: 1 to 86,400. Absent or null: 600.",
        "type": ["integer", "null"], "minimum": 1, "maximum": holds::MAX_TTL_SECS,
    });
    let settle = &mut schemas["SettleBody"]["properties"];
    settle["description"] = identifiers["description"].clone();
    settle["amount"] = json!({
        "description": "The real cost: decimal credits, 0 or more, at most six decimals (0 releases the hold).",
        "oneOf": [
            {"type": "string", "pattern": NON_NEGATIVE_DECIMAL_PATTERN},
            {"type": "integer", "minimum": 0, "maximum": MAX_DOCUMENTED_CREDITS}
        ]
    });
    // The low-balance alert: a user id and a non-negative threshold (0 or null removes).
    let threshold = &mut schemas["ThresholdBody"]["properties"];
    threshold["user_id"] = identifiers["user_id"].clone();
    threshold["threshold"] = json!({
        "description": "Decimal credits, 0 or more, at most six decimals; 0 or null removes the alert.",
        "oneOf": [
            {"type": "string", "pattern": NON_NEGATIVE_DECIMAL_PATTERN},
            {"type": "integer", "minimum": 0, "maximum": MAX_DOCUMENTED_CREDITS},
            {"type": "null"}
        ]
    });
    // Auto top-up: exactly the four fields, whole credits within the handler's bounds.
    let whole = |description: &str, max: i64| json!({"description": description, "type": "integer", "minimum": 1, "maximum": max});
    schemas["AutoTopUpBody"] = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["enabled", "threshold", "amount", "monthly_cap"],
        "properties": {
            "enabled": {"type": "boolean"},
            "threshold": whole("Whole credits: top up when the available balance goes below this.", topup::MAX_THRESHOLD_CREDITS),
            "amount": whole("Whole credits bought by one top-up.", topup::MAX_AMOUNT_CREDITS),
            "monthly_cap": whole("Whole credits: the most top-ups may buy in one calendar month (UTC), counting those that succeeded or are in flight.", topup::MAX_MONTHLY_CAP_CREDITS),
        }
    });
    schemas["PurchaseBody"]["properties"]["save_payment_method"] = json!({
        "description": "Save the card for auto top-up (a Stripe customer, setup_future_usage off_session). Absent or null: false.",
        "type": ["boolean", "null"],
    });
    schemas["PurchaseBody"]["properties"]["amount"] = json!({
        "description": "Whole credits within the purchase bounds (by default 5 to 1000).",
        "oneOf": [
            {"type": "string", "pattern": PURCHASE_PATTERN},
            {"type": "integer", "minimum": PURCHASE_MIN, "maximum": PURCHASE_MAX}
        ]
    });
    // A batch validates each item on its own and answers a refused one as an `invalid`
    // outcome, so items are documented by their JSON shape only.
    schemas["BatchItem"] = json!({
        "type": "object",
        "required": ["user_id", "amount", "idempotency_key"],
        "description": "One deduction; an item that breaks the rules of DeductBody is answered `invalid` in its outcome, the others are applied.",
        "properties": {
            "user_id": {"type": "string"},
            "amount": {"description": "As in DeductBody."},
            "idempotency_key": {"type": "string"},
            "description": {"type": "string"}
        }
    });
    schemas["DeductBatchBody"]["properties"]["items"] = json!({
        "type": "array", "maxItems": MAX_BATCH_ITEMS,
        "items": {"$ref": "#/components/schemas/BatchItem"}
    });

    let Some(paths) = doc["paths"].as_object_mut() else {
        return doc;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (_, operation) in item.iter_mut() {
            let schemes: Vec<String> = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_object)
                .flat_map(|o| o.keys().cloned())
                .collect();
            let has_body = operation.get("requestBody").is_some();
            let has_parameters = operation
                .get("parameters")
                .and_then(Value::as_array)
                .is_some_and(|p| !p.is_empty());
            if let Some(parameters) = operation
                .get_mut("parameters")
                .and_then(Value::as_array_mut)
            {
                for parameter in parameters.iter_mut() {
                    constrain_parameter(path, parameter, features);
                }
            }
            let responses = &mut operation["responses"];
            let mut add = |status: &str, description: &str| {
                if responses.get(status).is_none() {
                    responses[status] = error_response(description);
                }
            };
            if has_body || has_parameters {
                add(
                    "400",
                    "the request is malformed or a value is refused (`error.code` says which)",
                );
            }
            if !schemes.is_empty() {
                add(
                    "401",
                    "missing_token, invalid_token, token_expired or invalid_service_token",
                );
            }
            if schemes.iter().any(|s| s == "service_token") {
                add(
                    "403",
                    "insufficient_scope: the service token lacks the scope of this route",
                );
            }
            if has_body {
                add("413", "body_too_large: the body is larger than 8 MiB");
            }
            add("502", "backend_error: a backend service failed");
            add(
                "503",
                "backend_unavailable or service_unavailable: retry later",
            );
        }
    }
    doc
}

fn constrain_parameter(path: &str, parameter: &mut Value, features: Option<&[String]>) {
    let name = parameter["name"].as_str().unwrap_or_default().to_owned();
    match (path, name.as_str()) {
        ("/api/credits/history", "limit") => {
            parameter["required"] = json!(false);
            parameter["schema"] = json!({"type": "integer", "minimum": 1, "maximum": 500});
        }
        ("/api/credits/history", "cursor") => {
            parameter["required"] = json!(false);
            parameter["schema"] = json!({"type": "string", "pattern": CURSOR_PATTERN});
        }
        (path, "hold_id") if path.starts_with("/api/credits/holds/") => {
            parameter["required"] = json!(true);
            parameter["schema"] = identifier(
                MAX_KEY_CHARS,
                "The hold's id: 1 to 256 characters, no control characters.",
            );
        }
        ("/api/tier/check", "feature") => {
            parameter["required"] = json!(true);
            parameter["schema"] = match features {
                Some(features) if !features.is_empty() => {
                    json!({"type": "string", "enum": features})
                }
                _ => json!({"type": "string", "minLength": 1}),
            };
        }
        _ => {}
    }
}

/// `GET /openapi.json`.
pub async fn serve(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<crate::AppState>>,
) -> axum::Json<Value> {
    axum::Json(document(state.registry_features().await))
}
