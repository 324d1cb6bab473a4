//! webhook-bridge: Reeve's REST API and Stripe webhook receiver. Frontend calls (a
//! user's JWT), gateway calls (a service token) and Stripe's signed webhooks come in
//! over HTTP and go out as gRPC calls to credits-svc and quota-svc.
//!
//! Connections are guarded by [`reeve_runtime::connections`] (a cap, 10 s to send a
//! request head, 75 s idle); every error, the HTTP layer's own included, is the JSON
//! envelope of [`error`].
//!
//! The bridge holds no money and no quota: its only table is the audit trail of Stripe
//! events. `main.rs` reads [`Config`] and calls [`start`]; tests call [`start`] on
//! port 0.

pub mod amount;
pub mod auth;
pub mod error;
pub mod openapi;
pub mod routes;
pub mod stripe {
    pub mod apply;
    pub mod events;
    pub mod interpret;
    pub mod reconcile;
    pub mod verify;
}

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_proto::quota::v1::quota_service_client::QuotaServiceClient;
use reeve_runtime::auth::{BearerToken, ServiceTokens};
use reeve_runtime::config::{self, ConfigError};
use reeve_runtime::connections::{ConnInfo, GuardedListener, Limits};
use secrecy::SecretString;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::auth::{JwtKey, JwtVerifier};
use crate::stripe::events::EventStore;

pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_CREDITS_ADDR: &str = "127.0.0.1:50051";
pub const DEFAULT_QUOTA_ADDR: &str = "127.0.0.1:50052";
/// Largest request body: a full batch of 10,000 deductions fits.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Everything the bridge needs to start. Secrets are `SecretString`s, exposed only where
/// they are used; `Debug` never shows them.
#[derive(Clone)]
pub struct Config {
    /// `REEVE_HTTP_ADDR`: where to listen.
    pub http_addr: SocketAddr,
    /// `REEVE_CREDITS_ADDR` / `REEVE_QUOTA_ADDR`: where the services are (host:port or URL).
    pub credits_url: String,
    pub quota_url: String,
    /// `REEVE_SERVICE_TOKENS`: accepted on the service routes.
    pub service_tokens: ServiceTokens,
    /// `REEVE_SERVICE_TOKEN`: what the bridge presents to the services.
    pub service_token: SecretString,
    /// `REEVE_JWT_HS256_SECRET` or `REEVE_JWT_RS256_PUBLIC_KEY_FILE`.
    pub jwt: JwtKey,
    /// `REEVE_JWT_AUDIENCE` / `REEVE_JWT_ISSUER`: checked against `aud` / `iss` when set.
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
    /// `STRIPE_WEBHOOK_SECRET`.
    pub webhook_secret: SecretString,
    /// `REEVE_DATABASE_URL`: where Stripe events are kept.
    pub database_url: String,
    /// `REEVE_CURRENCY`: the only currency credited.
    pub currency: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("http_addr", &self.http_addr)
            .field("credits_url", &self.credits_url)
            .field("quota_url", &self.quota_url)
            .field("service_tokens", &self.service_tokens)
            .field("service_token", &"<redacted>")
            .field("jwt", &self.jwt)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("webhook_secret", &"<redacted>")
            .field("database_url", &"<redacted>")
            .field("currency", &self.currency)
            .finish()
    }
}

/// `host:port` or `http(s)://host:port` as a gRPC endpoint URL; an unspecified listen
/// address (0.0.0.0, [::]) is reached on loopback.
pub fn grpc_url(variable: &'static str, value: &str) -> Result<String, ConfigError> {
    reeve_client::connect::normalize_url(value).map_err(|e| match e {
        reeve_client::ConnectError::InvalidAddress { reason, .. } => {
            ConfigError::new(variable, format!("is not a host:port or URL: {reason}"))
        }
        other => ConfigError::new(variable, other.to_string()),
    })
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        let default_http = DEFAULT_HTTP_ADDR
            .parse()
            .map_err(|_| ConfigError::new("REEVE_HTTP_ADDR", "default is invalid"))?;
        let http_addr = config::parse_or("REEVE_HTTP_ADDR", default_http)?;
        let credits_url = grpc_url(
            "REEVE_CREDITS_ADDR",
            &config::var("REEVE_CREDITS_ADDR")?.unwrap_or_else(|| DEFAULT_CREDITS_ADDR.to_owned()),
        )?;
        let quota_url = grpc_url(
            "REEVE_QUOTA_ADDR",
            &config::var("REEVE_QUOTA_ADDR")?.unwrap_or_else(|| DEFAULT_QUOTA_ADDR.to_owned()),
        )?;
        let tokens_text = config::var("REEVE_SERVICE_TOKENS")?.unwrap_or_default();
        // REEVE_SERVICE_TOKENS (every scope) and REEVE_SERVICE_TOKENS_FILE (named,
        // scoped): the tokens the service routes (deduct) accept.
        let service_tokens = ServiceTokens::from_config()?;
        let service_token = match config::var("REEVE_SERVICE_TOKEN")? {
            Some(token) => token.trim().to_owned(),
            None => tokens_text
                .split(',')
                .map(str::trim)
                .find(|t| !t.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| {
                    ConfigError::new(
                        "REEVE_SERVICE_TOKEN",
                        "is required (or REEVE_SERVICE_TOKENS, whose first token is then used): the file of REEVE_SERVICE_TOKENS_FILE holds only digests",
                    )
                })?,
        };
        BearerToken::new(&service_token)
            .map_err(|_| ConfigError::new("REEVE_SERVICE_TOKEN", "must be printable ASCII"))?;
        let service_token = SecretString::from(service_token);
        let jwt = match (
            config::var("REEVE_JWT_HS256_SECRET")?,
            config::var("REEVE_JWT_RS256_PUBLIC_KEY_FILE")?,
        ) {
            (Some(secret), None) => JwtKey::Hs256(SecretString::from(secret)),
            (None, Some(path)) => JwtKey::Rs256Pem(std::fs::read(&path).map_err(|e| {
                ConfigError::new(
                    "REEVE_JWT_RS256_PUBLIC_KEY_FILE",
                    format!("cannot read {path}: {e}"),
                )
            })?),
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "REEVE_JWT_HS256_SECRET",
                    "set either REEVE_JWT_HS256_SECRET or REEVE_JWT_RS256_PUBLIC_KEY_FILE, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "REEVE_JWT_HS256_SECRET",
                    "is required (or REEVE_JWT_RS256_PUBLIC_KEY_FILE) to verify user tokens",
                ));
            }
        };
        let jwt_audience = config::var("REEVE_JWT_AUDIENCE")?;
        let jwt_issuer = config::var("REEVE_JWT_ISSUER")?;
        JwtVerifier::new(&jwt, jwt_audience.as_deref(), jwt_issuer.as_deref())?;
        let webhook_secret = config::var("STRIPE_WEBHOOK_SECRET")?
            .map(SecretString::from)
            .ok_or_else(|| {
                ConfigError::new(
                    "STRIPE_WEBHOOK_SECRET",
                    "is required to verify Stripe webhooks",
                )
            })?;
        let database_url = config::var("REEVE_DATABASE_URL")?
            .unwrap_or_else(|| "sqlite://reeve-data/reeve.db".to_owned());
        if !(database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://")
            || database_url.starts_with("sqlite:"))
        {
            return Err(ConfigError::new(
                "REEVE_DATABASE_URL",
                "must start with postgres://, postgresql:// or sqlite:",
            ));
        }
        let currency = config::currency()?;
        Ok(Config {
            http_addr,
            credits_url,
            quota_url,
            service_tokens,
            service_token,
            jwt,
            jwt_audience,
            jwt_issuer,
            webhook_secret,
            database_url,
            currency,
        })
    }
}

pub type CreditsClient = CreditServiceClient<InterceptedService<Channel, BearerToken>>;
pub type QuotaClient = QuotaServiceClient<InterceptedService<Channel, BearerToken>>;

/// What every handler shares, built once.
pub struct AppState {
    pub jwt: JwtVerifier,
    pub service_tokens: ServiceTokens,
    pub events: EventStore,
    pub currency: String,
    /// `STRIPE_WEBHOOK_SECRET`, exposed only to verify a signature.
    pub webhook_secret: SecretString,
    credits: CreditsClient,
    /// The signed-in users' balance questions, asked of credits-svc together.
    balances: reeve_client::BalanceReader,
    quota: QuotaClient,
    credits_channel: Channel,
    quota_channel: Channel,
    /// The quota registry's features, learnt from quota-svc for the OpenAPI document.
    features: tokio::sync::OnceCell<Vec<String>>,
}

impl AppState {
    /// The quota registry's feature names (asked of quota-svc once; `None` while it
    /// does not answer).
    pub async fn registry_features(&self) -> Option<&[String]> {
        let asked = self.features.get_or_try_init(|| async {
            let reply = tokio::time::timeout(
                Duration::from_secs(2),
                self.quota()
                    .get_usage(reeve_proto::quota::v1::GetUsageRequest {
                        user_id: "openapi-document".to_owned(),
                    }),
            )
            .await
            .map_err(|_| ())?
            .map_err(|_| ())?;
            Ok::<_, ()>(
                reply
                    .into_inner()
                    .features
                    .into_iter()
                    .map(|f| f.feature)
                    .collect(),
            )
        });
        asked.await.ok().map(Vec::as_slice)
    }

    pub fn credits(&self) -> CreditsClient {
        self.credits.clone()
    }

    /// Balance questions, coalesced into `GetBalances` calls (no retries, as every
    /// other call of the bridge: a caller sees 503 at once when credits-svc is down).
    pub fn balances(&self) -> &reeve_client::BalanceReader {
        &self.balances
    }

    pub fn quota(&self) -> QuotaClient {
        self.quota.clone()
    }
}

/// A connection through reeve-client's builder (3 s to connect, 30 s per call).
fn connection(
    variable: &'static str,
    url: &str,
    token: reeve_client::SecretString,
) -> Result<reeve_client::Connection, ConfigError> {
    reeve_client::ClientBuilder::new(url)
        .service_token(token)
        .connect_timeout(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(30))
        .connect_lazy()
        .map_err(|e| match e {
            reeve_client::ConnectError::InvalidToken | reeve_client::ConnectError::MissingToken => {
                ConfigError::new("REEVE_SERVICE_TOKEN", "must be printable ASCII")
            }
            other => ConfigError::new(variable, other.to_string()),
        })
}

/// The whole REST API on a state.
pub fn router(state: Arc<AppState>) -> Router {
    router_with(state, Router::new())
}

/// The API plus `extra` routes, all behind the same layers (body limit, error
/// envelope, request tracking, span and metrics).
fn router_with(state: Arc<AppState>, extra: Router<Arc<AppState>>) -> Router {
    Router::new()
        .route("/api/credits/balance", get(routes::credits::balance))
        .route("/api/credits/purchase", post(routes::credits::purchase))
        .route("/api/credits/deduct", post(routes::credits::deduct))
        .route(
            "/api/credits/deduct/batch",
            post(routes::credits::deduct_batch),
        )
        .route("/api/credits/history", get(routes::credits::history))
        .route(
            "/api/credits/history.csv",
            get(routes::history_csv::download),
        )
        .route("/api/credits/lots", get(routes::lots::list))
        .route("/api/credits/grants", post(routes::lots::grant))
        .merge(routes::holds::router())
        .merge(routes::notifications::router())
        .merge(routes::topup::router())
        .route("/api/credits/webhook", post(routes::webhook::receive))
        .route("/api/tier/usage", get(routes::tier::usage))
        .route("/api/tier/check", get(routes::tier::check))
        .merge(routes::billing::routes())
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/openapi.json", get(openapi::serve))
        .route(
            "/metrics",
            get(|| async { reeve_runtime::telemetry::render_metrics() }),
        )
        .merge(extra)
        .fallback(|| async {
            error::ApiError::NotFound {
                code: "not_found".to_owned(),
                message: "no such route".to_owned(),
            }
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(error::envelope_errors))
        .layer(reeve_runtime::connections::TrackRequests)
        .layer(axum::middleware::from_fn(http_telemetry))
        .with_state(state)
}

/// A span per request (a child of the caller's W3C trace context, if sent) with the
/// user id recorded by the auth extractor, and `reeve_http_requests_total` /
/// `reeve_http_request_duration_seconds` by route and status.
async fn http_telemetry(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    // A fixed set of labels: a caller cannot grow the metrics with made-up methods.
    let method = match *request.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let span = tracing::info_span!("http", http.method = %method, http.route = %route, user_id = tracing::field::Empty, otel.kind = "server");
    reeve_runtime::telemetry::adopt_trace_context(&span, request.headers());
    let started = std::time::Instant::now();
    let response = next.run(request).instrument(span).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("reeve_http_requests_total", "method" => method, "route" => route.clone(), "status" => status.clone())
        .increment(1);
    metrics::histogram!("reeve_http_request_duration_seconds", "method" => method, "route" => route, "status" => status)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A started bridge.
pub struct RunningBridge {
    pub local_addr: SocketAddr,
    pub events: EventStore,
    state: Arc<AppState>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningBridge {
    /// Waits until the server ends (its shutdown token was cancelled and in-flight
    /// requests finished).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await??;
        Ok(())
    }

    /// Acts again, now, on Stripe events left without a final outcome whose last
    /// delivery was before `before_us` (what the retry task does every 30 s for those
    /// a minute old); how many reached a final outcome.
    pub async fn retry_unfinished_events(&self, before_us: i64) -> Result<usize, error::ApiError> {
        stripe::apply::retry_unfinished(&self.state, before_us).await
    }
}

/// Opens the event store (running its migration), binds and serves until `shutdown`
/// is cancelled; in-flight requests finish first.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<RunningBridge> {
    start_with_extra_routes(config, Router::new(), shutdown).await
}

/// [`start`] with `extra` routes served beside the API under the same layers. Not part
/// of the API: the load generator mounts its empty-request ceiling this way, so the
/// ceiling pays exactly the stack a real route pays. `main.rs` never adds any.
#[doc(hidden)]
pub async fn start_with_extra_routes(
    config: Config,
    extra: Router<Arc<AppState>>,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningBridge> {
    let events = EventStore::open(&config.database_url).await?;
    let credits = connection(
        "REEVE_CREDITS_ADDR",
        &config.credits_url,
        config.service_token.clone(),
    )?;
    let quota = connection(
        "REEVE_QUOTA_ADDR",
        &config.quota_url,
        config.service_token.clone(),
    )?;
    let state = Arc::new(AppState {
        jwt: JwtVerifier::new(
            &config.jwt,
            config.jwt_audience.as_deref(),
            config.jwt_issuer.as_deref(),
        )?,
        service_tokens: config.service_tokens.clone(),
        events: events.clone(),
        currency: config.currency.clone(),
        webhook_secret: config.webhook_secret.clone(),
        credits: credits.raw_credits(),
        balances: reeve_client::BalanceReader::new(
            credits
                .credits()
                .with_retry(reeve_client::RetryPolicy::none()),
        ),
        quota: quota.raw_quota(),
        credits_channel: credits.channel(),
        quota_channel: quota.channel(),
        features: tokio::sync::OnceCell::new(),
    });
    let sampled = events.clone();
    reeve_runtime::telemetry::sample_pool("webhook-bridge", shutdown.clone(), move || {
        sampled.pool_stats()
    });
    reeve_runtime::connections::raise_fd_limit();
    let listener = GuardedListener::new(
        tokio::net::TcpListener::bind(config.http_addr).await?,
        Limits::HTTP,
        "webhook-bridge",
    );
    let local_addr = listener.local_addr()?;
    stripe::apply::spawn_retry(Arc::clone(&state), shutdown.clone());
    let app =
        router_with(Arc::clone(&state), extra).into_make_service_with_connect_info::<ConnInfo>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    tracing::info!(%local_addr, "webhook-bridge serving");
    Ok(RunningBridge {
        local_addr,
        events,
        state,
        task,
    })
}
