//! Service-to-service authentication and authorisation: a bearer token in gRPC
//! metadata (or an HTTP header), checked against the configured tokens in constant
//! time, and the scopes that token holds.
//!
//! Each token has a name and a set of [`Scope`]s. Tokens come from
//! `REEVE_SERVICE_TOKENS` (plain, comma-separated: every scope, for compatibility and
//! `reeve up`) and from the file named by `REEVE_SERVICE_TOKENS_FILE`, which holds only
//! SHA-256 digests (hex), a name and scopes per token. Tokens are compared as SHA-256
//! digests so neither their content nor their length leaks through timing.
//!
//! Which method needs which scope is one table per service ([`ScopeTable`]), checked in
//! one place, [`ScopeGuard`], a tower layer keyed by the gRPC path in front of the
//! service: handlers never check scopes themselves, and a method missing from the table
//! cannot be called at all. This module never logs or echoes a token, and `Debug`
//! prints names and scopes only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tonic::server::NamedService;
use tonic::{Request, Status};

use crate::config::{self, ConfigError};

/// The ErrorInfo domain of authorisation refusals.
pub const ERROR_DOMAIN: &str = "auth.reeve.v1";
/// The ErrorInfo reason of a token that lacks the method's scope.
pub const INSUFFICIENT_SCOPE: &str = "INSUFFICIENT_SCOPE";

/// What a service token may do. Each RPC (and each service route of the REST API)
/// needs exactly one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Spend credits and read them: Deduct, DeductBatch, GetBalance, History (and
    /// holds, when they come). The LLM gateway's scope.
    Deduct,
    /// Tier quotas: CheckQuota, GetUsage, GetTier, Release.
    Quota,
    /// Money and limits moved by hand: AddCredits, Adjust, SetTier, SetOverride,
    /// ClearOverride.
    Admin,
    /// The Stripe edge (the bridge): Purchase (start a Checkout for a signed-in user)
    /// and RecordPaymentEvent (money that moved at Stripe).
    Stripe,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Deduct, Scope::Quota, Scope::Admin, Scope::Stripe];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Deduct => "deduct",
            Scope::Quota => "quota",
            Scope::Admin => "admin",
            Scope::Stripe => "stripe",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub fn all() -> Scopes {
        Scopes::from_iter(Scope::ALL)
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Scopes {
        Scopes(iter.into_iter().fold(0, |bits, s| bits | s.bit()))
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.iter().map(Scope::as_str))
            .finish()
    }
}

/// Which scope each method of one service needs: `(method name, scope)`, e.g.
/// `("Deduct", Scope::Deduct)`.
pub type ScopeTable = &'static [(&'static str, Scope)];

/// The scope `method` needs according to `table`; `None` for a method not listed.
pub fn required_scope(table: ScopeTable, method: &str) -> Option<Scope> {
    table
        .iter()
        .find(|(name, _)| *name == method)
        .map(|(_, scope)| *scope)
}

/// Who presented an accepted token: its configured name and scopes. The scope guard
/// puts it in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: Arc<str>,
    pub scopes: Scopes,
}

/// One accepted token: only its digest is kept.
#[derive(Clone)]
struct Entry {
    digest: [u8; 32],
    caller: Caller,
}

/// The set of service tokens a server accepts, with each one's name and scopes.
#[derive(Clone)]
pub struct ServiceTokens {
    entries: Arc<Vec<Entry>>,
}

impl fmt::Debug for ServiceTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_map();
        for entry in self.entries.iter() {
            list.entry(&entry.caller.name, &entry.caller.scopes);
        }
        list.finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The SHA-256 digest of a token as the token file stores it (64 lower-case hex digits).
pub fn token_digest_hex(token: &str) -> String {
    digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_digest_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The variable naming the token file.
pub const TOKENS_FILE_VARIABLE: &str = "REEVE_SERVICE_TOKENS_FILE";

impl ServiceTokens {
    /// Plain tokens holding every scope (`REEVE_SERVICE_TOKENS`); empty strings are
    /// ignored. Each is named `REEVE_SERVICE_TOKENS[i]` (its position, from 1).
    pub fn new<I, S>(tokens: I) -> ServiceTokens
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let entries = tokens
            .into_iter()
            .map(|t| t.as_ref().trim().to_owned())
            .filter(|t| !t.is_empty())
            .enumerate()
            .map(|(i, t)| Entry {
                digest: digest(t.as_bytes()),
                caller: Caller {
                    name: format!("REEVE_SERVICE_TOKENS[{}]", i + 1).into(),
                    scopes: Scopes::all(),
                },
            })
            .collect();
        ServiceTokens {
            entries: Arc::new(entries),
        }
    }

    /// Parses the comma-separated form of `REEVE_SERVICE_TOKENS` (every scope).
    pub fn from_comma_separated(list: &str) -> ServiceTokens {
        ServiceTokens::new(list.split(','))
    }

    /// The same set plus one more token with a name and scopes (tests and launchers).
    pub fn with_token(self, name: &str, token: &str, scopes: &[Scope]) -> ServiceTokens {
        let mut entries = (*self.entries).clone();
        entries.push(Entry {
            digest: digest(token.as_bytes()),
            caller: Caller {
                name: name.into(),
                scopes: scopes.iter().copied().collect(),
            },
        });
        ServiceTokens {
            entries: Arc::new(entries),
        }
    }

    /// Parses a token file:
    ///
    /// ```toml
    /// [[token]]
    /// name = "gateway"
    /// sha256 = "<64 hex digits: the SHA-256 of the token>"
    /// scopes = ["deduct", "quota"]
    /// ```
    ///
    /// Names are unique (letters, digits, `-`, `_`, `.`; at most 64), every scope is
    /// known and at least one is given, no digest appears twice, no other key is
    /// allowed. Errors name the entry and the field, never a value of the file.
    pub fn parse_file(text: &str) -> Result<ServiceTokens, String> {
        let table = config::parse_toml(text)?;
        let mut entries = Vec::new();
        for (key, value) in table {
            if key != "token" {
                return Err(format!("unknown key {key} (expected [[token]] entries)"));
            }
            let toml::Value::Array(items) = value else {
                return Err("token must be an array of tables ([[token]])".to_owned());
            };
            for (index, item) in items.into_iter().enumerate() {
                entries.push(parse_entry(index + 1, item)?);
            }
        }
        let mut names = HashMap::new();
        let mut digests = HashMap::new();
        for entry in &entries {
            if let Some(()) = names.insert(entry.caller.name.clone(), ()) {
                return Err(format!("token {:?} is named twice", entry.caller.name));
            }
            if let Some(other) = digests.insert(entry.digest, entry.caller.name.clone()) {
                return Err(format!(
                    "tokens {other:?} and {:?} have the same sha256",
                    entry.caller.name
                ));
            }
        }
        Ok(ServiceTokens {
            entries: Arc::new(entries),
        })
    }

    /// The tokens in force: `REEVE_SERVICE_TOKENS` (every scope) and the entries of
    /// `REEVE_SERVICE_TOKENS_FILE`. At least one token is required; a file that cannot
    /// be read or parsed is an error naming `REEVE_SERVICE_TOKENS_FILE`.
    pub fn from_config() -> Result<ServiceTokens, ConfigError> {
        let plain = ServiceTokens::from_comma_separated(
            &config::var("REEVE_SERVICE_TOKENS")?.unwrap_or_default(),
        );
        let file =
            match config::var(TOKENS_FILE_VARIABLE)? {
                None => None,
                Some(path) => {
                    let text = std::fs::read_to_string(path.trim()).map_err(|e| {
                        ConfigError::new(TOKENS_FILE_VARIABLE, format!("cannot read {path}: {e}"))
                    })?;
                    Some(ServiceTokens::parse_file(&text).map_err(|e| {
                        ConfigError::new(TOKENS_FILE_VARIABLE, format!("{path}: {e}"))
                    })?)
                }
            };
        let mut entries = (*plain.entries).clone();
        if let Some(file) = file {
            for entry in file.entries.iter() {
                if entries.iter().any(|e| e.digest == entry.digest) {
                    return Err(ConfigError::new(
                        TOKENS_FILE_VARIABLE,
                        format!(
                            "token {:?} is also in REEVE_SERVICE_TOKENS; list it once",
                            entry.caller.name
                        ),
                    ));
                }
                entries.push(entry.clone());
            }
        }
        if entries.is_empty() {
            return Err(ConfigError::new(
                "REEVE_SERVICE_TOKENS",
                "is required (or REEVE_SERVICE_TOKENS_FILE): the bearer tokens callers present",
            ));
        }
        Ok(ServiceTokens {
            entries: Arc::new(entries),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller whose token `presented` is, if any. Every configured token is
    /// compared, whichever matches, so the time taken does not tell which one did.
    pub fn authenticate(&self, presented: &str) -> Option<&Caller> {
        let presented = digest(presented.as_bytes());
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, entry) in self.entries.iter().enumerate() {
            let matches = entry.digest.ct_eq(&presented);
            index = u32::conditional_select(&index, &(i as u32), matches);
            found |= matches;
        }
        bool::from(found).then(|| &self.entries[index as usize].caller)
    }

    /// True when `presented` equals one of the tokens.
    pub fn accepts(&self, presented: &str) -> bool {
        self.authenticate(presented).is_some()
    }

    /// Checks an `authorization: Bearer <token>` header value.
    pub fn accepts_bearer(&self, header: Option<&str>) -> bool {
        header
            .and_then(bearer_token)
            .is_some_and(|token| self.accepts(token))
    }

    /// The caller of an `authorization` header value, if it holds an accepted token.
    pub fn caller_of_bearer(&self, header: Option<&str>) -> Option<&Caller> {
        header
            .and_then(bearer_token)
            .and_then(|token| self.authenticate(token))
    }

    /// Wraps a tonic service so that every call needs an accepted token holding the
    /// scope `table` names for its method (see [`ScopeGuard`]).
    pub fn guard<S: NamedService>(&self, service: S, table: ScopeTable) -> ScopeGuard<S> {
        ScopeGuard {
            inner: service,
            tokens: self.clone(),
            table,
        }
    }
}

fn parse_entry(position: usize, item: toml::Value) -> Result<Entry, String> {
    let toml::Value::Table(table) = item else {
        return Err(format!("token entry {position} must be a table"));
    };
    let mut name = None;
    let mut sha256 = None;
    let mut scopes = None;
    for (key, value) in table {
        match (key.as_str(), value) {
            ("name", toml::Value::String(s)) => name = Some(s),
            ("sha256", toml::Value::String(s)) => sha256 = Some(s),
            ("scopes", toml::Value::Array(list)) => scopes = Some(list),
            ("name" | "sha256", _) => {
                return Err(format!("token entry {position}: {key} must be a string"));
            }
            ("scopes", _) => {
                return Err(format!(
                    "token entry {position}: scopes must be a list of strings"
                ));
            }
            (other, _) => {
                return Err(format!("token entry {position}: unknown key {other}"));
            }
        }
    }
    let name = name.ok_or_else(|| format!("token entry {position}: name is required"))?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "token entry {position}: name must be 1 to 64 letters, digits, '-', '_' or '.'"
        ));
    }
    let at = format!("token {name:?}");
    // The value is never quoted: an operator may have pasted the token itself here.
    let digest = sha256
        .as_deref()
        .ok_or_else(|| format!("{at}: sha256 is required"))
        .and_then(|hex| {
            parse_digest_hex(hex.trim()).ok_or_else(|| {
                format!(
                    "{at}: sha256 must be 64 hexadecimal digits, the SHA-256 of the token (not the token itself)"
                )
            })
        })?;
    let scopes = scopes.ok_or_else(|| format!("{at}: scopes is required"))?;
    let mut set = Vec::new();
    for (i, scope) in scopes.into_iter().enumerate() {
        let toml::Value::String(scope) = scope else {
            return Err(format!("{at}: scopes must be a list of strings"));
        };
        // Named by position, not quoted, like every value of this file.
        let known = Scope::parse(&scope).ok_or_else(|| {
            format!(
                "{at}: scope {} is unknown (known: deduct, quota, admin, stripe)",
                i + 1
            )
        })?;
        set.push(known);
    }
    let scopes: Scopes = set.into_iter().collect();
    if scopes.is_empty() {
        return Err(format!("{at}: scopes must name at least one scope"));
    }
    Ok(Entry {
        digest,
        caller: Caller {
            name: name.into(),
            scopes,
        },
    })
}

/// A tonic service behind the scope check: the one place where a gRPC call's token
/// and scope are checked. The method is read from the request path
/// (`/<package.Service>/<Method>`) and looked up in the service's [`ScopeTable`].
///
/// - no token, or one not configured: `UNAUTHENTICATED`;
/// - an accepted token without the method's scope: `PERMISSION_DENIED` with an
///   `ErrorInfo` (reason `INSUFFICIENT_SCOPE`, metadata `scope` and `method`);
/// - a method the table does not list: `UNIMPLEMENTED`, whoever calls (fail closed);
/// - otherwise the call goes on, with the [`Caller`] in the request's extensions.
#[derive(Clone)]
pub struct ScopeGuard<S> {
    inner: S,
    tokens: ServiceTokens,
    table: ScopeTable,
}

impl<S> fmt::Debug for ScopeGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopeGuard")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl<S: NamedService> NamedService for ScopeGuard<S> {
    const NAME: &'static str = S::NAME;
}

impl<S: NamedService> ScopeGuard<S> {
    /// The caller, or the status refusing a call to `path` with this `authorization`.
    fn check(&self, path: &str, authorization: Option<&str>) -> Result<Caller, Status> {
        let caller = self.tokens.caller_of_bearer(authorization).ok_or_else(|| {
            Status::unauthenticated(
                "missing or invalid service token (authorization: Bearer <token>)",
            )
        })?;
        let method = path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(S::NAME))
            .and_then(|p| p.strip_prefix('/'))
            .unwrap_or_default();
        let scope = required_scope(self.table, method)
            .ok_or_else(|| Status::unimplemented("no such method"))?;
        if caller.scopes.contains(scope) {
            Ok(caller.clone())
        } else {
            Err(insufficient_scope(scope, method))
        }
    }
}

/// `PERMISSION_DENIED` for a token without `scope`, with its `ErrorInfo`.
pub fn insufficient_scope(scope: Scope, method: &str) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let metadata = HashMap::from([
        ("scope".to_owned(), scope.as_str().to_owned()),
        ("method".to_owned(), method.to_owned()),
    ]);
    Status::with_error_details(
        tonic::Code::PermissionDenied,
        format!("this service token lacks the {scope} scope that {method} needs"),
        ErrorDetails::with_error_info(INSUFFICIENT_SCOPE, ERROR_DOMAIN, metadata),
    )
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for ScopeGuard<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + NamedService
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self.check(request.uri().path(), authorization) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                // The clone that was polled ready serves this call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(request))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
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
    #![allow(clippy::unwrap_used)]
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

    #[test]
    fn plain_tokens_hold_every_scope_and_file_tokens_their_own() {
        let text = format!(
            "[[token]]\nname = \"gateway\"\nsha256 = \"{}\"\nscopes = [\"deduct\", \"quota\"]\n\n\
             [[token]]\nname = \"ops\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
            token_digest_hex("gw-secret"),
            token_digest_hex("ops-secret").to_uppercase(),
        );
        let file = ServiceTokens::parse_file(&text).unwrap();
        let gateway = file.authenticate("gw-secret").unwrap();
        assert_eq!(&*gateway.name, "gateway");
        assert!(gateway.scopes.contains(Scope::Deduct) && gateway.scopes.contains(Scope::Quota));
        assert!(!gateway.scopes.contains(Scope::Admin));
        let ops = file.authenticate("ops-secret").unwrap();
        assert_eq!(ops.scopes, [Scope::Admin].into_iter().collect());
        assert!(file.authenticate("nobody").is_none());
        let debug = format!("{file:?}");
        assert!(debug.contains("gateway") && !debug.contains(&token_digest_hex("gw-secret")));

        let plain = ServiceTokens::from_comma_separated("a,b");
        assert_eq!(plain.authenticate("b").unwrap().scopes, Scopes::all());
    }

    #[test]
    fn a_bad_token_file_is_refused_without_echoing_it() {
        let good = token_digest_hex("t");
        let cases = [
            // The token itself pasted where its digest belongs.
            "[[token]]\nname = \"gw\"\nsha256 = \"svc_live_SECRETVALUE\"\nscopes = [\"deduct\"]\n",
            &format!(
                "[[token]]\nname = \"gw\"\nsha256 = \"{}zz\"\nscopes = [\"deduct\"]\n",
                &good[..62]
            ),
            &format!("[[token]]\nname = \"gw\"\nsha256 = \"{good}\"\nscopes = [\"SECRETVALUE\"]\n"),
            &format!("[[token]]\nname = \"gw\"\nsha256 = \"{good}\"\nscopes = []\n"),
            &format!(
                "[[token]]\nname = \"gw\"\nsha256 = \"{good}\"\nscopes = [\"deduct\"]\ntoken = \"SECRETVALUE\"\n"
            ),
            &format!(
                "[[token]]\nname = \"a\"\nsha256 = \"{good}\"\nscopes = [\"deduct\"]\n[[token]]\nname = \"b\"\nsha256 = \"{good}\"\nscopes = [\"quota\"]\n"
            ),
            "[[token]]\nname = \"gw\"\nsha256 = SECRETVALUE\n",
            "[[token]]\nname = \"SECRET VALUE\"\nsha256 = \"x\"\nscopes = [\"deduct\"]\n",
        ];
        for text in cases {
            let error = ServiceTokens::parse_file(text).unwrap_err();
            assert!(!error.contains("SECRET"), "{error}");
        }
    }

    #[test]
    fn methods_missing_from_the_table_are_unreachable() {
        struct Svc;
        impl NamedService for Svc {
            const NAME: &'static str = "pkg.Svc";
        }
        const TABLE: ScopeTable = &[("Spend", Scope::Deduct), ("Grant", Scope::Admin)];
        let tokens = ServiceTokens::new(["root"]).with_token("gw", "gw", &[Scope::Deduct]);
        let guard = tokens.guard(Svc, TABLE);
        let code = |path: &str, token: &str| {
            guard
                .check(path, Some(&format!("Bearer {token}")))
                .map(|c| c.name.to_string())
                .map_err(|s| s.code())
        };
        assert_eq!(code("/pkg.Svc/Spend", "gw"), Ok("gw".to_owned()));
        assert_eq!(
            code("/pkg.Svc/Grant", "gw"),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(code("/pkg.Svc/Grant", "root").map(|_| ()), Ok(()));
        assert_eq!(
            code("/pkg.Svc/Other", "root"),
            Err(tonic::Code::Unimplemented)
        );
        assert_eq!(
            code("/pkg.Svc/Spend", "nope"),
            Err(tonic::Code::Unauthenticated)
        );
        use tonic_types::StatusExt;
        let status = guard
            .check("/pkg.Svc/Grant", Some("Bearer gw"))
            .unwrap_err();
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, INSUFFICIENT_SCOPE);
        assert_eq!(info.metadata["scope"], "admin");
    }
}
