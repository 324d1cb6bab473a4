//! `POST /api/credits/webhook`: Stripe's deliveries. Authenticated by the
//! `Stripe-Signature` alone; see [`crate::stripe::interpret`] for what each event means and
//! [`crate::stripe::apply`] for how it is applied.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use secrecy::ExposeSecret;
use tracing::Instrument;

use crate::AppState;
use crate::error::ApiError;
use crate::stripe::apply::{self, Handled};
use crate::stripe::verify;

#[utoipa::path(post, path = "/api/credits/webhook", tag = "stripe",
    request_body(content = String, description = "A Stripe event, exactly as Stripe sends it", content_type = "application/json"),
    params(("Stripe-Signature" = String, Header, description = "t=<unix seconds>,v1=<HMAC-SHA256 hex>")),
    responses((status = 200, body = crate::openapi::HandledBody),
        (status = 400, description = "missing, malformed, stale or wrong signature; nothing is recorded", body = crate::openapi::ErrorBody),
        (status = 503, description = "not durable yet: Stripe retries", body = crate::openapi::ErrorBody)))]
pub async fn receive(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Handled>, ApiError> {
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let event = verify::verify(&body, signature, state.webhook_secret.expose_secret())
        .inspect_err(|error| {
            tracing::warn!(code = error.code(), "Stripe webhook refused");
        })?;
    let span =
        tracing::info_span!("stripe_event", event_id = %event.id, event_type = %event.event_type);
    apply::handle(&state, event)
        .instrument(span)
        .await
        .map(Json)
}
