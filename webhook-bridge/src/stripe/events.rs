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

/// Outcomes after which a redelivery changes nothing on record.
const FINAL_OUTCOMES_EXCLUDED: &str = "('received', 'failed')";

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
        outcome: &str,
        detail: &str,
        now_us: i64,
    ) -> Result<(), EventStoreError> {
        let processed_at = if outcome == "failed" {
            None
        } else {
            Some(now_us)
        };
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
        outcome: &str,
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
            .bind(outcome)
            .bind(detail)
            .bind(processed_at_us)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// The user who paid with this payment intent or charge, as an earlier event said.
    pub async fn user_of_payment(
        &self,
        payment_intent_id: Option<&str>,
        charge_id: Option<&str>,
    ) -> Result<Option<String>, EventStoreError> {
        let sql = "SELECT user_id FROM stripe_events WHERE user_id IS NOT NULL AND \
                   ((payment_intent_id IS NOT NULL AND payment_intent_id = $1) OR (charge_id IS NOT NULL AND charge_id = $2)) \
                   ORDER BY received_at_us LIMIT 1";
        let user: Option<Option<String>> = on_pool!(self, |pool| sqlx::query_scalar(sql)
            .bind(payment_intent_id)
            .bind(charge_id)
            .fetch_optional(pool)
            .await)?;
        Ok(user.flatten())
    }

    /// Refunds and disputes of this payment stored as needing attention (their user was
    /// not known yet), oldest first.
    pub async fn waiting_for_payment(
        &self,
        payment_intent_id: Option<&str>,
        charge_id: Option<&str>,
    ) -> Result<Vec<StoredEvent>, EventStoreError> {
        let sql = "SELECT event_id, event_type, payload, received_at_us, deliveries, processed_at_us, outcome, detail, user_id \
                   FROM stripe_events WHERE outcome = 'needs_attention' \
                   AND event_type IN ('charge.refunded', 'charge.dispute.created', 'charge.dispute.funds_withdrawn', \
                   'charge.dispute.funds_reinstated') \
                   AND ((payment_intent_id IS NOT NULL AND payment_intent_id = $1) OR (charge_id IS NOT NULL AND charge_id = $2)) \
                   ORDER BY received_at_us";
        let events = on_pool!(self, |pool| sqlx::query_as::<_, StoredEvent>(sql)
            .bind(payment_intent_id)
            .bind(charge_id)
            .fetch_all(pool)
            .await)?;
        Ok(events)
    }

    /// Records the outcome of an event that was waiting (`needs_attention`) and has now
    /// been applied.
    pub async fn resolve(
        &self,
        event_id: &str,
        outcome: &str,
        detail: &str,
        now_us: i64,
    ) -> Result<(), EventStoreError> {
        self.set_outcome(
            event_id,
            outcome,
            detail,
            Some(now_us),
            "= 'needs_attention'",
        )
        .await
    }

    pub async fn get(&self, event_id: &str) -> Result<Option<StoredEvent>, EventStoreError> {
        let sql = "SELECT event_id, event_type, payload, received_at_us, deliveries, processed_at_us, outcome, detail, user_id \
                   FROM stripe_events WHERE event_id = $1";
        let event = on_pool!(self, |pool| sqlx::query_as::<_, StoredEvent>(sql)
            .bind(event_id)
            .fetch_optional(pool)
            .await)?;
        Ok(event)
    }

    /// Events a person should look at (`needs_attention`, `failed`, and payments in
    /// another currency, which were paid but not credited), oldest first.
    pub async fn needing_attention(&self, limit: i64) -> Result<Vec<StoredEvent>, EventStoreError> {
        let sql = "SELECT event_id, event_type, payload, received_at_us, deliveries, processed_at_us, outcome, detail, user_id \
                   FROM stripe_events WHERE outcome IN ('needs_attention', 'failed', 'ignored_currency') ORDER BY received_at_us LIMIT $1";
        let events = on_pool!(self, |pool| sqlx::query_as::<_, StoredEvent>(sql)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        Ok(events)
    }
}
