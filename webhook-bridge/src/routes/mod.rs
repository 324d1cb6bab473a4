//! The HTTP routes, grouped by resource. Handlers decode, make one gRPC call and
//! encode; errors go through [`crate::error::ApiError`].

pub mod billing;
pub mod credits;
pub mod health;
pub mod history_csv;
pub mod holds;
pub mod lots;
pub mod notifications;
pub mod tier;
pub mod topup;
pub mod webhook;

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON request body whose rejections are our JSON errors (code `invalid_json`),
/// not axum's plain-text ones.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<JsonBody<T>, ApiError> {
        let bytes = axum::body::Bytes::from_request(request, state).await?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!("the body is not the expected JSON: {e}"),
            )
        })
    }
}

/// Query parameters whose rejections (a duplicated or unknown parameter, bad
/// percent-encoding) are our JSON errors (code `invalid_query`), not axum's plain text.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<QueryParams<T>, ApiError> {
        let axum::extract::Query(value) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(QueryParams(value))
    }
}

/// A whole number from its raw JSON text: an integer, or a number whose fraction is
/// only zeros (`222.0` is the integer 222 to JSON Schema, so generated clients send
/// it); never an exponent or a string.
pub fn whole_number(raw: &serde_json::value::RawValue) -> Option<i64> {
    let text = raw.get().trim();
    let whole = match text.split_once('.') {
        Some((whole, zeros)) if !zeros.is_empty() && zeros.bytes().all(|b| b == b'0') => whole,
        Some(_) => return None,
        None => text,
    };
    serde_json::from_str::<i64>(whole).ok()
}

/// RFC 3339 in UTC with microseconds, e.g. `2026-11-25T12:00:00.000001Z`.
pub fn timestamp(at: prost_types::Timestamp) -> String {
    let nanos = u32::try_from(at.nanos).unwrap_or(0);
    chrono::DateTime::from_timestamp(at.seconds, nanos)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}
