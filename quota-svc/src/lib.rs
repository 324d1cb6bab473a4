//! quota-svc: Reeve's tier quotas behind gRPC (`reeve.quota.v1.QuotaService`).
//!
//! `main.rs` only reads [`Config`] and calls [`start`]; tests call [`start_with_clock`]
//! with a clock they move, so window edges are tested without sleeping.

pub mod events;
pub mod registry;
pub mod rules;
pub mod service;
pub mod store;
pub mod window;

use std::net::SocketAddr;
use std::sync::Arc;

use reeve_proto::quota::v1::quota_service_server::QuotaServiceServer;
use reeve_runtime::auth::{Scope, ScopeTable, ServiceTokens};
use reeve_runtime::config::{self, ConfigError};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::service::QuotaApi;

pub const DEFAULT_QUOTA_ADDR: &str = "127.0.0.1:50052";
pub const SERVICE_NAME: &str = "reeve.quota.v1.QuotaService";

/// Microseconds since the Unix epoch; injected so tests control time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The scope each RPC needs: the only place quota-svc's authorisation is decided
/// (checked by [`reeve_runtime::auth::ScopeGuard`]; a method missing here cannot be
/// called).
pub const METHOD_SCOPES: ScopeTable = &[
    ("CheckQuota", Scope::Quota),
    ("GetUsage", Scope::Quota),
    ("GetTier", Scope::Quota),
    ("Release", Scope::Quota),
    ("SetTier", Scope::Admin),
    ("SetOverride", Scope::Admin),
    ("ClearOverride", Scope::Admin),
];

/// Everything quota-svc needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// `REEVE_DATABASE_URL`: `postgres://…` or `sqlite://…`.
    pub database_url: String,
    /// `REEVE_QUOTA_ADDR`: where to listen.
    pub listen_addr: SocketAddr,
    /// `REEVE_SERVICE_TOKENS`: the bearer tokens accepted from callers.
    pub service_tokens: ServiceTokens,
    /// `REEVE_QUOTA_CONFIG`: a registry file replacing the built-in table.
    pub registry_path: Option<String>,
    /// `REEVE_QUOTA_BATCH_WORKERS`: concurrent group-commit batches (PostgreSQL).
    pub batch_workers: usize,
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
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
        let default_addr = DEFAULT_QUOTA_ADDR
            .parse()
            .map_err(|_| ConfigError::new("REEVE_QUOTA_ADDR", "default address is invalid"))?;
        let listen_addr = config::parse_or("REEVE_QUOTA_ADDR", default_addr)?;
        let service_tokens = ServiceTokens::from_config()?;
        let registry_path = config::var("REEVE_QUOTA_CONFIG")?;
        let batch_workers =
            config::parse_or("REEVE_QUOTA_BATCH_WORKERS", store::DEFAULT_BATCH_WORKERS)?;
        if !(1..=64).contains(&batch_workers) {
            return Err(ConfigError::new(
                "REEVE_QUOTA_BATCH_WORKERS",
                "must be 1 to 64",
            ));
        }
        Ok(Config {
            database_url,
            listen_addr,
            service_tokens,
            registry_path,
            batch_workers,
        })
    }

    /// The registry in force: the file's if one is configured, else the built-in table.
    pub fn registry(&self) -> Result<Registry, ConfigError> {
        match &self.registry_path {
            None => Ok(Registry::default()),
            Some(path) => Registry::load(path)
                .map_err(|e| ConfigError::new("REEVE_QUOTA_CONFIG", e.to_string())),
        }
    }
}

/// A started quota-svc.
pub type RunningServer = reeve_runtime::grpc::GrpcServer;

pub fn system_clock() -> Clock {
    Arc::new(reeve_runtime::clock::now_us)
}

/// Starts quota-svc on the system clock.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<RunningServer> {
    start_with_clock(config, system_clock(), shutdown).await
}

/// Loads the registry (refusing an invalid file), opens the store (running
/// migrations) and serves until `shutdown` is cancelled.
pub async fn start_with_clock(
    config: Config,
    clock: Clock,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningServer> {
    let registry = Arc::new(config.registry()?);
    let store = store::open(&config.database_url, config.batch_workers).await?;
    // The webhook dispatcher of this database's outbox (quota.threshold_reached).
    let outbox = reeve_events::EventStore::open(&config.database_url).await?;
    reeve_events::Dispatcher::new(outbox, reeve_events::DispatcherConfig::default(), {
        let read = Arc::clone(&clock);
        reeve_runtime::clock::Clock::from_fn(move || read())
    })?
    .spawn(shutdown.clone());
    let api = QuotaApi::new(Arc::clone(&store), registry, clock);
    let quota = config
        .service_tokens
        .guard(QuotaServiceServer::new(api), METHOD_SCOPES);
    let server = reeve_runtime::grpc::serve(
        config.listen_addr,
        SERVICE_NAME,
        tonic::service::Routes::new(quota),
        reeve_proto::FILE_DESCRIPTOR_SET,
        &shutdown,
    )
    .await?;
    store.ping().await?;
    let sampled = Arc::clone(&store);
    reeve_runtime::telemetry::sample_pool("quota-svc", shutdown.clone(), move || {
        sampled.pool_stats()
    });
    server.set_serving().await;
    tracing::info!(local_addr = %server.local_addr, "quota-svc serving");
    Ok(server)
}
