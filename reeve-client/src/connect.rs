//! One way to reach credits-svc and quota-svc: [`ClientBuilder`] turns an address
//! (`host:port` or a URL; TLS when it is `https://`), a service token and timeouts
//! into a [`Connection`], from which the typed clients are made. The token is held as a
//! [`SecretString`] and leaves this module only inside a sensitive metadata value
//! ([`BearerToken`], which also passes the W3C trace context on); nothing here prints
//! it, and `Debug` shows only the address.

use std::fmt;
use std::time::Duration;

use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_proto::quota::v1::quota_service_client::QuotaServiceClient;
use reeve_runtime::auth::BearerToken;
use secrecy::{ExposeSecret, SecretString};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::retry::RetryPolicy;

/// The largest message either way (a DeductBatch of 10,000 items fits easily).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The generated credits client with the token interceptor, for RPCs the typed
/// client does not wrap.
pub type RawCreditsClient = CreditServiceClient<InterceptedService<Channel, BearerToken>>;
/// The generated quota client with the token interceptor.
pub type RawQuotaClient = QuotaServiceClient<InterceptedService<Channel, BearerToken>>;

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{address:?} is not a host:port or http(s) URL: {reason}")]
    InvalidAddress { address: String, reason: String },
    #[error("the service token must be printable ASCII")]
    InvalidToken,
    #[error("no service token was given")]
    MissingToken,
    #[error("TLS set-up failed: {0}")]
    Tls(String),
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        url: String,
        source: tonic::transport::Error,
    },
}

/// `host:port` or `http(s)://host:port` as a URL; an unspecified listen address
/// (0.0.0.0, [::]) is reached on loopback, so a service's own listen setting works.
pub fn normalize_url(address: &str) -> Result<String, ConnectError> {
    let address = address.trim();
    let url = if address.starts_with("http://") || address.starts_with("https://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let url = url
        .replacen("://0.0.0.0:", "://127.0.0.1:", 1)
        .replacen("://[::]:", "://[::1]:", 1);
    Endpoint::from_shared(url.clone()).map_err(|e| ConnectError::InvalidAddress {
        address: address.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(url)
}

/// Builds a [`Connection`] to one service.
pub struct ClientBuilder {
    address: String,
    token: Option<SecretString>,
    connect_timeout: Duration,
    request_timeout: Duration,
    retry: RetryPolicy,
    ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("address", &self.address)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A builder for `address` (`host:port`, `http://…` or `https://…`).
    pub fn new(address: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            address: address.into(),
            token: None,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            ca_pem: None,
        }
    }

    /// The bearer token sent on every call.
    pub fn service_token(mut self, token: SecretString) -> ClientBuilder {
        self.token = Some(token);
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.connect_timeout = timeout;
        self
    }

    /// The deadline of each attempt of a call (sent as `grpc-timeout` too).
    pub fn request_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.request_timeout = timeout;
        self
    }

    /// Retries of the typed clients' calls (see [`crate::retry`]).
    pub fn retry(mut self, policy: RetryPolicy) -> ClientBuilder {
        self.retry = policy;
        self
    }

    /// A CA (PEM) to trust for `https://` besides the public web roots.
    pub fn ca_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> ClientBuilder {
        self.ca_pem = Some(pem.into());
        self
    }

    fn endpoint(&self) -> Result<(String, Endpoint), ConnectError> {
        let url = normalize_url(&self.address)?;
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| ConnectError::InvalidAddress {
                address: self.address.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(pem) = &self.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ConnectError::Tls(e.to_string()))?;
        }
        Ok((url, endpoint))
    }

    fn token(&self) -> Result<BearerToken, ConnectError> {
        let token = self.token.as_ref().ok_or(ConnectError::MissingToken)?;
        BearerToken::new(token.expose_secret().trim()).map_err(|_| ConnectError::InvalidToken)
    }

    /// A connection that connects on first use (and reconnects by itself): what a
    /// server wants at start, when the other service may not be up yet.
    pub fn connect_lazy(self) -> Result<Connection, ConnectError> {
        let token = self.token()?;
        let (url, endpoint) = self.endpoint()?;
        Ok(Connection {
            url,
            channel: endpoint.connect_lazy(),
            token,
            retry: self.retry,
        })
    }

    /// A connection, connected now (a CLI wants to fail early).
    pub async fn connect(self) -> Result<Connection, ConnectError> {
        let token = self.token()?;
        let (url, endpoint) = self.endpoint()?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ConnectError::Unreachable {
                url: url.clone(),
                source,
            })?;
        Ok(Connection {
            url,
            channel,
            token,
            retry: self.retry,
        })
    }
}

/// A channel to one service and the token to present there; cheap to clone.
#[derive(Clone)]
pub struct Connection {
    url: String,
    channel: Channel,
    token: BearerToken,
    retry: RetryPolicy,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying channel (health checks, other services on the same server).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// The typed credits-svc client (retries, same key every time).
    pub fn credits(&self) -> crate::CreditsClient {
        crate::CreditsClient::new(self)
    }

    /// The typed quota-svc client.
    pub fn quota(&self) -> crate::QuotaClient {
        crate::QuotaClient::new(self)
    }

    /// The generated credits client with the token (no retries of its own).
    pub fn raw_credits(&self) -> RawCreditsClient {
        CreditServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The generated quota client with the token (no retries of its own).
    pub fn raw_quota(&self) -> RawQuotaClient {
        QuotaServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addresses_become_urls() {
        assert_eq!(
            normalize_url("127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            normalize_url("0.0.0.0:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(normalize_url("[::]:1").unwrap(), "http://[::1]:1");
        assert_eq!(
            normalize_url("https://credits.example:443").unwrap(),
            "https://credits.example:443"
        );
        assert!(normalize_url("not a url at all").is_err());
    }

    #[tokio::test]
    async fn the_token_is_never_printed() {
        let builder = ClientBuilder::new("https://credits.example:443")
            .service_token(SecretString::from("svc_live_SECRET"));
        assert!(!format!("{builder:?}").contains("SECRET"));
        let connection = builder.connect_lazy().unwrap();
        assert!(!format!("{connection:?}").contains("SECRET"));
        assert!(!format!("{:?}", connection.credits()).contains("SECRET"));
        assert!(matches!(
            ClientBuilder::new("h:1").connect_lazy(),
            Err(ConnectError::MissingToken)
        ));
        assert!(matches!(
            ClientBuilder::new("h:1")
                .service_token(SecretString::from("bad\ntoken"))
                .connect_lazy(),
            Err(ConnectError::InvalidToken)
        ));
    }
}
