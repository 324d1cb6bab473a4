//! The bridge's only table: every verified Stripe event, kept for audit with its
//! outcome (`stripe_events`). It never holds balances: money lives in credits-svc.
//!
//! PostgreSQL in production, SQLite for the embedded default; the SQL is the same text
//! for both (`$n` placeholders work in each), so one macro runs it on either pool.

use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    #[error("event store database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event store migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL (expected postgres://… or sqlite:…)")]
    UnsupportedUrl,
}

#[derive(Debug, Clone)]
pub enum EventStore {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs the same query builder on whichever pool the store has.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match $store {
            EventStore::Postgres($pool) => $body,
            EventStore::Sqlite($pool) => $body,
        }
    };
}

/// What the bridge learnt from one event before acting on it.
#[derive(Debug, Clone, Default)]
pub struct Received {
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub payment_intent_id: Option<String>,
    pub charge_id: Option<String>,
    pub user_id: Option<String>,
}

/// One stored event, as audits and tests read it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredEvent {
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub received_at_us: i64,
    pub deliveries: i64,
    pub processed_at_us: Option<i64>,
    pub outcome: String,
    pub detail: String,
    pub user_id: Option<String>,
}

/// What became of an event, stored as text in `stripe_events.outcome` (a CHECK
/// constraint keeps the column to these values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Stored, not acted upon yet (or the process stopped before its outcome).
    Received,
    /// Acting failed for a reason that may pass (a service or the store was down):
    /// retried, by Stripe and by the bridge.
    Failed,
    /// Money went to the user (a payment, a failed refund given back, a won dispute).
    Credited,
    /// Money was taken from the user (a refund, a dispute).
    Debited,
    /// Acted upon, nothing to move (a refund step already debited, a reinstatement of
    /// a dispute never debited, a debit absorbed by the per-payment cap).
    Unchanged,
    /// Nothing to do for this event.
    Ignored,
    /// Another currency than the configured one: paid but not credited.
    IgnoredCurrency,
    /// For a person (or waiting for its payment to arrive).
    NeedsAttention,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Received,
        Outcome::Failed,
        Outcome::Credited,
        Outcome::Debited,
        Outcome::Unchanged,
        Outcome::Ignored,
        Outcome::IgnoredCurrency,
        Outcome::NeedsAttention,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Received => "received",
            Outcome::Failed => "failed",
            Outcome::Credited => "credited",
            Outcome::Debited => "debited",
            Outcome::Unchanged => "unchanged",
            Outcome::Ignored => "ignored",
            Outcome::IgnoredCurrency => "ignored_currency",
            Outcome::NeedsAttention => "needs_attention",
        }
    }

    pub fn parse(text: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == text)
    }

    /// Whether the event is done with: a redelivery does not rewrite it.
    pub fn is_final(self) -> bool {
        !matches!(self, Outcome::Received | Outcome::Failed)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcomes after which a redelivery changes nothing on record.
const FINAL_OUTCOMES_EXCLUDED: &str = "('received', 'failed')";

/// How long an event may stay without a final outcome before the bridge retries it
/// and lists it for attention.
pub const UNFINISHED_AFTER_US: i64 = 60_000_000;

const COLUMNS: &str = "event_id, event_type, payload, received_at_us, deliveries, processed_at_us, outcome, detail, user_id";

impl EventStore {
    /// Opens the store named by `REEVE_DATABASE_URL` and brings its table up to date.
    pub async fn open(url: &str) -> Result<EventStore, EventStoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = reeve_runtime::db::postgres_pool(url, 8).await?;
            let mut migrator = sqlx::migrate!("./migrations/postgres");
            // credits-svc and quota-svc keep their own migrations in the same database.
            migrator.set_ignore_missing(true);
            migrator.run(&pool).await?;
            Ok(EventStore::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let pool = reeve_runtime::db::sqlite_pool(url).await?;
            let mut migrator = sqlx::migrate!("./migrations/sqlite");
            migrator.set_ignore_missing(true);
            migrator.run(&pool).await?;
            Ok(EventStore::Sqlite(pool))
        } else {
            Err(EventStoreError::UnsupportedUrl)
        }
    }

    /// Connections of the pool, for metrics.
    pub fn pool_stats(&self) -> reeve_runtime::telemetry::PoolStats {
        on_pool!(self, |pool| reeve_runtime::telemetry::PoolStats {
            open: pool.size(),
            idle: pool.num_idle()
        })
    }

    pub async fn ping(&self) -> Result<(), EventStoreError> {
        on_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Records a delivery: the first stores the event, later ones count themselves.
    pub async fn record_received(
        &self,
        event: &Received,
        now_us: i64,
    ) -> Result<(), EventStoreError> {
        let sql = "INSERT INTO stripe_events \
                   (event_id, event_type, payload, received_at_us, last_received_at_us, payment_intent_id, charge_id, user_id) \
                   VALUES ($1, $2, $3, $4, $4, $5, $6, $7) \
                   ON CONFLICT (event_id) DO UPDATE SET deliveries = stripe_events.deliveries + 1, \
                   last_received_at_us = excluded.last_received_at_us";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(&event.event_id)
            .bind(&event.event_type)
            .bind(&event.payload)
            .bind(now_us)
            .bind(&event.payment_intent_id)
            .bind(&event.charge_id)
            .bind(&event.user_id)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Records what was done. The first final outcome stays: a redelivery that finds the
    /// work already applied does not rewrite the audit trail; a retryable failure does
    /// not overwrite a final outcome either.
    pub async fn record_outcome(
        &self,
        event_id: &str,
        outcome: Outcome,
        detail: &str,
        now_us: i64,
    ) -> Result<(), EventStoreError> {
        let processed_at = outcome.is_final().then_some(now_us);
        self.set_outcome(
            event_id,
            outcome,
            detail,
            processed_at,
            &format!("IN {FINAL_OUTCOMES_EXCLUDED}"),
        )
        .await
    }

    /// Moves an event to `outcome` if its current outcome matches `from` (an SQL
    /// condition on `outcome`, from the constants of this module only).
    async fn set_outcome(
        &self,
        event_id: &str,
        outcome: Outcome,
        detail: &str,
        processed_at_us: Option<i64>,
        from: &str,
    ) -> Result<(), EventStoreError> {
        let sql = format!(
            "UPDATE stripe_events SET outcome = $2, detail = $3, processed_at_us = $4 \
             WHERE event_id = $1 AND outcome {from}"
        );
        on_pool!(self, |pool| sqlx::query(&sql)
            .bind(event_id)
            .bind(outcome.as_str())
            .bind(detail)
            .bind(processed_at_us)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// The payment intent of a charge, as an earlier event of Stripe's said (a
    /// dispute often names only its charge).
    pub async fn payment_intent_of_charge(
        &self,
        charge_id: &str,
    ) -> Result<Option<String>, EventStoreError> {
        let sql = "SELECT payment_intent_id FROM stripe_events \
                   WHERE charge_id = $1 AND payment_intent_id IS NOT NULL \
                   ORDER BY received_at_us LIMIT 1";
        let payment: Option<Option<String>> = on_pool!(self, |pool| sqlx::query_scalar(sql)
            .bind(charge_id)
            .fetch_optional(pool)
            .await)?;
        Ok(payment.flatten())
    }

    /// Refunds and disputes of this payment stored as needing attention (their user was
    /// not known yet), oldest first.
    pub async fn waiting_for_payment(
        &self,
        payment_intent_id: Option<&str>,
        charge_id: Option<&str>,
    ) -> Result<Vec<StoredEvent>, EventStoreError> {
        let followers = crate::stripe::interpret::PAYMENT_FOLLOWERS
            .map(|t| format!("'{t}'"))
            .join(", ");
        let sql = format!(
            "SELECT {COLUMNS} FROM stripe_events WHERE outcome = 'needs_attention' \
             AND event_type IN ({followers}) \
             AND ((payment_intent_id IS NOT NULL AND payment_intent_id = $1) OR (charge_id IS NOT NULL AND charge_id = $2)) \
             ORDER BY received_at_us"
        );
        let events = on_pool!(self, |pool| sqlx::query_as::<_, StoredEvent>(&sql)
            .bind(payment_intent_id)
            .bind(charge_id)
            .fetch_all(pool)
            .await)?;
        Ok(events)
    }

    /// Records the outcome of an event that was waiting (`needs_attention`) and has now
    /// been applied. Concurrent deliveries of its payment each apply it: one moves the
    /// money and the others find nothing left to apply (a refund carries no fixed key,
    /// see credits-svc's payments rules). Whichever records first, the outcome that
    /// moved money stays: it may replace `unchanged`, never the reverse.
    pub async fn resolve(
        &self,
        event_id: &str,
        outcome: Outcome,
        detail: &str,
        now_us: i64,
    ) -> Result<(), EventStoreError> {
        let from = match outcome {
            Outcome::Credited | Outcome::Debited => "IN ('needs_attention', 'unchanged')",
            _ => "= 'needs_attention'",
        };
        self.set_outcome(event_id, outcome, detail, Some(now_us), from)
            .await
    }

    pub async fn get(&self, event_id: &str) -> Result<Option<StoredEvent>, EventStoreError> {
        let sql = format!("SELECT {COLUMNS} FROM stripe_events WHERE event_id = $1");
        let event = on_pool!(self, |pool| sqlx::query_as::<_, StoredEvent>(&sql)
            .bind(event_id)
            .fetch_optional(pool)
            .await)?;
        Ok(event)
    }

    /// Events a person should look at, oldest first: `needs_attention`, `failed`,
    /// payments in another currency (paid but not credited), and events still
    /// `received` a minute after their last delivery (the bridge stopped before their
    /// outcome; its retry task takes them up again).
    pub async fn needing_attention(&self, limit: i64) -> Result<Vec<StoredEvent>, EventStoreError> {
        let stuck_before_us = reeve_runtime::clock::now_us().saturating_sub(UNFINISHED_AFTER_US);
        let sql = format!(
            "SELECT {COLUMNS} FROM stripe_events \
             WHERE outcome IN ('needs_attention', 'failed', 'ignored_currency') \
             OR (outcome = 'received' AND last_received_at_us < $2) \
             ORDER BY received_at_us LIMIT $1"
        );
        let events = on_pool!(self, |pool| sqlx::query_as::<_, StoredEvent>(&sql)
            .bind(limit)
            .bind(stuck_before_us)
            .fetch_all(pool)
            .await)?;
        Ok(events)
    }

    /// Events without a final outcome (`received` or `failed`) whose last delivery was
    /// before `before_us`, oldest first: what the retry task acts upon again.
    pub async fn unfinished(
        &self,
        before_us: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, EventStoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM stripe_events \
             WHERE outcome IN {FINAL_OUTCOMES_EXCLUDED} AND last_received_at_us < $1 \
             ORDER BY received_at_us LIMIT $2"
        );
        let events = on_pool!(self, |pool| sqlx::query_as::<_, StoredEvent>(&sql)
            .bind(before_us)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        Ok(events)
    }
}
