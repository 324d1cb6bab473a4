//! Exact money: an integer count of micros (1 credit = 1 USD = 1,000,000 micros).
//!
//! Amounts never pass through a float. Decimal text is parsed digit by digit and
//! every arithmetic step is checked, so an overflow is an error, never a wrap.

use std::fmt;
use std::str::FromStr;

/// Micros in one credit (one US dollar).
pub const MICROS_PER_CREDIT: i64 = 1_000_000;
/// Micros in one US cent, the unit Stripe counts in.
pub const MICROS_PER_CENT: i64 = 10_000;
/// Number of decimal places a credit amount may carry.
pub const DECIMALS: usize = 6;

/// A signed amount of money in micros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Micros(pub i64);

/// Why a decimal amount was refused. Each variant has a stable machine-readable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount is empty")]
    Empty,
    #[error("amount is not a plain decimal number (digits, one optional '.', no sign or exponent)")]
    NotDecimal,
    #[error("amount has more than {DECIMALS} decimal places")]
    TooPrecise,
    #[error("amount is too large")]
    Overflow,
    #[error("amount must be greater than zero")]
    NotPositive,
}

impl AmountError {
    /// Stable code for API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            AmountError::Empty | AmountError::NotDecimal => "invalid_amount",
            AmountError::TooPrecise => "amount_too_precise",
            AmountError::Overflow => "amount_overflow",
            AmountError::NotPositive => "amount_not_positive",
        }
    }
}

impl Micros {
    pub const ZERO: Micros = Micros(0);

    pub fn from_credits(credits: i64) -> Option<Micros> {
        credits.checked_mul(MICROS_PER_CREDIT).map(Micros)
    }

    pub fn from_cents(cents: i64) -> Option<Micros> {
        cents.checked_mul(MICROS_PER_CENT).map(Micros)
    }

    pub fn checked_add(self, other: Micros) -> Option<Micros> {
        self.0.checked_add(other.0).map(Micros)
    }

    pub fn checked_sub(self, other: Micros) -> Option<Micros> {
        self.0.checked_sub(other.0).map(Micros)
    }

    pub fn checked_neg(self) -> Option<Micros> {
        self.0.checked_neg().map(Micros)
    }

    /// Parses a positive decimal credit amount such as `"25"`, `"0.000001"` or `"12.5"`.
    pub fn parse_positive_credits(text: &str) -> Result<Micros, AmountError> {
        let amount: Micros = text.parse()?;
        if amount.0 <= 0 {
            return Err(AmountError::NotPositive);
        }
        Ok(amount)
    }
}

impl FromStr for Micros {
    type Err = AmountError;

    /// Parses a decimal credit amount: an optional '-', digits, an optional '.' and up
    /// to six more digits. No exponent, no '+', no whitespace, no "NaN"/"inf".
    fn from_str(text: &str) -> Result<Micros, AmountError> {
        if text.is_empty() {
            return Err(AmountError::Empty);
        }
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = match unsigned.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (unsigned, None),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) {
            return Err(AmountError::NotDecimal);
        }
        let fraction = fraction.unwrap_or("");
        if unsigned.contains('.') && fraction.is_empty() || !all_digits(fraction) {
            return Err(AmountError::NotDecimal);
        }
        if fraction.len() > DECIMALS {
            return Err(AmountError::TooPrecise);
        }
        let mut micros: i64 = 0;
        for digit in whole.bytes().chain(fraction.bytes()) {
            micros = micros
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(digit - b'0')))
                .ok_or(AmountError::Overflow)?;
        }
        for _ in fraction.len()..DECIMALS {
            micros = micros.checked_mul(10).ok_or(AmountError::Overflow)?;
        }
        Ok(Micros(if negative { -micros } else { micros }))
    }
}

impl fmt::Display for Micros {
    /// Formats as a decimal credit amount with exactly six decimals, e.g. `"12.500000"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let magnitude = self.0.unsigned_abs();
        let per_credit = MICROS_PER_CREDIT.unsigned_abs();
        write!(
            f,
            "{sign}{}.{:06}",
            magnitude / per_credit,
            magnitude % per_credit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!("25".parse(), Ok(Micros(25_000_000)));
        assert_eq!("0.000001".parse(), Ok(Micros(1)));
        assert_eq!("12.5".parse(), Ok(Micros(12_500_000)));
        assert_eq!("-3.25".parse(), Ok(Micros(-3_250_000)));
        assert_eq!("0.1".parse::<Micros>().map(|m| m.0), Ok(100_000));
    }

    #[test]
    fn refuses_tricks() {
        for text in [
            "", "1e3", "1E3", "+1", " 1", "1 ", "NaN", "inf", ".5", "5.", "1.2.3", "0x10", "1_000",
            "--1", "-",
        ] {
            assert!(text.parse::<Micros>().is_err(), "{text:?} must be refused");
        }
        assert_eq!("0.0000001".parse::<Micros>(), Err(AmountError::TooPrecise));
        assert_eq!(
            "9223372036855".parse::<Micros>(),
            Err(AmountError::Overflow)
        );
        assert_eq!(
            Micros::parse_positive_credits("0"),
            Err(AmountError::NotPositive)
        );
        assert_eq!(
            Micros::parse_positive_credits("-1"),
            Err(AmountError::NotPositive)
        );
    }

    #[test]
    fn formats_with_six_decimals() {
        assert_eq!(Micros(12_500_000).to_string(), "12.500000");
        assert_eq!(Micros(-1).to_string(), "-0.000001");
        assert_eq!(Micros(i64::MIN).to_string(), "-9223372036854.775808");
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(micros in (i64::MIN + 1)..=i64::MAX) {
            prop_assert_eq!(Micros(micros).to_string().parse::<Micros>(), Ok(Micros(micros)));
        }

        #[test]
        fn parse_matches_integer_arithmetic(whole in 0i64..1_000_000_000, fraction in 0i64..1_000_000) {
            let text = format!("{whole}.{fraction:06}");
            prop_assert_eq!(text.parse::<Micros>(), Ok(Micros(whole * MICROS_PER_CREDIT + fraction)));
        }
    }
}
