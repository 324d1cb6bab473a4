//! The one place where credits-svc errors become gRPC statuses. Machine-readable
//! cases carry `google.rpc` details (ErrorInfo with a stable reason) that clients in
//! any language can decode.

use std::collections::HashMap;

use reeve_runtime::Micros;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::checkout::CheckoutError;
use crate::ledger::{IDEMPOTENCY_KEY_REUSED, InvalidWrite, NOTHING_TO_REVOKE};
use crate::store::StoreError;

/// The ErrorInfo domain of every credits-svc error.
pub const ERROR_DOMAIN: &str = "credits.reeve.v1";

#[derive(Debug, thiserror::Error)]
pub enum CreditsError {
    #[error("{}", .0.message)]
    Invalid(InvalidWrite),
    #[error(
        "insufficient credits: balance {balance_micros} micros, held {held_micros} micros, required {required_micros} micros"
    )]
    Insufficient {
        balance_micros: i64,
        held_micros: i64,
        required_micros: i64,
    },
    /// The hold's stored outcome refuses the call; carried in the details.
    #[error("hold {} is already {}", .0.hold_id, .0.status.as_str())]
    HoldResolved(Box<crate::holds::Hold>),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Checkout(#[from] CheckoutError),
}

impl CreditsError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> CreditsError {
        CreditsError::Invalid(InvalidWrite {
            code,
            message: message.into(),
        })
    }

    pub fn insufficient(balance: Micros, held: Micros, required: Micros) -> CreditsError {
        CreditsError::Insufficient {
            balance_micros: balance.0,
            held_micros: held.0,
            required_micros: required.0,
        }
    }
}

fn reason_of(code: &str) -> String {
    code.to_ascii_uppercase()
}

impl From<CreditsError> for Status {
    fn from(error: CreditsError) -> Status {
        let message = error.to_string();
        match error {
            CreditsError::NotFound(_) => Status::with_error_details(
                Code::NotFound,
                message,
                ErrorDetails::with_error_info("NOT_FOUND", ERROR_DOMAIN, HashMap::new()),
            ),
            CreditsError::Invalid(invalid) => {
                let code = match invalid.code {
                    IDEMPOTENCY_KEY_REUSED => Code::AlreadyExists,
                    NOTHING_TO_REVOKE => Code::FailedPrecondition,
                    _ => Code::InvalidArgument,
                };
                let details = ErrorDetails::with_error_info(
                    reason_of(invalid.code),
                    ERROR_DOMAIN,
                    HashMap::new(),
                );
                Status::with_error_details(code, message, details)
            }
            CreditsError::HoldResolved(hold) => {
                let metadata = HashMap::from([
                    ("hold_id".to_owned(), hold.hold_id.clone()),
                    ("status".to_owned(), hold.status.as_str().to_owned()),
                    (
                        "settled_micros".to_owned(),
                        hold.settled.map_or(0, |m| m.0).to_string(),
                    ),
                    (
                        "entry_id".to_owned(),
                        hold.entry_id.unwrap_or(0).to_string(),
                    ),
                    ("shortfall_micros".to_owned(), hold.shortfall.0.to_string()),
                ]);
                Status::with_error_details(
                    Code::FailedPrecondition,
                    message,
                    ErrorDetails::with_error_info("HOLD_ALREADY_RESOLVED", ERROR_DOMAIN, metadata),
                )
            }
            CreditsError::Insufficient {
                balance_micros,
                held_micros,
                required_micros,
            } => {
                let metadata = HashMap::from([
                    ("balance_micros".to_owned(), balance_micros.to_string()),
                    ("held_micros".to_owned(), held_micros.to_string()),
                    ("required_micros".to_owned(), required_micros.to_string()),
                ]);
                let mut details =
                    ErrorDetails::with_error_info("INSUFFICIENT_CREDITS", ERROR_DOMAIN, metadata);
                details.add_precondition_failure_violation(
                    "INSUFFICIENT_CREDITS",
                    "balance",
                    format!("balance {balance_micros} micros is below the required {required_micros} micros"),
                );
                Status::with_error_details(Code::FailedPrecondition, message, details)
            }
            CreditsError::Checkout(checkout) => {
                let (code, reason) = match &checkout {
                    CheckoutError::Disabled => (Code::FailedPrecondition, "PURCHASES_DISABLED"),
                    CheckoutError::OutOfRange { .. } => {
                        (Code::InvalidArgument, "AMOUNT_OUT_OF_RANGE")
                    }
                    CheckoutError::Unavailable(_) => (Code::Unavailable, "STRIPE_UNAVAILABLE"),
                    CheckoutError::Refused(_) => (Code::Internal, "STRIPE_REFUSED"),
                };
                let mut metadata = HashMap::new();
                if let CheckoutError::OutOfRange { min, max, .. } = checkout {
                    metadata.insert("min_credits".to_owned(), min.to_string());
                    metadata.insert("max_credits".to_owned(), max.to_string());
                }
                if code != Code::InvalidArgument {
                    tracing::error!(error = %message, "checkout failed");
                }
                Status::with_error_details(
                    code,
                    message,
                    ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
                )
            }
            CreditsError::Store(store) => {
                let code = match store {
                    StoreError::Unavailable(_) | StoreError::ShuttingDown | StoreError::Busy(_) => {
                        Code::Unavailable
                    }
                    StoreError::Contention => Code::Aborted,
                    _ => Code::Internal,
                };
                tracing::error!(error = %store, "store failure");
                Status::new(code, message)
            }
        }
    }
}
