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
    /// 402: a deduction larger than the balance.
    #[error("insufficient credits: balance {balance}, required {required}")]
    InsufficientCredits { balance: Micros, required: Micros },
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

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::InsufficientCredits { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
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
            | ApiError::Internal { code, .. } => code,
            ApiError::InsufficientCredits { .. } => "insufficient_credits",
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".to_owned(), Value::from(self.code()));
        error.insert("message".to_owned(), Value::from(self.to_string()));
        if let ApiError::InsufficientCredits { balance, required } = self {
            error.insert("balance".to_owned(), Value::from(balance.to_string()));
            error.insert("required".to_owned(), Value::from(required.to_string()));
            error.insert("balance_micros".to_owned(), Value::from(balance.0));
            error.insert("required_micros".to_owned(), Value::from(required.0));
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
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
                        (Some(balance), Some(required)) => {
                            ApiError::InsufficientCredits { balance, required }
                        }
                        _ => ApiError::Internal {
                            code: "backend_error",
                            message: "malformed insufficient-credits reply".to_owned(),
                        },
                    }
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
