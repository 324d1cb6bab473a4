//! The one place where bridge errors become HTTP responses: a JSON body
//! `{"error": {"code": "...", "message": "...", ...}}` with a stable machine-readable
//! code and the right status. gRPC statuses from the backends are mapped here too, by
//! their `ErrorInfo` reason, so a client never sees a backend's internals.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use reeve_runtime::Micros;
use serde_json::{Map, Value, json};
use tonic::Code;
use tonic_types::StatusExt;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or a value is refused.
    #[error("{message}")]
    BadRequest { code: String, message: String },
    /// 401: no valid credentials for this route.
    #[error("{message}")]
    Unauthorized { code: &'static str, message: String },
    /// 403: a service token without the scope this route needs.
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// 402: a deduction or hold larger than what may be spent; `held` is what active
    /// holds reserve (when the backend says).
    #[error("insufficient credits: balance {balance}, required {required}")]
    InsufficientCredits {
        balance: Micros,
        held: Option<Micros>,
        required: Micros,
    },
    /// 409 `hold_already_resolved`: the hold's stored outcome refuses this settle or
    /// release; the outcome goes in the body.
    #[error("{message}")]
    HoldAlreadyResolved {
        message: String,
        hold_id: String,
        status: String,
        settled: Option<Micros>,
        entry_id: Option<i64>,
        shortfall: Micros,
    },
    /// 404
    #[error("{message}")]
    NotFound { code: String, message: String },
    /// 409: an idempotency key reused for a different request, and the like.
    #[error("{message}")]
    Conflict { code: String, message: String },
    /// 503: a backend or the database cannot be reached; retry later.
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    /// 502/500: something on our side failed; details are logged, not returned.
    #[error("{message}")]
    Internal { code: &'static str, message: String },
    /// What the HTTP layer refuses before a handler runs: 405 `method_not_allowed`,
    /// 413 `body_too_large`, and the like (see [`ApiError::refused`]).
    #[error("{message}")]
    Refused {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
}

impl ApiError {
    pub fn bad_request(code: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Unauthorized {
            code,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::Unavailable {
            code: "service_unavailable",
            message: message.into(),
        }
    }

    /// The error for a refusal of the HTTP layer (axum's rejections, the method router,
    /// the body limit), by its status: one code per status.
    pub fn refused(status: StatusCode, message: impl Into<String>) -> ApiError {
        let code = match status {
            StatusCode::NOT_FOUND => {
                return ApiError::NotFound {
                    code: "not_found".to_owned(),
                    message: message.into(),
                };
            }
            StatusCode::BAD_REQUEST => {
                return ApiError::bad_request("invalid_request", message);
            }
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::REQUEST_TIMEOUT => "request_timeout",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
            s if s.is_server_error() => "internal_error",
            _ => "invalid_request",
        };
        ApiError::Refused {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Refused { status, .. } => *status,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::InsufficientCredits { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } | ApiError::HoldAlreadyResolved { .. } => {
                StatusCode::CONFLICT
            }
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal {
                code: "backend_error",
                ..
            } => StatusCode::BAD_GATEWAY,
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &str {
        match self {
            ApiError::BadRequest { code, .. }
            | ApiError::NotFound { code, .. }
            | ApiError::Conflict { code, .. } => code,
            ApiError::Unauthorized { code, .. }
            | ApiError::Forbidden { code, .. }
            | ApiError::Unavailable { code, .. }
            | ApiError::Internal { code, .. }
            | ApiError::Refused { code, .. } => code,
            ApiError::InsufficientCredits { .. } => "insufficient_credits",
            ApiError::HoldAlreadyResolved { .. } => "hold_already_resolved",
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".to_owned(), Value::from(self.code()));
        error.insert("message".to_owned(), Value::from(self.to_string()));
        match self {
            ApiError::InsufficientCredits {
                balance,
                held,
                required,
            } => {
                error.insert("balance".to_owned(), Value::from(balance.to_string()));
                error.insert("required".to_owned(), Value::from(required.to_string()));
                error.insert("balance_micros".to_owned(), Value::from(balance.0));
                error.insert("required_micros".to_owned(), Value::from(required.0));
                if let Some(held) = held {
                    error.insert("held".to_owned(), Value::from(held.to_string()));
                    error.insert("held_micros".to_owned(), Value::from(held.0));
                }
            }
            ApiError::HoldAlreadyResolved {
                hold_id,
                status,
                settled,
                entry_id,
                shortfall,
                ..
            } => {
                error.insert("hold_id".to_owned(), Value::from(hold_id.as_str()));
                error.insert("status".to_owned(), Value::from(status.as_str()));
                error.insert(
                    "settled".to_owned(),
                    settled.map_or(Value::Null, |m| Value::from(m.to_string())),
                );
                error.insert(
                    "settled_micros".to_owned(),
                    settled.map_or(Value::Null, |m| Value::from(m.0)),
                );
                error.insert(
                    "entry_id".to_owned(),
                    entry_id.map_or(Value::Null, Value::from),
                );
                error.insert("shortfall".to_owned(), Value::from(shortfall.to_string()));
                error.insert("shortfall_micros".to_owned(), Value::from(shortfall.0));
            }
            _ => {}
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

/// A request body that could not be read: too large (413) or cut off (400).
impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::refused(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than this server accepts",
            ),
            _ => ApiError::bad_request("invalid_body", rejection.body_text()),
        }
    }
}

/// A query string that does not fit the route's parameters (a duplicated or unknown
/// parameter, bad percent-encoding).
impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> ApiError {
        ApiError::bad_request("invalid_query", rejection.body_text())
    }
}

/// Longest framework message kept when an error is rewritten into the envelope.
const MAX_REFUSAL_TEXT: usize = 4096;

/// The middleware that makes every error the envelope: an error response that is not
/// JSON yet (axum's rejections, the method router's 405, a 413 from the body limit) is
/// rewritten through [`ApiError::refused`], keeping its status and its `Allow` header.
pub async fn envelope_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_REFUSAL_TEXT)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("the request was refused")
            .to_owned()
    } else {
        text
    };
    let mut rewritten = ApiError::refused(status, message).into_response();
    if let Some(allow) = parts.headers.get(axum::http::header::ALLOW) {
        rewritten
            .headers_mut()
            .insert(axum::http::header::ALLOW, allow.clone());
    }
    rewritten
}

/// The `ErrorInfo` reason and metadata a backend attached, if any.
fn error_info(
    status: &tonic::Status,
) -> Option<(String, std::collections::HashMap<String, String>)> {
    status
        .get_details_error_info()
        .map(|info| (info.reason, info.metadata))
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> ApiError {
        let info = error_info(&status);
        let reason = info.as_ref().map(|(reason, _)| reason.to_ascii_lowercase());
        let message = status.message().to_owned();
        match status.code() {
            Code::InvalidArgument => ApiError::BadRequest {
                code: reason.unwrap_or_else(|| "invalid_argument".to_owned()),
                message,
            },
            Code::AlreadyExists => ApiError::Conflict {
                code: reason.unwrap_or_else(|| "already_exists".to_owned()),
                message,
            },
            Code::NotFound => ApiError::NotFound {
                code: reason.unwrap_or_else(|| "not_found".to_owned()),
                message,
            },
            Code::FailedPrecondition => match info {
                Some((reason, metadata)) if reason == "INSUFFICIENT_CREDITS" => {
                    let micros = |key: &str| {
                        metadata
                            .get(key)
                            .and_then(|v| v.parse::<i64>().ok())
                            .map(Micros)
                    };
                    match (micros("balance_micros"), micros("required_micros")) {
                        (Some(balance), Some(required)) => ApiError::InsufficientCredits {
                            balance,
                            held: micros("held_micros"),
                            required,
                        },
                        _ => ApiError::Internal {
                            code: "backend_error",
                            message: "malformed insufficient-credits reply".to_owned(),
                        },
                    }
                }
                Some((reason, metadata)) if reason == "HOLD_ALREADY_RESOLVED" => {
                    hold_already_resolved(message, &metadata)
                }
                Some((reason, _)) if reason == "PURCHASES_DISABLED" => ApiError::Unavailable {
                    code: "purchases_disabled",
                    message,
                },
                other => ApiError::Conflict {
                    code: other
                        .map(|(r, _)| r.to_ascii_lowercase())
                        .unwrap_or_else(|| "failed_precondition".to_owned()),
                    message,
                },
            },
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Cancelled => {
                tracing::warn!(code = ?status.code(), %message, "backend unavailable");
                ApiError::Unavailable {
                    code: "backend_unavailable",
                    message: "a backend service is unavailable; retry".to_owned(),
                }
            }
            code => {
                tracing::error!(?code, %message, "backend call failed");
                ApiError::Internal {
                    code: "backend_error",
                    message: "a backend service failed".to_owned(),
                }
            }
        }
    }
}

/// The stored outcome a `HOLD_ALREADY_RESOLVED` carries (`hold_id`, `status`,
/// `settled_micros`, `entry_id`, `shortfall_micros`). Only a settled hold has a settled
/// amount; an entry id of 0 is none.
fn hold_already_resolved(
    message: String,
    metadata: &std::collections::HashMap<String, String>,
) -> ApiError {
    let text = |key: &str| metadata.get(key).cloned().unwrap_or_default();
    let number = |key: &str| metadata.get(key).and_then(|v| v.parse::<i64>().ok());
    let status = text("status");
    ApiError::HoldAlreadyResolved {
        message,
        hold_id: text("hold_id"),
        settled: number("settled_micros")
            .filter(|_| status == "settled")
            .map(Micros),
        entry_id: number("entry_id").filter(|id| *id != 0),
        shortfall: Micros(number("shortfall_micros").unwrap_or(0)),
        status,
    }
}
