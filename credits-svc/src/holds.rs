//! Holds: credits reserved before an LLM call and settled with the real cost after.
//! Types and their rules of shape only; what a hold does to a wallet is decided by the
//! ledger plan ([`crate::ledger::plan_ops`]) next to deductions, in the same
//! transaction, so a hold and a deduction can never both spend the same micro.
//!
//! A hold reserves its amount from specific lots in spending order. It reserves until
//! its `expires_at_us`, exactly: from that instant every read and write treats it as
//! expired, whether or not it was marked so. Its states are stored: HELD → SETTLED |
//! RELEASED | EXPIRED. This module never reads a clock.

use reeve_runtime::Micros;

use crate::ledger::InvalidWrite;

pub const DEFAULT_TTL_SECS: i64 = 600;
pub const MAX_TTL_SECS: i64 = 86_400;

/// The code of a settle, release or extension that the hold's stored outcome refuses.
pub const HOLD_ALREADY_RESOLVED: &str = "hold_already_resolved";
pub const HOLD_NOT_FOUND: &str = "hold_not_found";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldStatus {
    Held,
    Settled,
    Released,
    Expired,
}

impl HoldStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Held => "held",
            HoldStatus::Settled => "settled",
            HoldStatus::Released => "released",
            HoldStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<HoldStatus> {
        Some(match text {
            "held" => HoldStatus::Held,
            "settled" => HoldStatus::Settled,
            "released" => HoldStatus::Released,
            "expired" => HoldStatus::Expired,
            _ => return None,
        })
    }
}

/// One hold as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub hold_id: String,
    pub user_id: String,
    pub amount: Micros,
    pub status: HoldStatus,
    /// The cost recorded by the settle (0 for a settle of 0, which is a release).
    pub settled: Option<Micros>,
    /// The settle's deduction entry.
    pub entry_id: Option<i64>,
    /// What the settle could not draw from any lot: left as a debt.
    pub shortfall: Micros,
    /// Settled after its expiry.
    pub late: bool,
    pub description: String,
    pub created_at_us: i64,
    pub expires_at_us: i64,
    pub resolved_at_us: Option<i64>,
    /// (lot id, micros) reserved while HELD.
    pub reservations: Vec<(i64, Micros)>,
}

impl Hold {
    /// Reserving at `now_us`: held and not past its instant.
    pub fn is_active(&self, now_us: i64) -> bool {
        self.status == HoldStatus::Held && now_us < self.expires_at_us
    }

    /// The idempotency comparison of a repeated `Hold` call.
    pub fn same_request(&self, request: &HoldRequest) -> bool {
        self.user_id == request.user_id && self.amount == request.amount
    }
}

/// `Hold`: reserve `amount` for `ttl_secs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    pub hold_id: String,
    pub user_id: String,
    pub amount: Micros,
    pub ttl_secs: i64,
    pub description: String,
}

/// One operation on holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOp {
    Hold(HoldRequest),
    /// Record the real cost (0: release).
    Settle {
        hold_id: String,
        amount: Micros,
        description: String,
    },
    Release {
        hold_id: String,
    },
    Extend {
        hold_id: String,
        ttl_secs: i64,
    },
}

impl HoldOp {
    pub fn hold_id(&self) -> &str {
        match self {
            HoldOp::Hold(request) => &request.hold_id,
            HoldOp::Settle { hold_id, .. }
            | HoldOp::Release { hold_id }
            | HoldOp::Extend { hold_id, .. } => hold_id,
        }
    }

    /// The shape of the operation; balances and states are judged by the plan.
    pub fn validate(&self) -> Result<(), InvalidWrite> {
        reeve_runtime::ids::check_key(self.hold_id(), "hold_id")?;
        let ttl_ok = |ttl: i64| (1..=MAX_TTL_SECS).contains(&ttl);
        match self {
            HoldOp::Hold(request) => {
                reeve_runtime::ids::check_user_id(&request.user_id)?;
                reeve_runtime::ids::check_description(&request.description)?;
                if request.amount.0 <= 0 {
                    return Err(InvalidWrite::new(
                        "invalid_amount",
                        "amount_micros must be greater than zero",
                    ));
                }
                crate::ledger::check_amount_cap(request.amount)?;
                if !ttl_ok(request.ttl_secs) {
                    return Err(invalid_ttl());
                }
            }
            HoldOp::Settle {
                amount,
                description,
                ..
            } => {
                reeve_runtime::ids::check_description(description)?;
                if amount.0 < 0 {
                    return Err(InvalidWrite::new(
                        "invalid_amount",
                        "amount_micros must not be negative",
                    ));
                }
                crate::ledger::check_amount_cap(*amount)?;
            }
            HoldOp::Release { .. } => {}
            HoldOp::Extend { ttl_secs, .. } => {
                if !ttl_ok(*ttl_secs) {
                    return Err(invalid_ttl());
                }
            }
        }
        Ok(())
    }
}

fn invalid_ttl() -> InvalidWrite {
    InvalidWrite::new(
        "invalid_ttl",
        format!("ttl_seconds must be 1 to {MAX_TTL_SECS}"),
    )
}

/// The ledger key of a hold's settle (the service's own key source).
pub fn settle_key(hold_id: &str) -> String {
    format!("settle:{hold_id}")
}

/// What happened to one hold operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// `Hold` reserved (or had reserved, `duplicate`); also a release's and an
    /// extension's answer.
    Hold {
        hold: Hold,
        duplicate: bool,
    },
    /// `SettleHold` recorded `entry` (or had, `duplicate`).
    Settled {
        hold: Hold,
        entry: crate::ledger::LedgerEntry,
        duplicate: bool,
    },
    Insufficient {
        balance: Micros,
        held: Micros,
        required: Micros,
    },
    /// The stored outcome refuses this operation (FAILED_PRECONDITION with it).
    AlreadyResolved(Hold),
    NotFound,
    Invalid(InvalidWrite),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_validated() {
        let hold = |ttl_secs: i64, micros: i64| {
            HoldOp::Hold(HoldRequest {
                hold_id: "h".into(),
                user_id: "u".into(),
                amount: Micros(micros),
                ttl_secs,
                description: String::new(),
            })
        };
        assert!(hold(600, 1).validate().is_ok());
        assert_eq!(hold(0, 1).validate().unwrap_err().code, "invalid_ttl");
        assert_eq!(hold(86_401, 1).validate().unwrap_err().code, "invalid_ttl");
        let cap = crate::ledger::MAX_WRITE_MICROS;
        let settle = |hold_id: &str, micros: i64| HoldOp::Settle {
            hold_id: hold_id.into(),
            amount: Micros(micros),
            description: String::new(),
        };
        // Amounts: the same codes as a write's (a size past the cap is an overflow); a
        // settle may be 0, a hold may not.
        for (micros, hold_code, settle_code) in [
            (0, Some("invalid_amount"), None),
            (-1, Some("invalid_amount"), Some("invalid_amount")),
            (i64::MIN, Some("invalid_amount"), Some("invalid_amount")),
            (cap, None, None),
            (cap + 1, Some("amount_overflow"), Some("amount_overflow")),
            (i64::MAX, Some("amount_overflow"), Some("amount_overflow")),
        ] {
            let got = hold(600, micros).validate().err().map(|e| e.code);
            assert_eq!(got, hold_code, "hold of {micros}");
            let got = settle("h", micros).validate().err().map(|e| e.code);
            assert_eq!(got, settle_code, "settle of {micros}");
        }
        assert_eq!(
            settle("h\0", 0).validate().unwrap_err().code,
            "invalid_idempotency_key"
        );
    }
}
