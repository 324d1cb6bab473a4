//! Dev defaults: the secrets `reeve up` generates on first run and keeps in
//! `<data dir>/dev-secrets.toml` (mode 0600), so later runs and the admin commands use
//! the same ones, and the dev user token they mint.
//!
//! These are the lowest configuration layer: anything set in the environment or the
//! config file wins. Secret values are never printed, only their names.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use reeve_runtime::config::{self, ConfigError, Source};
use secrecy::{ExposeSecret, SecretString};

/// The key `reeve up` hands to its fake Stripe; never a real key.
pub const FAKE_STRIPE_KEY: &str = "sk_test_reeve_fake_stripe";
const SECRETS_FILE: &str = "dev-secrets.toml";
/// The variables whose dev values live in the secrets file.
const GENERATED: [&str; 3] = [
    "REEVE_SERVICE_TOKEN",
    "REEVE_JWT_HS256_SECRET",
    "STRIPE_WEBHOOK_SECRET",
];

pub(crate) fn random_secret(prefix: &str) -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    let tail: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}

/// Whether `name` is set by the environment or the config file (not by defaults).
fn set_outside_defaults(name: &str, file: &HashMap<String, String>) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty()) || file.contains_key(name)
}

/// Reads (or, for `reeve up`, creates) the dev secrets and installs every default
/// layer. Returns the names of the variables whose value is a dev default.
pub fn install_layers(data_dir: &Path, for_up: bool) -> Result<Vec<&'static str>, ConfigError> {
    let file = match std::env::var("REEVE_CONFIG_FILE") {
        Ok(path) if !path.trim().is_empty() => config::read_file(&path)?,
        _ => HashMap::new(),
    };
    let secrets_path = data_dir.join(SECRETS_FILE);
    let mut secrets: HashMap<String, String> = if secrets_path.exists() {
        config::read_file(&secrets_path.to_string_lossy())?
    } else {
        HashMap::new()
    };
    let missing: Vec<&str> = GENERATED
        .iter()
        .copied()
        .filter(|name| !secrets.contains_key(*name))
        .collect();
    if for_up && !missing.is_empty() {
        for name in missing {
            let value = match name {
                "STRIPE_WEBHOOK_SECRET" => random_secret("whsec_dev_"),
                "REEVE_SERVICE_TOKEN" => random_secret("svc_dev_"),
                _ => random_secret(""),
            };
            secrets.insert(name.to_owned(), value);
        }
        write_secrets(data_dir, &secrets_path, &secrets)?;
    }

    let mut defaults: HashMap<String, String> = HashMap::new();
    defaults.insert(
        "REEVE_DATABASE_URL".to_owned(),
        format!("sqlite://{}/reeve.db", data_dir.display()),
    );
    let configured = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .or_else(|| file.get(name).cloned())
    };
    if let Some(generated) = secrets.get("REEVE_SERVICE_TOKEN") {
        // Clients send REEVE_SERVICE_TOKEN; the services accept REEVE_SERVICE_TOKENS. Each
        // defaults to what the other was given, so setting either one is enough.
        let sent = configured("REEVE_SERVICE_TOKEN").or_else(|| {
            configured("REEVE_SERVICE_TOKENS").and_then(|list| {
                list.split(',')
                    .map(str::trim)
                    .find(|t| !t.is_empty())
                    .map(str::to_owned)
            })
        });
        let sent = sent.unwrap_or_else(|| generated.clone());
        defaults.insert("REEVE_SERVICE_TOKENS".to_owned(), sent.clone());
        defaults.insert("REEVE_SERVICE_TOKEN".to_owned(), sent);
    }
    if !set_outside_defaults("REEVE_JWT_RS256_PUBLIC_KEY_FILE", &file)
        && let Some(secret) = secrets.get("REEVE_JWT_HS256_SECRET")
    {
        defaults.insert("REEVE_JWT_HS256_SECRET".to_owned(), secret.clone());
    }
    if let Some(secret) = secrets.get("STRIPE_WEBHOOK_SECRET") {
        defaults.insert("STRIPE_WEBHOOK_SECRET".to_owned(), secret.clone());
    }
    if for_up {
        defaults.insert("STRIPE_SECRET_KEY".to_owned(), FAKE_STRIPE_KEY.to_owned());
    }
    let names: Vec<String> = defaults.keys().cloned().collect();
    config::install(defaults)?;
    Ok(config::KNOWN_VARIABLES
        .iter()
        .copied()
        .filter(|name| names.iter().any(|n| n == name) && config::source(name) == Source::Default)
        .collect())
}

fn write_secrets(
    data_dir: &Path,
    path: &Path,
    secrets: &HashMap<String, String>,
) -> Result<(), ConfigError> {
    let fail = |e: std::io::Error| {
        ConfigError::new(
            "REEVE_DATA_DIR",
            format!("cannot write {}: {e}", path.display()),
        )
    };
    std::fs::create_dir_all(data_dir).map_err(fail)?;
    let mut text = String::from(
        "# Dev secrets generated by `reeve up`. Local use only; never for production.\n",
    );
    let mut names: Vec<&String> = secrets.keys().collect();
    names.sort();
    for name in names {
        let value = toml::Value::String(secrets[name].clone());
        text.push_str(&format!("{name} = {value}\n"));
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(fail)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(fail)
}

/// Prints a user JWT (HS256, `sub` = the user, expiring in `ttl_secs`), or with `link`
/// a link that opens the billing page signed in as that user.
pub fn print_token(user_id: &str, ttl_secs: i64, link: bool) -> anyhow::Result<()> {
    let token = mint_token(user_id, ttl_secs)?;
    if link {
        let default_http: SocketAddr = webhook_bridge::DEFAULT_HTTP_ADDR.parse()?;
        let http_addr = config::parse_or("REEVE_HTTP_ADDR", default_http)?;
        println!("{}", billing_link(http_addr, &token));
    } else {
        println!("{token}");
    }
    Ok(())
}

/// A user JWT signed with the dev HS256 secret (`REEVE_JWT_HS256_SECRET`).
pub fn mint_token(user_id: &str, ttl_secs: i64) -> anyhow::Result<String> {
    let secret = config::var("REEVE_JWT_HS256_SECRET")?
        .map(SecretString::from)
        .ok_or_else(|| {
            ConfigError::new(
                "REEVE_JWT_HS256_SECRET",
                "is required to mint a dev token (run `reeve up` once, or set it)",
            )
        })?;
    if !(1..=30 * 86_400).contains(&ttl_secs) {
        anyhow::bail!("--ttl-secs must be 1 to 2592000");
    }
    let now = reeve_runtime::clock::now_us() / 1_000_000;
    let claims = serde_json::json!({"sub": user_id, "iat": now, "exp": now + ttl_secs});
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )?)
}

/// The bridge's billing page (an unspecified listen address is reached on loopback).
pub fn billing_url(http_addr: SocketAddr) -> String {
    let mut addr = http_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}/billing")
}

/// The billing page signed in with `token`: the token rides in the fragment, which the
/// browser keeps to itself (never sent to a server, never in a request log).
pub fn billing_link(http_addr: SocketAddr, token: &str) -> String {
    format!("{}#token={token}", billing_url(http_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_carries_the_token_in_the_fragment_only() {
        let link = billing_link(SocketAddr::from(([0, 0, 0, 0], 8080)), "a.b.c");
        assert_eq!(link, "http://127.0.0.1:8080/billing#token=a.b.c");
        assert_eq!(
            billing_url(SocketAddr::from(([0u16; 8], 9))),
            "http://[::1]:9/billing"
        );
    }
}
