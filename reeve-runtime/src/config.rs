//! Reading configuration with errors that name the variable. Values are never echoed
//! back in errors: some of them are secrets.
//!
//! A variable is looked up in three layers, the first that has it wins: the process
//! environment, then an optional TOML file (`REEVE_CONFIG_FILE`, keys are the variable
//! names), then defaults a launcher installed (`reeve up`'s generated dev values). The
//! layers are installed once, at start-up, before any configuration is read.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::OnceLock;

/// Every variable a Reeve process reads; a file naming anything else is refused.
pub const KNOWN_VARIABLES: &[&str] = &[
    "REEVE_DATABASE_URL",
    "REEVE_HTTP_ADDR",
    "REEVE_CREDITS_ADDR",
    "REEVE_QUOTA_ADDR",
    "REEVE_SERVICE_TOKENS",
    "REEVE_SERVICE_TOKENS_FILE",
    "REEVE_SERVICE_TOKEN",
    "REEVE_JWT_HS256_SECRET",
    "REEVE_JWT_RS256_PUBLIC_KEY_FILE",
    "REEVE_JWT_AUDIENCE",
    "REEVE_JWT_ISSUER",
    "REEVE_QUOTA_CONFIG",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_API_BASE",
    "REEVE_PURCHASE_MIN",
    "REEVE_PURCHASE_MAX",
    "REEVE_CHECKOUT_SUCCESS_URL",
    "REEVE_CHECKOUT_CANCEL_URL",
    "REEVE_CURRENCY",
    "REEVE_DEDUCT_WORKERS",
    "REEVE_QUOTA_BATCH_WORKERS",
    "REEVE_LOG_FORMAT",
    "REEVE_FAKE_STRIPE_ADDR",
    "REEVE_FAKE_STRIPE_WEBHOOKS",
    "REEVE_RECONCILE_INTERVAL",
    "REEVE_LOT_SWEEP_SECS",
    "REEVE_LOT_EXPIRING_DAYS",
    "REEVE_TOPUP_POLL_MS",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "RUST_LOG",
];

#[derive(Debug, Default)]
struct Layers {
    file: HashMap<String, String>,
    defaults: HashMap<String, String>,
}

static LAYERS: OnceLock<Layers> = OnceLock::new();

/// Installs the file layer (the TOML file named by `REEVE_CONFIG_FILE`, if set) and
/// a launcher's defaults. Call once, before reading any configuration.
pub fn install(defaults: HashMap<String, String>) -> Result<(), ConfigError> {
    let file = match std::env::var("REEVE_CONFIG_FILE") {
        Ok(path) if !path.trim().is_empty() => read_file(&path)?,
        _ => HashMap::new(),
    };
    LAYERS.set(Layers { file, defaults }).map_err(|_| {
        ConfigError::new(
            "REEVE_CONFIG_FILE",
            "configuration layers were installed twice",
        )
    })
}

/// Reads a TOML file of `VARIABLE = value` lines (strings, integers or booleans).
pub fn read_file(path: &str) -> Result<HashMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("REEVE_CONFIG_FILE", format!("cannot read {path}: {e}")))?;
    let table = parse_toml(&text)
        .map_err(|e| ConfigError::new("REEVE_CONFIG_FILE", format!("{path}: {e}")))?;
    let mut values = HashMap::new();
    for (key, value) in table {
        if !KNOWN_VARIABLES.contains(&key.as_str()) {
            return Err(ConfigError::new(
                "REEVE_CONFIG_FILE",
                format!("{path}: unknown variable {key}"),
            ));
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(ConfigError::new(
                    "REEVE_CONFIG_FILE",
                    format!("{path}: {key} must be a string, integer or boolean"),
                ));
            }
        };
        values.insert(key, value);
    }
    Ok(values)
}

/// Parses a TOML document whose values may be secrets: an error names the line but
/// never quotes it.
pub fn parse_toml(text: &str) -> Result<toml::Table, String> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        format!("not valid TOML{at}: {}", e.message())
    })
}

/// Where a variable's value came from, for start-up summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Environment,
    File,
    Default,
    Unset,
}

pub fn source(name: &str) -> Source {
    if std::env::var(name).is_ok_and(|v| !v.trim().is_empty()) {
        return Source::Environment;
    }
    match LAYERS.get() {
        Some(layers) if layers.file.contains_key(name) => Source::File,
        Some(layers) if layers.defaults.contains_key(name) => Source::Default,
        _ => Source::Unset,
    }
}

/// A configuration value that cannot be used, naming the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

impl ConfigError {
    pub fn new(variable: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            variable,
            message: message.into(),
        }
    }
}

/// The variable's value (environment, then file, then installed defaults); unset and
/// empty both read as `None`.
pub fn var(name: &'static str) -> Result<Option<String>, ConfigError> {
    match std::env::var(name) {
        Ok(value) if value.trim().is_empty() => {}
        Ok(value) => return Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => {}
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(ConfigError::new(name, "is not valid UTF-8"));
        }
    }
    let layered = LAYERS
        .get()
        .and_then(|layers| layers.file.get(name).or_else(|| layers.defaults.get(name)));
    Ok(layered.filter(|v| !v.trim().is_empty()).cloned())
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

/// Stripe's currencies whose smallest unit is not a hundredth.
const NOT_TWO_DECIMAL_CURRENCIES: &[&str] = &[
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
    "xaf", "xof", "xpf", "bhd", "jod", "kwd", "omr", "tnd",
];

/// `REEVE_CURRENCY`: the one currency credits are sold and credited in, as a
/// lower-case ISO code (default `usd`).
pub fn currency() -> Result<String, ConfigError> {
    let currency = var("REEVE_CURRENCY")?
        .unwrap_or_else(|| "usd".to_owned())
        .to_ascii_lowercase();
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(ConfigError::new(
            "REEVE_CURRENCY",
            "must be a three-letter ISO currency code such as usd",
        ));
    }
    // Amounts are converted as hundredths (cents); Stripe's zero- and three-decimal
    // currencies would be off by a factor of 100 or 10.
    if NOT_TWO_DECIMAL_CURRENCIES.contains(&currency.as_str()) {
        return Err(ConfigError::new(
            "REEVE_CURRENCY",
            "must be a currency with two decimals (Stripe counts it in hundredths)",
        ));
    }
    Ok(currency)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_bad_config_file_is_named_by_line_without_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reeve.toml");
        std::fs::write(
            &path,
            "REEVE_HTTP_ADDR = \"127.0.0.1:8080\"\nSTRIPE_SECRET_KEY = sk_live_do_not_print\n",
        )
        .unwrap();
        let error = read_file(&path.to_string_lossy()).unwrap_err();
        assert_eq!(error.variable, "REEVE_CONFIG_FILE");
        assert!(error.message.contains("line 2"), "{error}");
        assert!(
            !error.to_string().contains("sk_live_do_not_print"),
            "{error}"
        );
        std::fs::write(&path, "REEVE_UNKNOWN = 1\n").unwrap();
        assert!(
            read_file(&path.to_string_lossy())
                .unwrap_err()
                .message
                .contains("unknown variable REEVE_UNKNOWN")
        );
        std::fs::write(
            &path,
            "REEVE_PURCHASE_MIN = 5\nREEVE_LOG_FORMAT = \"json\"\n",
        )
        .unwrap();
        let values = read_file(&path.to_string_lossy()).unwrap();
        assert_eq!(values["REEVE_PURCHASE_MIN"], "5");
    }

    #[test]
    fn only_two_decimal_currencies() {
        assert!(NOT_TWO_DECIMAL_CURRENCIES.contains(&"jpy"));
        assert!(!NOT_TWO_DECIMAL_CURRENCIES.contains(&"usd"));
        assert!(!NOT_TWO_DECIMAL_CURRENCIES.contains(&"eur"));
    }
}
