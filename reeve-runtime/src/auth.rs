//! Service-to-service authentication: a bearer token in gRPC metadata (or an HTTP
//! header), checked against the configured tokens in constant time.
//!
//! Tokens are compared as SHA-256 digests so neither their content nor their length
//! leaks through timing. A token never reaches a log line: `Debug` prints a count.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// The set of service tokens a server accepts.
#[derive(Clone)]
pub struct ServiceTokens {
    digests: Arc<Vec<[u8; 32]>>,
}

impl fmt::Debug for ServiceTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceTokens({} configured)", self.digests.len())
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl ServiceTokens {
    /// Builds the set from plain tokens; empty strings are ignored.
    pub fn new<I, S>(tokens: I) -> ServiceTokens
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let digests = tokens
            .into_iter()
            .map(|t| t.as_ref().trim().to_owned())
            .filter(|t| !t.is_empty())
            .map(|t| digest(t.as_bytes()))
            .collect();
        ServiceTokens {
            digests: Arc::new(digests),
        }
    }

    /// Parses the comma-separated form of `REEVE_SERVICE_TOKENS`.
    pub fn from_comma_separated(list: &str) -> ServiceTokens {
        ServiceTokens::new(list.split(','))
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// True when `presented` equals one of the tokens. Every configured token is
    /// compared, whichever matches, so the time taken does not tell which one did.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented.as_bytes());
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, known| {
                found | known.ct_eq(&presented)
            })
            .into()
    }

    /// Checks an `authorization: Bearer <token>` header value.
    pub fn accepts_bearer(&self, header: Option<&str>) -> bool {
        header
            .and_then(bearer_token)
            .is_some_and(|token| self.accepts(token))
    }

    /// A tonic interceptor: requests without an accepted token are `UNAUTHENTICATED`.
    pub fn interceptor(
        &self,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + use<> {
        let tokens = self.clone();
        move |request: Request<()>| {
            let header = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if tokens.accepts_bearer(header) {
                Ok(request)
            } else {
                Err(Status::unauthenticated(
                    "missing or invalid service token (authorization: Bearer <token>)",
                ))
            }
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive).
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Adds `authorization: Bearer <token>` (and the current W3C trace context) to every
/// outgoing request of a tonic client.
#[derive(Clone)]
pub struct BearerToken {
    value: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    pub fn new(token: &str) -> Result<BearerToken, Status> {
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::invalid_argument("service token must be printable ASCII"))?;
        value.set_sensitive(true);
        Ok(BearerToken { value })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.value.clone());
        crate::telemetry::inject_trace_context(request.metadata_mut());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_tokens() {
        let tokens = ServiceTokens::from_comma_separated("alpha, beta,,");
        assert!(tokens.accepts("alpha"));
        assert!(tokens.accepts("beta"));
        assert!(!tokens.accepts("gamma"));
        assert!(!tokens.accepts(""));
        assert!(tokens.accepts_bearer(Some("Bearer beta")));
        assert!(tokens.accepts_bearer(Some("bearer alpha")));
        assert!(!tokens.accepts_bearer(Some("Basic alpha")));
        assert!(!tokens.accepts_bearer(Some("alpha")));
        assert!(!tokens.accepts_bearer(None));
        assert!(!format!("{tokens:?}").contains("alpha"));
    }

    #[test]
    fn empty_set_accepts_nothing() {
        let tokens = ServiceTokens::from_comma_separated("");
        assert!(tokens.is_empty());
        assert!(!tokens.accepts(""));
    }
}
