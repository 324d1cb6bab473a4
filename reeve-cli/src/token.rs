//! `reeve token new NAME --scopes deduct,quota`: a new service token for
//! `REEVE_SERVICE_TOKENS_FILE`. The token goes to stderr, once, for the operator to hand
//! to the caller (its `REEVE_SERVICE_TOKEN`); stdout gets only the `[[token]]` entry,
//! with the token's SHA-256, so `reeve token new … >> tokens.toml` never writes the
//! token itself to the file.

use reeve_runtime::auth::{Scope, ServiceTokens, token_digest_hex};
use reeve_runtime::config::ConfigError;

use crate::dev::random_secret;

pub fn new(name: &str, scopes: &[String]) -> anyhow::Result<()> {
    let mut known = Vec::new();
    for scope in scopes.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let scope = Scope::parse(scope).ok_or_else(|| {
            ConfigError::new(
                "--scopes",
                format!("unknown scope {scope:?} (known: deduct, quota, admin, stripe)"),
            )
        })?;
        if !known.contains(&scope) {
            known.push(scope);
        }
    }
    let token = random_secret("svc_");
    let list = known
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let entry = format!(
        "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [{list}]\n",
        token_digest_hex(&token)
    );
    // The entry is checked by the very parser the services use.
    ServiceTokens::parse_file(&entry).map_err(|e| ConfigError::new("NAME", e))?;
    eprintln!("{token}");
    eprintln!(
        "(the token above is shown once: give it to the caller as REEVE_SERVICE_TOKEN; the entry below holds only its SHA-256)"
    );
    print!("{entry}");
    Ok(())
}
