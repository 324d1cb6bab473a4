//! credits-svc: Reeve's prepaid-credits ledger behind gRPC (`reeve.credits.v1.CreditService`).
//!
//! `main.rs` only reads [`Config`] and calls [`start`]; tests call [`start`] too, on
//! port 0, so they run exactly what production runs.

pub mod checkout;
pub mod error;
pub mod events;
pub mod group_commit;
pub mod holds;
pub mod ledger;
pub mod lots;
pub mod payments;
pub mod service;
pub mod store;
pub mod sweep;
pub mod topup;
pub mod topup_worker;

use std::net::SocketAddr;
use std::sync::Arc;

use reeve_proto::credits::v1::credit_service_server::CreditServiceServer;
use reeve_runtime::auth::{Scope, ScopeTable, ServiceTokens};
use reeve_runtime::config::{self, ConfigError};
use tokio_util::sync::CancellationToken;

use crate::group_commit::{GroupCommit, HoldCommit};
use crate::service::CreditsApi;

pub const DEFAULT_DATABASE_URL: &str = "sqlite://reeve-data/reeve.db";
pub const DEFAULT_CREDITS_ADDR: &str = "127.0.0.1:50051";
/// The gRPC service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "reeve.credits.v1.CreditService";
/// Largest gRPC message accepted: a full batch with long descriptions fits.
const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// The scope each RPC needs: the only place credits-svc's authorisation is decided
/// (checked by [`reeve_runtime::auth::ScopeGuard`]; a method missing here cannot be
/// called).
pub const METHOD_SCOPES: ScopeTable = &[
    ("GetBalance", Scope::Deduct),
    ("GetBalances", Scope::Deduct),
    ("Deduct", Scope::Deduct),
    ("DeductBatch", Scope::Deduct),
    ("History", Scope::Deduct),
    ("AddCredits", Scope::Admin),
    ("Adjust", Scope::Admin),
    ("Purchase", Scope::Stripe),
    ("RecordPaymentEvent", Scope::Stripe),
    ("ListLots", Scope::Deduct),
    ("RevokeLot", Scope::Admin),
    ("Hold", Scope::Deduct),
    ("SettleHold", Scope::Deduct),
    ("SettleHoldBatch", Scope::Deduct),
    ("ReleaseHold", Scope::Deduct),
    ("ExtendHold", Scope::Deduct),
    ("GetHold", Scope::Deduct),
    ("ListHolds", Scope::Deduct),
    ("ListPaymentEntries", Scope::Stripe),
    ("SetBalanceAlert", Scope::Admin),
    // The bridge, for the signed-in user (like Purchase).
    ("GetAutoTopUp", Scope::Stripe),
    ("SetAutoTopUp", Scope::Stripe),
];

/// Everything credits-svc needs to start. `Debug` hides the database URL's password.
#[derive(Clone)]
pub struct Config {
    /// `REEVE_DATABASE_URL`: `postgres://…` or `sqlite://…`.
    pub database_url: String,
    /// `REEVE_CREDITS_ADDR`: where to listen.
    pub listen_addr: SocketAddr,
    /// `REEVE_SERVICE_TOKENS`: the bearer tokens accepted from callers.
    pub service_tokens: ServiceTokens,
    /// `REEVE_DEDUCT_WORKERS`: concurrent group-commit transactions (default: 4 on
    /// PostgreSQL, 1 on SQLite, whose writers are serialised anyway).
    pub deduct_workers: Option<usize>,
    /// `STRIPE_SECRET_KEY` and the purchase settings; `None` disables `Purchase`.
    pub checkout: Option<checkout::CheckoutConfig>,
    /// `REEVE_LOT_SWEEP_SECS`: how often expired lots get their `expiration` entries
    /// (default 60; expiry itself is exact whatever this is: reads and writes treat a
    /// lot as gone from its instant).
    pub lot_sweep_interval: std::time::Duration,
    /// The time the service reads (the system clock outside tests).
    pub clock: reeve_runtime::clock::Clock,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field(
                "database_url",
                &reeve_runtime::db::redacted_url(&self.database_url),
            )
            .field("listen_addr", &self.listen_addr)
            .field("service_tokens", &self.service_tokens)
            .field("deduct_workers", &self.deduct_workers)
            .field("checkout", &self.checkout)
            .field("lot_sweep_interval", &self.lot_sweep_interval)
            .field("clock", &self.clock)
            .finish()
    }
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        let database_url =
            config::var("REEVE_DATABASE_URL")?.unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        if !(database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://")
            || database_url.starts_with("sqlite:"))
        {
            return Err(ConfigError::new(
                "REEVE_DATABASE_URL",
                "must start with postgres://, postgresql:// or sqlite:",
            ));
        }
        let listen_addr = config::parse_or(
            "REEVE_CREDITS_ADDR",
            DEFAULT_CREDITS_ADDR.parse().map_err(|_| {
                ConfigError::new("REEVE_CREDITS_ADDR", "default address is invalid")
            })?,
        )?;
        let service_tokens = ServiceTokens::from_config()?;
        let deduct_workers = match config::var("REEVE_DEDUCT_WORKERS")? {
            None => None,
            Some(_) => Some(config::parse_or("REEVE_DEDUCT_WORKERS", 0usize)?)
                .filter(|n| (1..=64).contains(n))
                .map(Some)
                .ok_or_else(|| ConfigError::new("REEVE_DEDUCT_WORKERS", "must be 1 to 64"))?,
        };
        let checkout = checkout::CheckoutConfig::from_env()?;
        let sweep_secs = config::parse_or("REEVE_LOT_SWEEP_SECS", 60u64)?;
        if !(1..=86_400).contains(&sweep_secs) {
            return Err(ConfigError::new(
                "REEVE_LOT_SWEEP_SECS",
                "must be 1 to 86400 seconds",
            ));
        }
        Ok(Config {
            database_url,
            listen_addr,
            service_tokens,
            deduct_workers,
            checkout,
            lot_sweep_interval: std::time::Duration::from_secs(sweep_secs),
            clock: reeve_runtime::clock::Clock::system(),
        })
    }
}

/// Microseconds since the Unix epoch.
pub fn system_clock_us() -> i64 {
    reeve_runtime::clock::now_us()
}

/// A started credits-svc.
pub type RunningServer = reeve_runtime::grpc::GrpcServer;

/// Opens the store (running migrations), binds the listener and serves until
/// `shutdown` is cancelled. Health turns SERVING once the store has answered.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<RunningServer> {
    let store = store::open(&config.database_url).await?;
    let is_sqlite = config.database_url.starts_with("sqlite:");
    let workers = config
        .deduct_workers
        .unwrap_or(if is_sqlite { 1 } else { 4 });
    let deductions =
        GroupCommit::start_deductions(Arc::clone(&store), workers, 1_000, config.clock.clone());
    let holds = HoldCommit::start_holds(Arc::clone(&store), workers, 1_000, config.clock.clone());
    let checkout = checkout::Checkout::new(config.checkout.clone())?;
    // Auto top-up charges saved cards through the same Stripe account as purchases; a
    // server without one leaves attempts to a replica that has it.
    if let Some(stripe) = &config.checkout {
        let poll_ms = config::parse_or(
            "REEVE_TOPUP_POLL_MS",
            u64::try_from(topup_worker::DEFAULT_POLL.as_millis()).unwrap_or(500),
        )?;
        if !(10..=60_000).contains(&poll_ms) {
            return Err(ConfigError::new(
                "REEVE_TOPUP_POLL_MS",
                "must be 10 to 60000 milliseconds",
            )
            .into());
        }
        topup_worker::TopUpWorker::new(store.topups(), stripe, config.clock.clone())?
            .spawn(std::time::Duration::from_millis(poll_ms), shutdown.clone());
    }
    let api = CreditsApi::new(
        Arc::clone(&store),
        deductions,
        holds,
        checkout,
        config.clock.clone(),
    );
    sweep::spawn(
        Arc::clone(&store),
        config.clock.clone(),
        config.lot_sweep_interval,
        shutdown.clone(),
    );
    // Outbound events: lot.expiring warnings N days ahead (`REEVE_LOT_EXPIRING_DAYS`,
    // default 7) and the webhook dispatcher of this database's outbox.
    let expiring_days = config::parse_or("REEVE_LOT_EXPIRING_DAYS", 7u64)?;
    sweep::spawn_expiring_warnings(
        Arc::clone(&store),
        config.clock.clone(),
        config.lot_sweep_interval,
        std::time::Duration::from_secs(expiring_days.saturating_mul(86_400)),
        shutdown.clone(),
    );
    reeve_events::Dispatcher::new(
        store.events(),
        reeve_events::DispatcherConfig::default(),
        config.clock.clone(),
    )?
    .spawn(shutdown.clone());
    let credits = CreditServiceServer::new(api)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let credits = config.service_tokens.guard(credits, METHOD_SCOPES);
    let server = reeve_runtime::grpc::serve(
        config.listen_addr,
        SERVICE_NAME,
        tonic::service::Routes::new(credits),
        reeve_proto::FILE_DESCRIPTOR_SET,
        &shutdown,
    )
    .await?;
    store.ping().await?;
    let sampled = Arc::clone(&store);
    reeve_runtime::telemetry::sample_pool("credits-svc", shutdown.clone(), move || {
        sampled.pool_stats()
    });
    server.set_serving().await;
    tracing::info!(local_addr = %server.local_addr, store = if is_sqlite { "sqlite" } else { "postgres" }, "credits-svc serving");
    Ok(server)
}
