//! The outbox's tables on PostgreSQL or SQLite: endpoints (with their secrets),
//! deliveries and the attempt log, and the dispatcher's three steps (fan out, claim,
//! record). SQL is written once with `$n` placeholders for both databases; only the
//! row locks differ (`FOR UPDATE SKIP LOCKED` on PostgreSQL, SQLite's single writer).
//!
//! A claimed delivery is leased, not locked for the length of an HTTP request: the
//! claim moves its next attempt past the lease, so a dispatcher that dies mid-send
//! leaves it to be sent again, with the same `webhook-id`, when the lease runs out.

use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

use crate::EventsError;
use crate::event::{NewEvent, insert_pg, insert_sqlite, new_id};
use crate::schedule::retry_delay_us;
use crate::signing::generate_secret;

/// Where the outbox lives: the pool of the service (or CLI) that uses it.
#[derive(Debug, Clone)]
pub enum EventStore {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to the PostgreSQL or the SQLite pool.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match $store {
            EventStore::Postgres($pool) => $body,
            EventStore::Sqlite($pool) => $body,
        }
    };
}

/// Opens a write transaction the way each database needs it.
trait WritePool {
    type Db: sqlx::Database;
    /// Appended to a SELECT that claims rows.
    const SKIP_LOCKED: &'static str;
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>;
}

impl WritePool for PgPool {
    type Db = sqlx::Postgres;
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.begin().await
    }
}

impl WritePool for SqlitePool {
    type Db = sqlx::Sqlite;
    const SKIP_LOCKED: &'static str = "";
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

fn lock_of<P: WritePool>(_: &P) -> &'static str {
    P::SKIP_LOCKED
}

/// The statements of [`EventStore::record`] in an open transaction; evaluates to
/// whether the endpoint was disabled by it.
macro_rules! record_in {
    ($tx:expr, $claimed:expr, $result:expr, $status:expr, $next_at:expr, $now_us:expr, $disable_after_us:expr) => {{
        let tx = $tx;
        let claimed: &Claimed = $claimed;
        let result: &AttemptResult = $result;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at_us, outcome, \
             status_code, error, latency_ms, response_excerpt) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (delivery_id, attempt) DO NOTHING",
        )
        .bind(&claimed.delivery_id)
        .bind(claimed.attempt)
        .bind($now_us)
        .bind(if result.succeeded { "succeeded" } else { "failed" })
        .bind(result.status_code)
        .bind(result.error.as_deref())
        .bind(result.latency_ms)
        .bind(&result.response_excerpt)
        .execute(&mut **tx)
        .await?;
        let moved = sqlx::query(
            "UPDATE webhook_deliveries SET status = $3, next_attempt_at_us = $4 \
             WHERE delivery_id = $1 AND attempts = $2 AND status = 'pending'",
        )
        .bind(&claimed.delivery_id)
        .bind(claimed.attempt)
        .bind($status)
        .bind($next_at)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        let mut disabled = false;
        if moved == 1 && result.succeeded {
            sqlx::query("UPDATE webhook_endpoints SET failing_since_us = NULL WHERE endpoint_id = $1")
                .bind(&claimed.endpoint_id)
                .execute(&mut **tx)
                .await?;
        } else if moved == 1 {
            sqlx::query(
                "UPDATE webhook_endpoints SET failing_since_us = COALESCE(failing_since_us, $2) \
                 WHERE endpoint_id = $1",
            )
            .bind(&claimed.endpoint_id)
            .bind($now_us)
            .execute(&mut **tx)
            .await?;
            disabled = sqlx::query(
                "UPDATE webhook_endpoints SET status = 'disabled', \
                 disabled_reason = 'failing since ' || failing_since_us || ' us' \
                 WHERE endpoint_id = $1 AND status = 'enabled' AND failing_since_us <= $2",
            )
            .bind(&claimed.endpoint_id)
            .bind($now_us.saturating_sub($disable_after_us))
            .execute(&mut **tx)
            .await?
            .rows_affected()
                == 1;
        }
        disabled
    }};
}

/// A registered endpoint, as listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub id: String,
    pub url: String,
    /// Event types it receives; empty: all.
    pub events: Vec<String>,
    /// `enabled` or `disabled`.
    pub status: String,
    pub disabled_reason: Option<String>,
    pub created_at_us: i64,
}

/// An endpoint just added, with the secret shown this once.
#[derive(Clone, Serialize)]
pub struct NewEndpoint {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
}

impl std::fmt::Debug for NewEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewEndpoint")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

/// One logged attempt, with its delivery's event and endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptRecord {
    pub delivery_id: String,
    pub event_id: String,
    pub event_type: String,
    pub endpoint_id: String,
    pub attempt: i64,
    /// `succeeded` or `failed`.
    pub outcome: String,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub latency_ms: i64,
    pub response_excerpt: String,
    pub attempted_at_us: i64,
    /// The delivery's state now: `pending`, `succeeded`, `failed`, `cancelled`.
    pub delivery_status: String,
}

type AttemptRow = (
    String,
    String,
    String,
    String,
    i64,
    String,
    Option<i64>,
    Option<String>,
    i64,
    String,
    i64,
    String,
);

/// An event as stored in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    pub seq: i64,
    pub id: String,
    pub event_type: String,
    pub user_id: Option<String>,
    /// The JSON body endpoints receive.
    pub body: serde_json::Value,
}

/// What a manual redelivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Due now.
    Scheduled,
    NotFound,
}

/// A delivery claimed by a dispatcher, with what it needs to send it.
#[derive(Clone)]
pub struct Claimed {
    pub delivery_id: String,
    pub event_id: String,
    pub endpoint_id: String,
    /// This attempt's number (1-based).
    pub attempt: i64,
    pub payload: String,
    pub url: String,
    /// The secrets to sign with: the current one, then a rotated-out one still live.
    pub secrets: Vec<String>,
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("delivery_id", &self.delivery_id)
            .field("event_id", &self.event_id)
            .field("endpoint_id", &self.endpoint_id)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// What one attempt gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    pub succeeded: bool,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub latency_ms: i64,
    pub response_excerpt: String,
}

/// The event an endpoint's disabling writes.
pub const ENDPOINT_DISABLED: &str = "endpoint.disabled";

fn split_types(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

fn matches(filter: &str, event_type: &str) -> bool {
    filter.is_empty() || filter.split(',').any(|t| t == event_type)
}

/// An endpoint URL: absolute http(s) with a host, no credentials, no fragment.
pub fn check_url(url: &str) -> Result<(), EventsError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|error| EventsError::InvalidUrl(error.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(EventsError::InvalidUrl("must be http or https".into()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(EventsError::InvalidUrl("must name a host".into()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(EventsError::InvalidUrl("must not carry credentials".into()));
    }
    if parsed.fragment().is_some() {
        return Err(EventsError::InvalidUrl("must not have a fragment".into()));
    }
    Ok(())
}

/// An event type filter entry: `word.word` of lowercase letters, digits and `_`.
pub fn check_event_type(event_type: &str) -> Result<(), EventsError> {
    let valid = event_type.len() <= 100
        && event_type.split('.').count() >= 2
        && event_type.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(EventsError::InvalidEventType(event_type.to_owned()))
    }
}

/// Applies the outbox migrations (4xxx) to a PostgreSQL database shared with others.
pub async fn migrate_pg(pool: &PgPool) -> Result<(), EventsError> {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// Applies the outbox migrations (4xxx) to a SQLite database shared with others.
pub async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), EventsError> {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

impl EventStore {
    /// Opens `url` (`postgres://…` or `sqlite:…`) and applies the outbox migrations.
    pub async fn open(url: &str) -> Result<EventStore, EventsError> {
        if url.starts_with("sqlite:") {
            let pool = reeve_runtime::db::sqlite_pool(url).await?;
            migrate_sqlite(&pool).await?;
            Ok(EventStore::Sqlite(pool))
        } else {
            let pool = reeve_runtime::db::postgres_pool(url, 4).await?;
            migrate_pg(&pool).await?;
            Ok(EventStore::Postgres(pool))
        }
    }

    /// Writes `events` in a transaction of their own (jobs with nothing else to write).
    pub async fn insert(&self, events: &[NewEvent], now_us: i64) -> Result<(), EventsError> {
        match self {
            EventStore::Postgres(pool) => {
                let mut tx = pool.write_tx().await?;
                insert_pg(&mut tx, events, now_us).await?;
                tx.commit().await?;
            }
            EventStore::Sqlite(pool) => {
                let mut tx = pool.write_tx().await?;
                insert_sqlite(&mut tx, events, now_us).await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Registers an endpoint with a new secret; `events` empty means every type.
    pub async fn add_endpoint(
        &self,
        url: &str,
        events: &[String],
        now_us: i64,
    ) -> Result<NewEndpoint, EventsError> {
        check_url(url)?;
        for event_type in events {
            check_event_type(event_type)?;
        }
        let mut events = events.to_vec();
        events.sort();
        events.dedup();
        let endpoint = NewEndpoint {
            id: new_id("ep_"),
            url: url.to_owned(),
            events,
            secret: generate_secret(),
        };
        let filter = endpoint.events.join(",");
        on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO webhook_endpoints (endpoint_id, url, secret, event_types, created_at_us) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&endpoint.id)
            .bind(&endpoint.url)
            .bind(&endpoint.secret)
            .bind(&filter)
            .bind(now_us)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        Ok(endpoint)
    }

    /// Every endpoint, oldest first.
    pub async fn endpoints(&self) -> Result<Vec<Endpoint>, EventsError> {
        let rows: Vec<(String, String, String, String, Option<String>, i64)> =
            on_pool!(self, |pool| {
                sqlx::query_as(
                    "SELECT endpoint_id, url, event_types, status, disabled_reason, created_at_us \
                     FROM webhook_endpoints ORDER BY created_at_us, endpoint_id",
                )
                .fetch_all(pool)
                .await
            })?;
        Ok(rows
            .into_iter()
            .map(
                |(id, url, types, status, disabled_reason, created_at_us)| Endpoint {
                    id,
                    url,
                    events: split_types(&types),
                    status,
                    disabled_reason,
                    created_at_us,
                },
            )
            .collect())
    }

    /// Removes an endpoint; its pending deliveries are cancelled (the log stays).
    /// `false` when there was none.
    pub async fn remove_endpoint(&self, endpoint_id: &str) -> Result<bool, EventsError> {
        let removed = on_pool!(self, |pool| {
            let mut tx = pool.write_tx().await?;
            let removed = sqlx::query("DELETE FROM webhook_endpoints WHERE endpoint_id = $1")
                .bind(endpoint_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(
                "UPDATE webhook_deliveries SET status = 'cancelled' \
                 WHERE endpoint_id = $1 AND status = 'pending'",
            )
            .bind(endpoint_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(removed)
        })?;
        Ok(removed == 1)
    }

    /// Gives an endpoint a new secret; the old one keeps signing for `overlap_us`, so
    /// a receiver can switch without dropping a message. `None`: no such endpoint.
    pub async fn rotate_secret(
        &self,
        endpoint_id: &str,
        overlap_us: i64,
        now_us: i64,
    ) -> Result<Option<String>, EventsError> {
        let secret = generate_secret();
        let changed = on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE webhook_endpoints SET previous_secret = secret, \
                 previous_secret_until_us = $3, secret = $2 WHERE endpoint_id = $1",
            )
            .bind(endpoint_id)
            .bind(&secret)
            .bind(now_us.saturating_add(overlap_us))
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })?;
        Ok((changed == 1).then_some(secret))
    }

    /// Enables a disabled endpoint again (its failure clock restarts); on one already
    /// enabled it changes nothing (a failing endpoint keeps its clock, so enabling it
    /// cannot put off its disabling).
    pub async fn enable_endpoint(&self, endpoint_id: &str) -> Result<bool, EventsError> {
        let changed = on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE webhook_endpoints SET status = 'enabled', disabled_reason = NULL, \
                 failing_since_us = CASE WHEN status = 'enabled' THEN failing_since_us END \
                 WHERE endpoint_id = $1",
            )
            .bind(endpoint_id)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })?;
        Ok(changed == 1)
    }

    /// The attempt log, newest first: of one endpoint, and only failed attempts, on
    /// demand.
    pub async fn attempts(
        &self,
        endpoint_id: Option<&str>,
        failed_only: bool,
        limit: i64,
    ) -> Result<Vec<AttemptRecord>, EventsError> {
        let mut sql = String::from(
            "SELECT a.delivery_id, d.event_id, e.event_type, d.endpoint_id, a.attempt, a.outcome, \
             a.status_code, a.error, a.latency_ms, a.response_excerpt, a.attempted_at_us, d.status \
             FROM webhook_attempts a \
             JOIN webhook_deliveries d ON d.delivery_id = a.delivery_id \
             JOIN outbox_events e ON e.event_id = d.event_id WHERE 1 = 1",
        );
        if endpoint_id.is_some() {
            sql.push_str(" AND d.endpoint_id = $2");
        }
        if failed_only {
            sql.push_str(" AND a.outcome = 'failed'");
        }
        sql.push_str(" ORDER BY a.attempted_at_us DESC, a.delivery_id, a.attempt DESC LIMIT $1");
        let rows: Vec<AttemptRow> = on_pool!(self, |pool| {
            let mut query = sqlx::query_as(&sql).bind(limit);
            if let Some(endpoint_id) = endpoint_id {
                query = query.bind(endpoint_id);
            }
            query.fetch_all(pool).await
        })?;
        Ok(rows
            .into_iter()
            .map(
                |(
                    delivery_id,
                    event_id,
                    event_type,
                    endpoint_id,
                    attempt,
                    outcome,
                    status_code,
                    error,
                    latency_ms,
                    response_excerpt,
                    attempted_at_us,
                    delivery_status,
                )| AttemptRecord {
                    delivery_id,
                    event_id,
                    event_type,
                    endpoint_id,
                    attempt,
                    outcome,
                    status_code,
                    error,
                    latency_ms,
                    response_excerpt,
                    attempted_at_us,
                    delivery_status,
                },
            )
            .collect())
    }

    /// Redelivers a delivery by hand: due now, whatever its state and past attempts
    /// (a waiting retry is brought forward; one being sent may go twice, with the same
    /// `webhook-id`).
    pub async fn retry(&self, delivery_id: &str, now_us: i64) -> Result<RetryOutcome, EventsError> {
        let changed = on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at_us = $2 \
                 WHERE delivery_id = $1",
            )
            .bind(delivery_id)
            .bind(now_us)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })?;
        Ok(if changed == 1 {
            RetryOutcome::Scheduled
        } else {
            RetryOutcome::NotFound
        })
    }

    /// Events in the outbox after `after_seq`, oldest first: (seq, event id, type,
    /// user, JSON body).
    pub async fn outbox(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, EventsError> {
        let rows: Vec<(i64, String, String, Option<String>, String)> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT seq, event_id, event_type, user_id, payload FROM outbox_events \
                 WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(after_seq)
            .bind(limit)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows
            .into_iter()
            .map(|(seq, id, event_type, user_id, payload)| StoredEvent {
                seq,
                id,
                event_type,
                user_id,
                body: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
            })
            .collect())
    }

    /// Makes the deliveries of up to `limit` events not yet fanned out, one per enabled
    /// endpoint whose filter matches; the number of events handled.
    pub async fn fan_out(&self, now_us: i64, limit: i64) -> Result<usize, EventsError> {
        // A read first: an idle outbox never takes SQLite's write lock.
        let waiting: Option<i64> = on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT seq FROM outbox_events WHERE fanned_out_at_us IS NULL LIMIT 1",
            )
            .fetch_optional(pool)
            .await
        })?;
        if waiting.is_none() {
            return Ok(0);
        }
        let handled = on_pool!(self, |pool| {
            let mut tx = pool.write_tx().await?;
            let events: Vec<(i64, String, String)> = sqlx::query_as(&format!(
                "SELECT seq, event_id, event_type FROM outbox_events \
                 WHERE fanned_out_at_us IS NULL ORDER BY seq LIMIT $1{}",
                lock_of(pool)
            ))
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            if events.is_empty() {
                tx.rollback().await?;
                return Ok(0);
            }
            let endpoints: Vec<(String, String)> = sqlx::query_as(
                "SELECT endpoint_id, event_types FROM webhook_endpoints WHERE status = 'enabled'",
            )
            .fetch_all(&mut *tx)
            .await?;
            for (seq, event_id, event_type) in &events {
                for (endpoint_id, filter) in &endpoints {
                    if matches(filter, event_type) {
                        sqlx::query(
                            "INSERT INTO webhook_deliveries \
                             (delivery_id, event_id, endpoint_id, status, next_attempt_at_us, created_at_us) \
                             VALUES ($1, $2, $3, 'pending', $4, $4) \
                             ON CONFLICT (event_id, endpoint_id) DO NOTHING",
                        )
                        .bind(new_id("dlv_"))
                        .bind(event_id)
                        .bind(endpoint_id)
                        .bind(now_us)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                sqlx::query("UPDATE outbox_events SET fanned_out_at_us = $2 WHERE seq = $1")
                    .bind(seq)
                    .bind(now_us)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(events.len())
        })?;
        Ok(handled)
    }

    /// Claims up to `limit` due deliveries for `lease_us` and loads what sending them
    /// needs. A delivery whose endpoint is gone or disabled is cancelled instead.
    pub async fn claim(
        &self,
        now_us: i64,
        lease_us: i64,
        limit: i64,
    ) -> Result<Vec<Claimed>, EventsError> {
        type Row = (
            String,
            String,
            String,
            i64,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<String>,
        );
        let due: Option<String> = on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT delivery_id FROM webhook_deliveries \
                 WHERE status = 'pending' AND next_attempt_at_us <= $1 LIMIT 1",
            )
            .bind(now_us)
            .fetch_optional(pool)
            .await
        })?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        let rows: Vec<Row> = on_pool!(self, |pool| {
            let mut tx = pool.write_tx().await?;
            let claimed: Vec<String> = sqlx::query_scalar(&format!(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at_us = $2 \
                 WHERE delivery_id IN (SELECT delivery_id FROM webhook_deliveries \
                 WHERE status = 'pending' AND next_attempt_at_us <= $1 \
                 ORDER BY next_attempt_at_us LIMIT $3{}) RETURNING delivery_id",
                lock_of(pool)
            ))
            .bind(now_us)
            .bind(now_us.saturating_add(lease_us))
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            let mut rows = Vec::with_capacity(claimed.len());
            for delivery_id in &claimed {
                let row: Option<Row> = sqlx::query_as(
                    "SELECT d.delivery_id, d.event_id, d.endpoint_id, d.attempts, e.payload, \
                     p.url, p.secret, p.previous_secret, p.previous_secret_until_us, p.status \
                     FROM webhook_deliveries d JOIN outbox_events e ON e.event_id = d.event_id \
                     LEFT JOIN webhook_endpoints p ON p.endpoint_id = d.endpoint_id \
                     WHERE d.delivery_id = $1",
                )
                .bind(delivery_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else { continue };
                if row.9.as_deref() != Some("enabled") {
                    sqlx::query(
                        "UPDATE webhook_deliveries SET status = 'cancelled' WHERE delivery_id = $1",
                    )
                    .bind(delivery_id)
                    .execute(&mut *tx)
                    .await?;
                    continue;
                }
                rows.push(row);
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(rows)
        })?;
        Ok(rows
            .into_iter()
            .filter_map(
                |(
                    delivery_id,
                    event_id,
                    endpoint_id,
                    attempt,
                    payload,
                    url,
                    secret,
                    previous,
                    until,
                    _,
                )| {
                    let mut secrets = vec![secret?];
                    if let (Some(previous), Some(until)) = (previous, until)
                        && until > now_us
                    {
                        secrets.push(previous);
                    }
                    Some(Claimed {
                        delivery_id,
                        event_id,
                        endpoint_id,
                        attempt,
                        payload,
                        url: url?,
                        secrets,
                    })
                },
            )
            .collect())
    }

    /// Logs an attempt and moves its delivery on: done, due again after the
    /// [`schedule`](crate::schedule), or failed for good. A failing endpoint that has
    /// not succeeded for `disable_after_us` is disabled, with an `endpoint.disabled`
    /// event in the same transaction. A stale claim (its lease ran out and another
    /// dispatcher took the delivery over) logs its attempt and moves nothing.
    pub async fn record(
        &self,
        claimed: &Claimed,
        result: &AttemptResult,
        now_us: i64,
        disable_after_us: i64,
    ) -> Result<(), EventsError> {
        let (status, next_at) = if result.succeeded {
            ("succeeded", now_us)
        } else {
            match retry_delay_us(claimed.attempt) {
                Some(delay) => ("pending", now_us.saturating_add(delay)),
                None => ("failed", now_us),
            }
        };
        let disabled_event = NewEvent::new(
            ENDPOINT_DISABLED,
            None,
            serde_json::json!({
                "endpoint_id": claimed.endpoint_id,
                "url": claimed.url,
                "reason": "failing_too_long",
                "failing_for_secs": disable_after_us / 1_000_000,
            }),
        );
        match self {
            EventStore::Postgres(pool) => {
                let mut tx = pool.write_tx().await?;
                let disabled = record_in!(
                    &mut tx,
                    claimed,
                    result,
                    status,
                    next_at,
                    now_us,
                    disable_after_us
                );
                if disabled {
                    insert_pg(&mut tx, std::slice::from_ref(&disabled_event), now_us).await?;
                }
                tx.commit().await?;
            }
            EventStore::Sqlite(pool) => {
                let mut tx = pool.write_tx().await?;
                let disabled = record_in!(
                    &mut tx,
                    claimed,
                    result,
                    status,
                    next_at,
                    now_us,
                    disable_after_us
                );
                if disabled {
                    insert_sqlite(&mut tx, std::slice::from_ref(&disabled_event), now_us).await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }
}
