//! reeve-events: everything that leaves Reeve as a webhook.
//!
//! A service that emits events writes them with [`insert_pg`] / [`insert_sqlite`]
//! inside the transaction that makes the change they tell of, so a crash can neither
//! lose an event nor invent one. The [`Dispatcher`] (any number of replicas) fans each
//! event out to the enabled endpoints whose filter it matches, signs it per Standard
//! Webhooks, sends it only to the endpoint's registered URL (no redirects, with
//! timeouts), logs every attempt and retries on the [`schedule`] for more than a day.
//! Delivery is at least once: a retry carries the same `webhook-id` (the event id), so
//! a receiver dedupes on it.
//!
//! This crate owns the tables of its migrations (versions 4xxx); it never reads a
//! service's own tables, and a service never reads these except through this crate.

pub mod dispatch;
pub mod event;
pub mod schedule;
pub mod signing;
pub mod store;

pub use dispatch::{Dispatcher, DispatcherConfig};
pub use event::{NewEvent, insert_pg, insert_sqlite};
pub use store::{AttemptRecord, Endpoint, EventStore, NewEndpoint, RetryOutcome, StoredEvent};

/// The one error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid endpoint URL: {0}")]
    InvalidUrl(String),
    #[error("invalid event type filter: {0}")]
    InvalidEventType(String),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("HTTP client: {0}")]
    Client(String),
}
