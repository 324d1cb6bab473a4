//! Where quota-svc keeps tiers, overrides and consumed units: PostgreSQL in production
//! ([`postgres`]), SQLite as the embedded default ([`sqlite`]), behind one trait,
//! [`QuotaStore`]. What both run alike is written once in [`queries`]; what a consume
//! decides is [`crate::rules`], never restated here.
//!
//! Schema choice: one row per consume (`quota_consumptions`: units, time, its
//! idempotency key, whether released) plus one counter row per user and feature
//! (`quota_counters.used`: the units of the rows still present and not released).
//! A check never sums the window: it reads the counter and subtracts only the rows
//! that have expired since the last consume (an index range of, usually, nothing).
//! Each consume prunes the expired rows of its user and feature and moves the
//! counter in the same transaction, under the counter row's lock — that lock is what
//! makes check-and-consume atomic across any number of replicas. So an
//! `api_requests`-like feature with 50,000 units in a window costs the same per check
//! as a feature with 3. A key is remembered while its units count (in the window, not
//! released): see [`crate::rules`].

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::registry::Limit;

mod error;
#[macro_use]
mod queries;
pub mod postgres;
pub mod sqlite;

pub use crate::rules::Consumed;
pub use error::StoreError;
pub use postgres::{DEFAULT_BATCH_WORKERS, PgQuotaStore};
pub use sqlite::SqliteQuotaStore;

/// Units counted in the window for one user and feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub used: i64,
    /// Consume time of the oldest counted unit.
    pub oldest_us: Option<i64>,
}

/// What a check needs to know of a user, read at once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckContext {
    /// `None` for a user never given a tier.
    pub tier: Option<String>,
    pub override_limit: Option<Limit>,
    /// Zero unless asked for.
    pub usage: Usage,
}

/// One check-and-consume: resolve the user's limit for the feature (their override, or
/// their tier's entry of `tier_limits`), then record `units` under `key` if they fit in
/// the window that starts after `cutoff_us`.
#[derive(Debug, Clone, Copy)]
pub struct Consume<'a> {
    pub user_id: &'a str,
    pub feature: &'a str,
    pub key: &'a str,
    pub units: i64,
    /// The feature's limit in each tier, in [`crate::registry::TIERS`] order.
    pub tier_limits: [Limit; 3],
    pub now_us: i64,
    pub cutoff_us: i64,
}

/// What a check-and-consume found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    Done {
        consumed: Consumed,
        usage: Usage,
        tier: String,
        limit: Limit,
    },
    /// The user's stored tier is not one the registry knows: nothing was recorded.
    UnknownTier(String),
}

#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    async fn ping(&self) -> Result<(), StoreError>;
    /// Connections of the pool, for metrics.
    fn pool_stats(&self) -> reeve_runtime::telemetry::PoolStats;
    async fn tier(&self, user_id: &str) -> Result<Option<String>, StoreError>;
    /// Sets the tier and answers the previous one.
    async fn set_tier(
        &self,
        user_id: &str,
        tier: &str,
        now_us: i64,
    ) -> Result<Option<String>, StoreError>;
    async fn overrides(&self, user_id: &str) -> Result<HashMap<String, Limit>, StoreError>;
    async fn set_override(
        &self,
        user_id: &str,
        feature: &str,
        limit: Limit,
        now_us: i64,
    ) -> Result<(), StoreError>;
    async fn clear_override(&self, user_id: &str, feature: &str) -> Result<bool, StoreError>;
    /// Every feature the user has counted units of, at `cutoff_us`.
    async fn usage(
        &self,
        user_id: &str,
        cutoff_us: i64,
    ) -> Result<HashMap<String, Usage>, StoreError>;
    /// Resolves the user's limit, then atomically counts the window and records the
    /// units under the key if they fit ([`crate::rules::plan_consume`]).
    async fn consume(&self, request: &Consume<'_>) -> Result<Checked, StoreError>;
    /// The user's tier and override for `feature` and, with a cutoff, the feature's
    /// live usage: everything a check needs, in one round trip.
    async fn check_context(
        &self,
        user_id: &str,
        feature: &str,
        cutoff_us: Option<i64>,
    ) -> Result<CheckContext, StoreError>;
    /// Gives back the units recorded under `key` if they still count at `cutoff_us`
    /// ([`crate::rules::plan_release`]); `None` if there is nothing to give back.
    async fn release(
        &self,
        user_id: &str,
        feature: &str,
        key: &str,
        cutoff_us: i64,
    ) -> Result<Option<i64>, StoreError>;
}

/// Opens the store named by `REEVE_DATABASE_URL` and brings its schema up to date.
/// `batch_workers` is the number of concurrent batches of the PostgreSQL group commits
/// (consumes, and questions); SQLite has none.
pub async fn open(url: &str, batch_workers: usize) -> Result<Arc<dyn QuotaStore>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgQuotaStore::open(url, batch_workers).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteQuotaStore::open(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}
