//! Who is calling: a user (a JWT bearer token, user id from `sub`) or a service (a
//! bearer service token, compared in constant time).
//!
//! The JWT algorithm is pinned by configuration (HS256 with a secret, or RS256 with a
//! public key), so `alg: none` and algorithm swaps fail; `exp` and `sub` are required,
//! expiry has no leeway (a token is refused from the second its `exp` names), and
//! `sub` must be a user id the ledger can credit (`reeve_runtime::ids::check_user_id`).
//! A service route needs a service token holding the scope [`ROUTE_SCOPES`] names for
//! it. Tokens are never logged; a refusal says why in a stable code without echoing
//! the token.

use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reeve_runtime::auth::{Caller, Scope, bearer_token};
use reeve_runtime::config::ConfigError;
use secrecy::{ExposeSecret, SecretString};

use crate::AppState;
use crate::error::ApiError;

/// The scope each service route needs: the only place the REST side's service
/// authorisation is decided (checked by the [`Service`] extractor). A service route
/// missing here refuses every token.
pub const ROUTE_SCOPES: &[(&str, Scope)] = &[
    ("/api/credits/deduct", Scope::Deduct),
    ("/api/credits/deduct/batch", Scope::Deduct),
    ("/api/credits/grants", Scope::Admin),
    ("/api/credits/holds", Scope::Deduct),
    ("/api/credits/holds/{hold_id}", Scope::Deduct),
    ("/api/credits/holds/{hold_id}/settle", Scope::Deduct),
    ("/api/credits/holds/{hold_id}/release", Scope::Deduct),
    ("/api/notifications/threshold", Scope::Admin),
];

/// The key user tokens are verified with.
#[derive(Clone)]
pub enum JwtKey {
    /// `REEVE_JWT_HS256_SECRET`
    Hs256(SecretString),
    /// The PEM text of `REEVE_JWT_RS256_PUBLIC_KEY_FILE`.
    Rs256Pem(Vec<u8>),
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JwtKey::Hs256(_) => "JwtKey::Hs256(<redacted>)",
            JwtKey::Rs256Pem(_) => "JwtKey::Rs256Pem(..)",
        })
    }
}

/// Verifies user tokens.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

impl JwtVerifier {
    /// `audience` / `issuer` (`REEVE_JWT_AUDIENCE`, `REEVE_JWT_ISSUER`), when set, must
    /// match the token's `aud` / `iss`; when unset those claims are not checked.
    pub fn new(
        key: &JwtKey,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<JwtVerifier, ConfigError> {
        let (key, algorithm) = match key {
            JwtKey::Hs256(secret) => {
                let secret = secret.expose_secret().as_bytes();
                if secret.len() < 16 {
                    return Err(ConfigError::new(
                        "REEVE_JWT_HS256_SECRET",
                        "must be at least 16 bytes",
                    ));
                }
                (DecodingKey::from_secret(secret), Algorithm::HS256)
            }
            JwtKey::Rs256Pem(pem) => (
                DecodingKey::from_rsa_pem(pem).map_err(|e| {
                    ConfigError::new(
                        "REEVE_JWT_RS256_PUBLIC_KEY_FILE",
                        format!("is not an RSA public key in PEM form: {e}"),
                    )
                })?,
                Algorithm::RS256,
            ),
        };
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["exp", "sub"];
        match audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 0;
        // jsonwebtoken refuses only when `exp < now` (whole seconds), so a token would
        // still pass during the second its `exp` names. Refusing tokens that expire
        // in less than one second makes that `exp <= now`: expired at `exp` exactly.
        validation.reject_tokens_expiring_in_less_than = 1;
        Ok(JwtVerifier { key, validation })
    }

    /// The user id of a valid token.
    pub fn verify(&self, token: &str) -> Result<String, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |error| {
                use jsonwebtoken::errors::ErrorKind;
                let (code, message) = match error.kind() {
                    ErrorKind::ExpiredSignature => ("token_expired", "the token has expired"),
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => (
                        "invalid_token",
                        "the token's algorithm is not the one this server accepts",
                    ),
                    ErrorKind::MissingRequiredClaim(_) => (
                        "invalid_token",
                        "the token lacks a required claim (exp, sub, and aud/iss when configured)",
                    ),
                    ErrorKind::InvalidAudience => {
                        ("invalid_token", "the token is meant for another audience")
                    }
                    ErrorKind::InvalidIssuer => {
                        ("invalid_token", "the token comes from another issuer")
                    }
                    ErrorKind::ImmatureSignature => {
                        ("invalid_token", "the token is not valid yet (nbf)")
                    }
                    ErrorKind::InvalidSignature => {
                        ("invalid_token", "the token's signature does not verify")
                    }
                    _ => (
                        "invalid_token",
                        "the token is not a valid JWT for this server",
                    ),
                };
                ApiError::unauthorized(code, message)
            },
        )?;
        let sub = data.claims.sub;
        // The ledger's one rule for user ids: a sub it could not credit never starts a
        // purchase or reads a balance.
        reeve_runtime::ids::check_user_id(&sub).map_err(|invalid| {
            ApiError::unauthorized(
                "invalid_token",
                format!(
                    "the token's sub is not a valid user id: {}",
                    invalid.message
                ),
            )
        })?;
        Ok(sub)
    }
}

fn authorization(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("missing_token", "Authorization: Bearer <token> is required")
    })?;
    header.to_str().ok().and_then(bearer_token).ok_or_else(|| {
        ApiError::unauthorized("missing_token", "Authorization must be Bearer <token>")
    })
}

/// The signed-in user of a user route.
#[derive(Debug, Clone)]
pub struct User(pub String);

impl FromRequestParts<Arc<AppState>> for User {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<User, ApiError> {
        let token = authorization(parts)?;
        let user_id = state.jwt.verify(token)?;
        tracing::Span::current().record("user_id", user_id.as_str());
        Ok(User(user_id))
    }
}

/// A caller holding a service token with the scope this route needs
/// ([`ROUTE_SCOPES`]): an unknown token is 401 `invalid_service_token`, a known one
/// without the scope 403 `insufficient_scope`.
#[derive(Debug, Clone)]
pub struct Service(pub Caller);

impl FromRequestParts<Arc<AppState>> for Service {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Service, ApiError> {
        let token = authorization(parts)?;
        let caller = state.service_tokens.authenticate(token).ok_or_else(|| {
            ApiError::unauthorized("invalid_service_token", "this route needs a service token")
        })?;
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(MatchedPath::as_str)
            .unwrap_or_default();
        let scope = ROUTE_SCOPES
            .iter()
            .find(|(path, _)| *path == route)
            .map(|(_, scope)| *scope);
        match scope {
            Some(scope) if caller.scopes.contains(scope) => Ok(Service(caller.clone())),
            Some(scope) => Err(ApiError::Forbidden {
                code: "insufficient_scope",
                message: format!("this service token lacks the {scope} scope this route needs"),
            }),
            None => Err(ApiError::Forbidden {
                code: "insufficient_scope",
                message: "no service token may call this route".to_owned(),
            }),
        }
    }
}
