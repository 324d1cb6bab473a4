//! Credit amounts on REST: a JSON number or a decimal string, read from its exact text
//! (never through `f64`) into micros. Exponents, signs, more than six decimals, zero,
//! NaN and overflow are refused with a stable code.

use reeve_runtime::Micros;
use reeve_runtime::money::MICROS_PER_CREDIT;
use serde_json::value::RawValue;

use crate::error::ApiError;

/// A positive credit amount from its raw JSON text (`25`, `12.5`, `"0.000001"`).
pub fn parse_positive(raw: &RawValue) -> Result<Micros, ApiError> {
    let text = raw.get().trim();
    let decimal = if text.starts_with('"') {
        serde_json::from_str::<String>(text).map_err(|_| invalid())?
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        text.to_owned()
    } else {
        return Err(invalid());
    };
    Micros::parse_positive_credits(&decimal)
        .map_err(|error| ApiError::bad_request(error.code(), error.to_string()))
}

/// A positive whole number of credits (purchases).
pub fn parse_whole_credits(raw: &RawValue) -> Result<i64, ApiError> {
    let amount = parse_positive(raw)?;
    if amount.0 % MICROS_PER_CREDIT != 0 {
        return Err(ApiError::bad_request(
            "amount_not_whole",
            "purchases are in whole credits (1 credit = 1 USD)",
        ));
    }
    Ok(amount.0 / MICROS_PER_CREDIT)
}

fn invalid() -> ApiError {
    ApiError::bad_request(
        "invalid_amount",
        "amount must be a JSON number or a decimal string such as \"12.5\"",
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn exact_numbers_and_strings() {
        assert_eq!(parse_positive(&raw("25")).unwrap(), Micros(25_000_000));
        assert_eq!(parse_positive(&raw("0.1")).unwrap(), Micros(100_000));
        assert_eq!(parse_positive(&raw("\"0.000001\"")).unwrap(), Micros(1));
        assert_eq!(
            parse_positive(&raw("12.345678")).unwrap(),
            Micros(12_345_678)
        );
        assert_eq!(parse_whole_credits(&raw("25")).unwrap(), 25);
        assert_eq!(parse_whole_credits(&raw("\"25.000\"")).unwrap(), 25);
    }

    #[test]
    fn refused_with_codes() {
        let code = |text: &str| parse_positive(&raw(text)).unwrap_err().code().to_owned();
        assert_eq!(code("0"), "amount_not_positive");
        assert_eq!(code("-1"), "amount_not_positive");
        assert_eq!(code("0.0000001"), "amount_too_precise");
        assert_eq!(code("1e3"), "invalid_amount");
        assert_eq!(code("1E-2"), "invalid_amount");
        assert_eq!(code("\"NaN\""), "invalid_amount");
        assert_eq!(code("\"Infinity\""), "invalid_amount");
        assert_eq!(code("null"), "invalid_amount");
        assert_eq!(code("true"), "invalid_amount");
        assert_eq!(code("[1]"), "invalid_amount");
        assert_eq!(code("99999999999999999999"), "amount_overflow");
        assert_eq!(
            parse_whole_credits(&raw("2.5")).unwrap_err().code(),
            "amount_not_whole"
        );
    }
}
