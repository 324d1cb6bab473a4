//! The ledger's outbox writes, on both stores: after a plan is persisted, the events
//! [`crate::events`] derives from it go into reeve-events' outbox in the same
//! transaction, with the low-balance alerts they fire or re-arm; and the sweeper's
//! `lot.expiring` warnings, once per lot. The only extra statement on the write path is
//! the lookup of the users whose available balance moved: their low-balance alerts and
//! their auto top-up in one statement (primary-key probes of tables that have a row
//! only for users who set one; see [`super::topup`]); events, and the auto top-up
//! attempts the plan triggers ([`crate::topup::trigger`]), are inserted only when there
//! are any.

use std::collections::HashMap;

use reeve_runtime::Micros;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::{PgConnection, SqliteConnection};

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::events;
use crate::ledger::Plan;

/// Applies reeve-events' outbox migrations (4xxx) beside the ledger's.
pub(crate) async fn migrate_pg(pool: &PgPool) -> Result<(), StoreError> {
    reeve_events::store::migrate_pg(pool)
        .await
        .map_err(events_error)
}

/// Applies reeve-events' outbox migrations (4xxx) beside the ledger's.
pub(crate) async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), StoreError> {
    reeve_events::store::migrate_sqlite(pool)
        .await
        .map_err(events_error)
}

fn events_error(error: reeve_events::EventsError) -> StoreError {
    match error {
        reeve_events::EventsError::Database(error) => StoreError::from(error),
        reeve_events::EventsError::Migrate(error) => StoreError::from(error),
        other => StoreError::Corrupt(other.to_string()),
    }
}

/// Writes the events of `plan` (persisted in the same open transaction).
pub(crate) async fn emit_pg(
    conn: &mut PgConnection,
    plan: &Plan,
    balances: &HashMap<String, Micros>,
    lots: &[Lot],
    now_us: i64,
) -> Result<(), StoreError> {
    let moves = events::available_moves(plan, balances, lots);
    let mut lookup = super::topup::Lookup::default();
    if !moves.is_empty() {
        let users: Vec<&str> = moves.keys().map(String::as_str).collect();
        lookup = super::topup::lookup_pg(&mut *conn, &users, now_us).await?;
    }
    let alerts = lookup.alerts;
    let emitted = events::derive(plan, lots, &moves, &alerts);
    let attempts = crate::topup::attempts_for(plan, &moves, &lookup.topups, now_us);
    super::topup::insert_attempts_pg(&mut *conn, &attempts, now_us).await?;
    reeve_events::insert_pg(&mut *conn, &emitted.events, now_us).await?;
    if !emitted.alerts.is_empty() {
        // Every alert whose armed state changes, in one statement (a batch crossing
        // many users' thresholds is one round trip, not one per user).
        let (users, armed): (Vec<&str>, Vec<bool>) = emitted
            .alerts
            .iter()
            .map(|(user, armed)| (user.as_str(), *armed))
            .unzip();
        sqlx::query(
            "UPDATE credit_balance_alerts AS a SET armed = c.armed \
             FROM UNNEST($1::text[], $2::bool[]) AS c(user_id, armed) WHERE a.user_id = c.user_id",
        )
        .bind(&users)
        .bind(&armed)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Writes the events of `plan` (persisted in the same open transaction).
pub(crate) async fn emit_sqlite(
    conn: &mut SqliteConnection,
    plan: &Plan,
    balances: &HashMap<String, Micros>,
    lots: &[Lot],
    now_us: i64,
) -> Result<(), StoreError> {
    let moves = events::available_moves(plan, balances, lots);
    let users: Vec<&str> = moves.keys().map(String::as_str).collect();
    let lookup = super::topup::lookup_sqlite(&mut *conn, &users, now_us).await?;
    let alerts = lookup.alerts;
    let emitted = events::derive(plan, lots, &moves, &alerts);
    let attempts = crate::topup::attempts_for(plan, &moves, &lookup.topups, now_us);
    super::topup::insert_attempts_sqlite(&mut *conn, &attempts, now_us).await?;
    reeve_events::insert_sqlite(conn, &emitted.events, now_us).await?;
    for (user, armed) in &emitted.alerts {
        sqlx::query("UPDATE credit_balance_alerts SET armed = $2 WHERE user_id = $1")
            .bind(user)
            .bind(armed)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

const SET_ALERT_SQL: &str = "INSERT INTO credit_balance_alerts (user_id, threshold_micros, armed, updated_at_us) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (user_id) DO UPDATE \
     SET threshold_micros = excluded.threshold_micros, armed = excluded.armed, \
     updated_at_us = excluded.updated_at_us";

/// The one body of [`set_alert_pg`] and [`set_alert_sqlite`] (the same SQL on either
/// pool type).
macro_rules! set_alert_on {
    ($pool:expr, $user_id:expr, $threshold:expr, $now_us:expr) => {{
        match $threshold {
            Some(threshold) => {
                sqlx::query(SET_ALERT_SQL)
                    .bind($user_id)
                    .bind(threshold.0)
                    .bind(true)
                    .bind($now_us)
                    .execute($pool)
                    .await?;
            }
            None => {
                sqlx::query("DELETE FROM credit_balance_alerts WHERE user_id = $1")
                    .bind($user_id)
                    .execute($pool)
                    .await?;
            }
        }
        Ok(())
    }};
}

/// Sets (armed) or, with `None`, removes a user's low-balance threshold.
pub(crate) async fn set_alert_pg(
    pool: &PgPool,
    user_id: &str,
    threshold: Option<Micros>,
    now_us: i64,
) -> Result<(), StoreError> {
    set_alert_on!(pool, user_id, threshold, now_us)
}

/// Sets (armed) or, with `None`, removes a user's low-balance threshold.
pub(crate) async fn set_alert_sqlite(
    pool: &SqlitePool,
    user_id: &str,
    threshold: Option<Micros>,
    now_us: i64,
) -> Result<(), StoreError> {
    set_alert_on!(pool, user_id, threshold, now_us)
}

const EXPIRING_SQL: &str = "SELECT id, user_id, category, priority, expires_at_us, source, original_micros, \
     remaining_micros, created_at_us, held_micros, expired_micros FROM credit_lots l \
     WHERE remaining_micros > 0 AND live AND expires_at_us > $1 AND expires_at_us <= $2 \
     AND NOT EXISTS (SELECT 1 FROM credit_lot_warnings w WHERE w.lot_id = l.id) \
     ORDER BY expires_at_us LIMIT $3";

const WARNED_SQL: &str = "INSERT INTO credit_lot_warnings (lot_id, warned_at_us) VALUES ($1, $2) \
     ON CONFLICT (lot_id) DO NOTHING";

/// `lot.expiring` for up to `limit` lots expiring within `ahead_us`, each once (a lot
/// another sweeper warned of first is skipped); the number warned of.
pub(crate) async fn warn_expiring_pg(
    pool: &PgPool,
    now_us: i64,
    ahead_us: i64,
    limit: u32,
) -> Result<usize, StoreError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<LotRow> = sqlx::query_as(EXPIRING_SQL)
        .bind(now_us)
        .bind(now_us.saturating_add(ahead_us))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
    let mut events = Vec::new();
    for lot in lots_of(rows)? {
        let fresh = sqlx::query(WARNED_SQL)
            .bind(lot.id)
            .bind(now_us)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if fresh == 1 {
            events.push(events::lot_expiring(&lot));
        }
    }
    reeve_events::insert_pg(&mut tx, &events, now_us).await?;
    tx.commit().await?;
    Ok(events.len())
}

/// `lot.expiring` for up to `limit` lots expiring within `ahead_us`, each once.
pub(crate) async fn warn_expiring_sqlite(
    pool: &SqlitePool,
    now_us: i64,
    ahead_us: i64,
    limit: u32,
) -> Result<usize, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let rows: Vec<LotRow> = sqlx::query_as(EXPIRING_SQL)
        .bind(now_us)
        .bind(now_us.saturating_add(ahead_us))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
    let mut events = Vec::new();
    for lot in lots_of(rows)? {
        sqlx::query(WARNED_SQL)
            .bind(lot.id)
            .bind(now_us)
            .execute(&mut *tx)
            .await?;
        events.push(events::lot_expiring(&lot));
    }
    reeve_events::insert_sqlite(&mut tx, &events, now_us).await?;
    tx.commit().await?;
    Ok(events.len())
}
