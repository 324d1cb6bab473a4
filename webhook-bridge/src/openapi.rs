//! The OpenAPI 3 document of the REST API, generated from the handlers' annotations
//! and served at `/openapi.json`.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::routes::{credits, tier, webhook};

/// Every error: `{"error": {"code": "...", "message": "..."}}`; insufficient credits
/// adds `balance`, `required` (decimal strings) and their `_micros`.
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
    pub required: Option<String>,
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
        webhook::receive, tier::usage, tier::check,
    ),
    components(schemas(ErrorBody, ErrorDetail, HandledBody)),
    modifiers(&SecuritySchemes),
    tags((name = "credits"), (name = "tier"), (name = "stripe"))
)]
pub struct ApiDoc;
