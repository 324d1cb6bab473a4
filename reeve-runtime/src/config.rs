//! Reading configuration from the environment with errors that name the variable.
//! Values are never echoed back in errors: some of them are secrets.

use std::str::FromStr;

/// A configuration value that cannot be used, naming the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

impl ConfigError {
    pub fn new(variable: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError { variable, message: message.into() }
    }
}

/// The variable's value; unset and empty both read as `None`.
pub fn var(name: &'static str) -> Result<Option<String>, ConfigError> {
    match std::env::var(name) {
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::new(name, "is not valid UTF-8")),
    }
}

/// The variable parsed as `T`, or `default` when unset.
pub fn parse_or<T>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match var(name)? {
        None => Ok(default),
        Some(text) => text
            .trim()
            .parse()
            .map_err(|error| ConfigError::new(name, format!("cannot be parsed: {error}"))),
    }
}

/// `REEVE_CURRENCY`: the one currency credits are sold and credited in, as a
/// lower-case ISO code (default `usd`).
pub fn currency() -> Result<String, ConfigError> {
    let currency = var("REEVE_CURRENCY")?.unwrap_or_else(|| "usd".to_owned()).to_ascii_lowercase();
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(ConfigError::new("REEVE_CURRENCY", "must be a three-letter ISO currency code such as usd"));
    }
    Ok(currency)
}
