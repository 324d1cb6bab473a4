//! Auto top-up storage on both stores: settings and saved cards, the attempts, and the
//! lookup the ledger's outbox folds into its alert lookup (one statement for both,
//! so a deduction pays no extra round trip). Rules live in [`crate::topup`]; this
//! module only loads and persists, each change with its events in one transaction.
//!
//! It must never create an attempt outside the ledger write's transaction (the
//! trigger sees the balance under the user's lock), never leave two attempts in
//! flight for one user (the partial unique index `credit_topup_attempts_one_in_flight`
//! refuses it; inserts are `ON CONFLICT DO NOTHING`), and never credit anything.

use std::collections::HashMap;

use reeve_runtime::Micros;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::{PgConnection, SqliteConnection};

use super::StoreError;
use crate::events::BalanceAlert;
use crate::topup::{
    Attempt, AttemptState, Card, ChargeResult, NewAttempt, Settings, SuspendReason, TriggerState,
    month_start_us, resolve,
};

/// The auto top-up tables of one database.
#[derive(Debug, Clone)]
pub enum TopUpStore {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// A user's auto top-up as `GetAutoTopUp` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopUpView {
    /// `None` until the user set it.
    pub settings: Option<Settings>,
    pub card_saved: bool,
    pub suspended: Option<SuspendReason>,
    pub consecutive_failures: i32,
    pub retry_after_us: i64,
    pub month_used: Micros,
    pub last_attempt: Option<Attempt>,
}

/// The lookup of the outbox: alerts and auto top-up of the users a plan moved.
#[derive(Debug, Default)]
pub(crate) struct Lookup {
    pub alerts: HashMap<String, BalanceAlert>,
    pub topups: HashMap<String, TriggerState>,
}

#[derive(sqlx::FromRow)]
struct LookupRow {
    kind: String,
    user_id: String,
    threshold_micros: Option<i64>,
    armed: Option<bool>,
    amount_micros: Option<i64>,
    monthly_cap_micros: Option<i64>,
    customer_id: Option<String>,
    payment_method_id: Option<String>,
    retry_after_us: Option<i64>,
    month_used_micros: Option<i64>,
    in_flight: Option<bool>,
}

/// The one statement: alert rows, then the top-up rows of users whose auto top-up can
/// fire (enabled, a card, not suspended) with this month's use and whether an
/// attempt is in flight. `{users}` is the store's user filter, `{month}` the first
/// instant of the month (an integer we computed, never input).
const LOOKUP_SQL: &str = "SELECT 'alert' AS kind, user_id, threshold_micros, armed, \
     CAST(NULL AS BIGINT) AS amount_micros, CAST(NULL AS BIGINT) AS monthly_cap_micros, \
     CAST(NULL AS TEXT) AS customer_id, CAST(NULL AS TEXT) AS payment_method_id, \
     CAST(NULL AS BIGINT) AS retry_after_us, CAST(NULL AS BIGINT) AS month_used_micros, \
     CAST(NULL AS BOOLEAN) AS in_flight \
     FROM credit_balance_alerts WHERE user_id {users} \
     UNION ALL \
     SELECT 'topup', t.user_id, t.threshold_micros, CAST(NULL AS BOOLEAN), t.amount_micros, \
     t.monthly_cap_micros, t.customer_id, t.payment_method_id, t.retry_after_us, \
     (SELECT CAST(COALESCE(SUM(x.amount_micros), 0) AS BIGINT) FROM credit_topup_attempts x \
      WHERE x.user_id = t.user_id AND x.state <> 'failed' AND x.created_at_us >= {month}), \
     EXISTS (SELECT 1 FROM credit_topup_attempts x WHERE x.user_id = t.user_id \
      AND x.state IN ('pending', 'processing', 'requires_action')) \
     FROM credit_topup_settings t WHERE t.user_id {users} AND t.enabled \
     AND t.payment_method_id IS NOT NULL AND t.suspended_reason IS NULL";

fn lookup_sql(users_filter: &str, now_us: i64) -> String {
    LOOKUP_SQL
        .replace("{users}", users_filter)
        .replace("{month}", &month_start_us(now_us).to_string())
}

impl Lookup {
    fn add(&mut self, rows: Vec<LookupRow>) {
        for row in rows {
            match row.kind.as_str() {
                "alert" => {
                    if let (Some(threshold), Some(armed)) = (row.threshold_micros, row.armed) {
                        self.alerts.insert(
                            row.user_id,
                            BalanceAlert {
                                threshold: Micros(threshold),
                                armed,
                            },
                        );
                    }
                }
                _ => {
                    let (
                        Some(threshold),
                        Some(amount),
                        Some(cap),
                        Some(customer_id),
                        Some(payment_method_id),
                    ) = (
                        row.threshold_micros,
                        row.amount_micros,
                        row.monthly_cap_micros,
                        row.customer_id,
                        row.payment_method_id,
                    )
                    else {
                        continue;
                    };
                    self.topups.insert(
                        row.user_id,
                        TriggerState {
                            settings: Settings {
                                enabled: true,
                                threshold: Micros(threshold),
                                amount: Micros(amount),
                                monthly_cap: Micros(cap),
                            },
                            card: Some(Card {
                                customer_id,
                                payment_method_id,
                            }),
                            suspended: false,
                            retry_after_us: row.retry_after_us.unwrap_or(0),
                            month_used: Micros(row.month_used_micros.unwrap_or(0)),
                            in_flight: row.in_flight.unwrap_or(false),
                        },
                    );
                }
            }
        }
    }
}

/// The alerts and auto top-ups of `users`, in one statement (PostgreSQL).
pub(crate) async fn lookup_pg(
    conn: &mut PgConnection,
    users: &[&str],
    now_us: i64,
) -> Result<Lookup, StoreError> {
    let mut lookup = Lookup::default();
    let rows: Vec<LookupRow> = sqlx::query_as(&lookup_sql("= ANY($1::text[])", now_us))
        .bind(users)
        .fetch_all(&mut *conn)
        .await?;
    lookup.add(rows);
    Ok(lookup)
}

/// The alerts and auto top-ups of `users`, one statement per 500 users (SQLite).
pub(crate) async fn lookup_sqlite(
    conn: &mut SqliteConnection,
    users: &[&str],
    now_us: i64,
) -> Result<Lookup, StoreError> {
    let mut lookup = Lookup::default();
    for chunk in users.chunks(500) {
        let marks = vec!["?"; chunk.len()].join(", ");
        // The list appears twice in the statement: bound twice.
        let sql = lookup_sql(&format!("IN ({marks})"), now_us);
        let mut query = sqlx::query_as::<_, LookupRow>(&sql);
        for user in chunk.iter().chain(chunk.iter()) {
            query = query.bind(*user);
        }
        lookup.add(query.fetch_all(&mut *conn).await?);
    }
    Ok(lookup)
}

const INSERT_ATTEMPT_SQL: &str = "INSERT INTO credit_topup_attempts \
     (attempt_id, user_id, amount_micros, state, customer_id, payment_method_id, \
      created_at_us, updated_at_us) VALUES ($1, $2, $3, 'pending', $4, $5, $6, $6) \
     ON CONFLICT DO NOTHING";

/// The one body of [`insert_attempts_pg`] and [`insert_attempts_sqlite`] (the same SQL
/// on either connection type).
macro_rules! insert_attempts_on {
    ($conn:expr, $attempts:expr, $now_us:expr) => {{
        for attempt in $attempts {
            sqlx::query(INSERT_ATTEMPT_SQL)
                .bind(crate::topup::new_attempt_id())
                .bind(&attempt.user_id)
                .bind(attempt.amount.0)
                .bind(&attempt.card.customer_id)
                .bind(&attempt.card.payment_method_id)
                .bind($now_us)
                .execute(&mut *$conn)
                .await?;
        }
        Ok(())
    }};
}

/// Creates the attempts a plan triggered, inside its transaction. One already in
/// flight for the user makes the insert a no-op (the partial unique index).
pub(crate) async fn insert_attempts_pg(
    conn: &mut PgConnection,
    attempts: &[NewAttempt],
    now_us: i64,
) -> Result<(), StoreError> {
    insert_attempts_on!(conn, attempts, now_us)
}

/// As [`insert_attempts_pg`], on SQLite.
pub(crate) async fn insert_attempts_sqlite(
    conn: &mut SqliteConnection,
    attempts: &[NewAttempt],
    now_us: i64,
) -> Result<(), StoreError> {
    insert_attempts_on!(conn, attempts, now_us)
}

#[derive(sqlx::FromRow)]
struct SettingsRow {
    enabled: bool,
    threshold_micros: Option<i64>,
    amount_micros: Option<i64>,
    monthly_cap_micros: Option<i64>,
    customer_id: Option<String>,
    payment_method_id: Option<String>,
    consecutive_failures: i32,
    retry_after_us: i64,
    suspended_reason: Option<String>,
}

const SETTINGS_COLUMNS: &str = "enabled, threshold_micros, amount_micros, monthly_cap_micros, \
     customer_id, payment_method_id, consecutive_failures, retry_after_us, suspended_reason";

#[derive(sqlx::FromRow)]
struct AttemptRow {
    attempt_id: String,
    user_id: String,
    amount_micros: i64,
    state: String,
    customer_id: String,
    payment_method_id: String,
    payment_intent_id: Option<String>,
    failure_code: Option<String>,
    action_url: Option<String>,
    lease_until_us: i64,
    claims: i32,
    created_at_us: i64,
}

const ATTEMPT_COLUMNS: &str = "attempt_id, user_id, amount_micros, state, customer_id, \
     payment_method_id, payment_intent_id, failure_code, action_url, lease_until_us, claims, \
     created_at_us";

impl TryFrom<AttemptRow> for Attempt {
    type Error = StoreError;

    fn try_from(row: AttemptRow) -> Result<Attempt, StoreError> {
        let state = AttemptState::parse(&row.state).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "top-up attempt {} has unknown state {:?}",
                row.attempt_id, row.state
            ))
        })?;
        Ok(Attempt {
            attempt_id: row.attempt_id,
            user_id: row.user_id,
            amount: Micros(row.amount_micros),
            state,
            card: Card {
                customer_id: row.customer_id,
                payment_method_id: row.payment_method_id,
            },
            payment_intent_id: row.payment_intent_id,
            failure_code: row.failure_code,
            action_url: row.action_url,
            lease_until_us: row.lease_until_us,
            claims: row.claims,
            created_at_us: row.created_at_us,
        })
    }
}

const MONTH_USED_SQL: &str = "SELECT CAST(COALESCE(SUM(amount_micros), 0) AS BIGINT) \
     FROM credit_topup_attempts WHERE user_id = $1 AND state <> 'failed' AND created_at_us >= $2";

const UPSERT_SETTINGS_SQL: &str = "INSERT INTO credit_topup_settings \
     (user_id, enabled, threshold_micros, amount_micros, monthly_cap_micros, updated_at_us) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (user_id) DO UPDATE SET \
     enabled = excluded.enabled, threshold_micros = excluded.threshold_micros, \
     amount_micros = excluded.amount_micros, monthly_cap_micros = excluded.monthly_cap_micros, \
     updated_at_us = excluded.updated_at_us";

/// The failure code of an attempt withdrawn because its user disabled auto top-up
/// before any worker sent it, or while it waited for the user's action (which could
/// otherwise wait forever, blocking every later attempt).
pub const DISABLED_CODE: &str = "auto_topup_disabled";

/// Withdraws what is not on its way to Stripe: attempts no worker has sent, and those
/// waiting for the user's action (a payment the user completes later still credits
/// them through its webhook, and completes the attempt: see `complete`).
const WITHDRAW_PENDING_SQL: &str = "UPDATE credit_topup_attempts SET state = 'failed', \
     failure_code = $2, updated_at_us = $3 \
     WHERE user_id = $1 AND state IN ('pending', 'requires_action')";

const SAVE_CARD_SQL: &str = "INSERT INTO credit_topup_cards \
     (payment_id, user_id, customer_id, payment_method_id, saved_at_us) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (payment_id) DO NOTHING";

/// A new card is the user's card from now on and lifts a suspension and the back-off.
const USE_CARD_SQL: &str = "INSERT INTO credit_topup_settings \
     (user_id, customer_id, payment_method_id, updated_at_us) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (user_id) DO UPDATE SET customer_id = excluded.customer_id, \
     payment_method_id = excluded.payment_method_id, consecutive_failures = 0, \
     retry_after_us = 0, suspended_reason = NULL, updated_at_us = excluded.updated_at_us";

/// Due attempts: new ones, and claimed ones whose lease ran out, for as long as their
/// request may be sent again under the same Idempotency-Key ($4: the oldest creation
/// time still resent, see [`RESEND_WINDOW_US`]).
const CLAIM_FILTER: &str = "(state = 'pending' OR (state = 'processing' AND lease_until_us <= $1 \
     AND created_at_us >= $4))";

/// How long an attempt without a definite answer from Stripe is sent again. Stripe
/// keeps an Idempotency-Key for at least 24 hours; after that the same request could
/// make a second charge, so an older attempt is never sent again: it stays
/// `processing` (blocking new attempts for its user) until its payment's webhook
/// completes it or a person looks.
pub const RESEND_WINDOW_US: i64 = 12 * 3_600 * 1_000_000;

const RESOLVE_ATTEMPT_SQL: &str = "UPDATE credit_topup_attempts SET state = $3, \
     payment_intent_id = COALESCE($4, payment_intent_id), failure_code = $5, action_url = $6, \
     updated_at_us = $7 WHERE attempt_id = $1 AND state = 'processing' AND claims = $2";

const LIFT_DECLINE_SUSPENSION_SQL: &str = "UPDATE credit_topup_settings \
     SET suspended_reason = NULL, updated_at_us = $3 WHERE user_id = $1 AND suspended_reason = $2";

const SAVE_FAILURES_SQL: &str = "UPDATE credit_topup_settings SET consecutive_failures = $2, \
     retry_after_us = $3, suspended_reason = COALESCE($4, suspended_reason), updated_at_us = $5 \
     WHERE user_id = $1";

/// Saves what a resolution makes of the user's declines (count, back-off, suspension)
/// in the open transaction `$tx`, on either store.
macro_rules! save_failures {
    ($tx:ident, $user_id:expr, $resolution:expr, $now_us:expr) => {
        sqlx::query(SAVE_FAILURES_SQL)
            .bind($user_id)
            .bind($resolution.consecutive_failures)
            .bind($resolution.retry_after_us)
            .bind($resolution.suspend.map(SuspendReason::as_str))
            .bind($now_us)
            .execute(&mut *$tx)
            .await?;
    };
}

/// A payment's webhook answers its attempt (the caller checked, under the row lock,
/// that the attempt is the user's and that this answer applies to its state): succeeded
/// or failed, on this payment intent; a failed attempt's action URL is gone with it.
const ANSWER_ATTEMPT_SQL: &str = "UPDATE credit_topup_attempts SET state = $3, \
     payment_intent_id = $4, failure_code = $5, action_url = NULL, updated_at_us = $6 \
     WHERE attempt_id = $1 AND user_id = $2";

fn view_of(
    row: Option<SettingsRow>,
    month_used: i64,
    last: Option<AttemptRow>,
) -> Result<TopUpView, StoreError> {
    let mut view = TopUpView {
        month_used: Micros(month_used),
        last_attempt: last.map(Attempt::try_from).transpose()?,
        ..TopUpView::default()
    };
    if let Some(row) = row {
        if let (Some(threshold), Some(amount), Some(cap)) = (
            row.threshold_micros,
            row.amount_micros,
            row.monthly_cap_micros,
        ) {
            view.settings = Some(Settings {
                enabled: row.enabled,
                threshold: Micros(threshold),
                amount: Micros(amount),
                monthly_cap: Micros(cap),
            });
        }
        view.card_saved = row.customer_id.is_some() && row.payment_method_id.is_some();
        view.suspended = row
            .suspended_reason
            .as_deref()
            .and_then(SuspendReason::parse);
        view.consecutive_failures = row.consecutive_failures;
        view.retry_after_us = row.retry_after_us;
    }
    Ok(view)
}

/// The bodies shared by both stores: the same SQL on either pool, transactions begun
/// as each store must (`BEGIN IMMEDIATE` on SQLite, so the single writer is taken
/// before anything is read), events through reeve-events' insert of that store.
macro_rules! on_store {
    ($store:expr, |$pool:ident, $begin:ident, $insert:ident, $lock:ident| $body:block) => {
        match $store {
            TopUpStore::Postgres($pool) => {
                #[allow(unused_macros)]
                macro_rules! $begin {
                    () => {
                        $pool.begin()
                    };
                }
                #[allow(unused_imports)]
                use reeve_events::insert_pg as $insert;
                #[allow(unused_variables)]
                let $lock = " FOR UPDATE";
                $body
            }
            TopUpStore::Sqlite($pool) => {
                #[allow(unused_macros)]
                macro_rules! $begin {
                    () => {
                        $pool.begin_with("BEGIN IMMEDIATE")
                    };
                }
                #[allow(unused_imports)]
                use reeve_events::insert_sqlite as $insert;
                #[allow(unused_variables)]
                let $lock = "";
                $body
            }
        }
    };
}

impl TopUpStore {
    /// The user's auto top-up at `now_us` (this month's use counted from the first of
    /// the month, UTC).
    ///
    /// The three reads see one snapshot (a repeatable-read transaction on PostgreSQL,
    /// a read transaction on SQLite): read apart, a decline recorded between them showed
    /// the failed attempt with the failure count from before it.
    pub async fn view(&self, user_id: &str, now_us: i64) -> Result<TopUpView, StoreError> {
        let postgres = matches!(self, TopUpStore::Postgres(_));
        on_store!(self, |pool, begin, insert, lock| {
            // A deferred transaction: on SQLite (WAL) its first read fixes the snapshot
            // and no writer is waited for.
            let mut tx = pool.begin().await?;
            if postgres {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(&mut *tx)
                    .await?;
            }
            let row: Option<SettingsRow> = sqlx::query_as(&format!(
                "SELECT {SETTINGS_COLUMNS} FROM credit_topup_settings WHERE user_id = $1"
            ))
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
            let month_used: i64 = sqlx::query_scalar(MONTH_USED_SQL)
                .bind(user_id)
                .bind(month_start_us(now_us))
                .fetch_one(&mut *tx)
                .await?;
            let last: Option<AttemptRow> = sqlx::query_as(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM credit_topup_attempts WHERE user_id = $1 \
                 ORDER BY created_at_us DESC, attempt_id DESC LIMIT 1"
            ))
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            view_of(row, month_used, last)
        })
    }

    /// Sets the user's settings (the card, failures and suspension stay as they are).
    /// Disabling withdraws, in the same transaction, an attempt no worker has claimed
    /// yet, or one waiting for the user's action: it ends `failed` with
    /// [`DISABLED_CODE`] (never sent, or never completed unless the user pays it
    /// later). One claimed and not answered was sent, or is being sent, before the user
    /// changed their mind: it stays.
    pub async fn set(
        &self,
        user_id: &str,
        settings: &Settings,
        now_us: i64,
    ) -> Result<(), StoreError> {
        on_store!(self, |pool, begin, insert, lock| {
            let mut tx = begin!().await?;
            // The user's balance row first, as every ledger write takes it: a write that
            // read the settings as enabled commits its attempt before this goes on (and
            // the attempt is withdrawn below), or reads them after this commits.
            sqlx::query(&format!(
                "SELECT 1 FROM credit_accounts WHERE user_id = $1{lock}"
            ))
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
            sqlx::query(UPSERT_SETTINGS_SQL)
                .bind(user_id)
                .bind(settings.enabled)
                .bind(settings.threshold.0)
                .bind(settings.amount.0)
                .bind(settings.monthly_cap.0)
                .bind(now_us)
                .execute(&mut *tx)
                .await?;
            if !settings.enabled {
                sqlx::query(WITHDRAW_PENDING_SQL)
                    .bind(user_id)
                    .bind(DISABLED_CODE)
                    .bind(now_us)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// The user's saved card, if any.
    pub async fn card(&self, user_id: &str) -> Result<Option<Card>, StoreError> {
        on_store!(self, |pool, begin, insert, lock| {
            let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT customer_id, payment_method_id FROM credit_topup_settings WHERE user_id = $1",
            )
            .bind(user_id)
            .fetch_optional(pool)
            .await?;
            Ok(match row {
                Some((Some(customer_id), Some(payment_method_id))) => Some(Card {
                    customer_id,
                    payment_method_id,
                }),
                _ => None,
            })
        })
    }

    /// Saves the card a payment (`payment_id`) was made to save, once per payment: a
    /// redelivered webhook changes nothing. A new card lifts a suspension and the
    /// back-off. Whether it was new.
    pub async fn save_card(
        &self,
        user_id: &str,
        payment_id: &str,
        card: &Card,
        now_us: i64,
    ) -> Result<bool, StoreError> {
        on_store!(self, |pool, begin, insert, lock| {
            let mut tx = begin!().await?;
            let fresh = sqlx::query(SAVE_CARD_SQL)
                .bind(payment_id)
                .bind(user_id)
                .bind(&card.customer_id)
                .bind(&card.payment_method_id)
                .bind(now_us)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
            if fresh {
                sqlx::query(USE_CARD_SQL)
                    .bind(user_id)
                    .bind(&card.customer_id)
                    .bind(&card.payment_method_id)
                    .bind(now_us)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(fresh)
        })
    }

    /// Completes an attempt whose payment succeeded (its `payment_intent.succeeded`,
    /// which credited the user): `topup.succeeded`, declines reset, in one
    /// transaction. Whether it was still in flight (a worker may have recorded it), or
    /// failed on this same payment (withdrawn by a disable, or failed after waiting for
    /// the user's action): a payment that succeeded completes its attempt whatever
    /// failure was recorded before, so this month's use counts it.
    pub async fn complete(
        &self,
        attempt_id: &str,
        user_id: &str,
        payment_intent_id: &str,
        now_us: i64,
    ) -> Result<bool, StoreError> {
        let result = ChargeResult::Succeeded {
            payment_intent_id: payment_intent_id.to_owned(),
        };
        self.answer_from_webhook(attempt_id, user_id, &result, now_us)
            .await
    }

    /// A payment's webhook answers its attempt, in one transaction; whether the
    /// attempt was answered now.
    ///
    /// - [`ChargeResult::Succeeded`] ([`TopUpStore::complete`]): see there.
    /// - [`ChargeResult::Declined`] naming the payment intent: its payment failed after
    ///   the worker's answer left the attempt waiting for the user's action
    ///   (authentication failed, or the payment intent was canceled), or before the
    ///   worker recorded any answer. A decline, with its back-off, suspension and
    ///   events; not when the attempt was resolved before, or belongs to another user
    ///   or payment. The worker's own answer to an attempt failed here then records
    ///   nothing (its claim is gone).
    pub async fn answer_from_webhook(
        &self,
        attempt_id: &str,
        user_id: &str,
        result: &ChargeResult,
        now_us: i64,
    ) -> Result<bool, StoreError> {
        let (payment_intent_id, succeeded) = match result {
            ChargeResult::Succeeded { payment_intent_id } => (payment_intent_id.as_str(), true),
            ChargeResult::Declined {
                payment_intent_id: Some(payment_intent_id),
                ..
            } => (payment_intent_id.as_str(), false),
            _ => return Ok(false),
        };
        on_store!(self, |pool, begin, insert, lock| {
            let mut tx = begin!().await?;
            // The settings row first, then the attempt: the order `record` takes them
            // in, so a webhook and the worker answering together never deadlock.
            let failures: Option<(i32, i64)> = sqlx::query_as(&format!(
                "SELECT consecutive_failures, retry_after_us FROM credit_topup_settings \
                 WHERE user_id = $1{lock}"
            ))
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
            let (failures, retry_after_us) = failures.unwrap_or((0, 0));
            let row: Option<AttemptRow> = sqlx::query_as(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM credit_topup_attempts WHERE attempt_id = $1{lock}"
            ))
            .bind(attempt_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(attempt) = row.map(Attempt::try_from).transpose()? else {
                return Ok(false);
            };
            let recorded = attempt
                .payment_intent_id
                .as_deref()
                .filter(|p| !p.is_empty());
            let answers = attempt.user_id == user_id
                && if succeeded {
                    attempt.state.in_flight()
                        || (attempt.state == AttemptState::Failed
                            && recorded == Some(payment_intent_id))
                } else {
                    matches!(
                        attempt.state,
                        AttemptState::RequiresAction | AttemptState::Processing
                    ) && recorded.is_none_or(|p| p == payment_intent_id)
                };
            if !answers {
                return Ok(false);
            }
            let Some(resolution) = resolve(&attempt, failures, retry_after_us, result, now_us)
            else {
                return Ok(false);
            };
            sqlx::query(ANSWER_ATTEMPT_SQL)
                .bind(attempt_id)
                .bind(user_id)
                .bind(resolution.state.as_str())
                .bind(payment_intent_id)
                .bind(resolution.failure_code.as_deref())
                .bind(now_us)
                .execute(&mut *tx)
                .await?;
            save_failures!(tx, user_id, resolution, now_us);
            if succeeded {
                // The card took a payment: the declines that suspended it are reset
                // above, and so is the suspension (a late payment of a failed attempt).
                sqlx::query(LIFT_DECLINE_SUSPENSION_SQL)
                    .bind(user_id)
                    .bind(SuspendReason::CardDeclined.as_str())
                    .bind(now_us)
                    .execute(&mut *tx)
                    .await?;
            }
            insert(&mut tx, &resolution.events, now_us).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Claims up to `limit` attempts due at `now_us` (pending, or processing whose
    /// lease ran out) for `lease_us`; each claimed once at a time across replicas
    /// (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite has one writer).
    pub async fn claim(
        &self,
        now_us: i64,
        lease_us: i64,
        limit: u32,
    ) -> Result<Vec<Attempt>, StoreError> {
        let skip_locked = matches!(self, TopUpStore::Postgres(_));
        let sql = format!(
            "UPDATE credit_topup_attempts SET state = 'processing', lease_until_us = $2, \
             claims = claims + 1, updated_at_us = $1 WHERE attempt_id IN (\
             SELECT attempt_id FROM credit_topup_attempts WHERE {CLAIM_FILTER} \
             ORDER BY lease_until_us, created_at_us LIMIT $3{}) RETURNING {ATTEMPT_COLUMNS}",
            if skip_locked {
                " FOR UPDATE SKIP LOCKED"
            } else {
                ""
            }
        );
        on_store!(self, |pool, begin, insert, lock| {
            let rows: Vec<AttemptRow> = sqlx::query_as(&sql)
                .bind(now_us)
                .bind(now_us.saturating_add(lease_us))
                .bind(i64::from(limit))
                .bind(now_us.saturating_sub(RESEND_WINDOW_US))
                .fetch_all(pool)
                .await?;
            rows.into_iter().map(Attempt::try_from).collect()
        })
    }

    /// Records Stripe's answer to a claimed attempt with its events, in one
    /// transaction; nothing when the attempt is no longer this claim's (completed by
    /// its webhook, or claimed again after the lease ran out) or the answer is
    /// unknown. Whether it was recorded.
    pub async fn record(
        &self,
        attempt: &Attempt,
        result: &ChargeResult,
        now_us: i64,
    ) -> Result<bool, StoreError> {
        on_store!(self, |pool, begin, insert, lock| {
            let mut tx = begin!().await?;
            let failures: Option<(i32, i64)> = sqlx::query_as(&format!(
                "SELECT consecutive_failures, retry_after_us FROM credit_topup_settings \
                 WHERE user_id = $1{lock}"
            ))
            .bind(&attempt.user_id)
            .fetch_optional(&mut *tx)
            .await?;
            let (failures, retry_after_us) = failures.unwrap_or((0, 0));
            let Some(resolution) = resolve(attempt, failures, retry_after_us, result, now_us)
            else {
                return Ok(false);
            };
            let moved = sqlx::query(RESOLVE_ATTEMPT_SQL)
                .bind(&attempt.attempt_id)
                .bind(attempt.claims)
                .bind(resolution.state.as_str())
                .bind(resolution.payment_intent_id.as_deref())
                .bind(resolution.failure_code.as_deref())
                .bind(resolution.action_url.as_deref())
                .bind(now_us)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if moved != 1 {
                return Ok(false);
            }
            save_failures!(tx, &attempt.user_id, resolution, now_us);
            insert(&mut tx, &resolution.events, now_us).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// One attempt by id.
    pub async fn attempt(&self, attempt_id: &str) -> Result<Option<Attempt>, StoreError> {
        on_store!(self, |pool, begin, insert, lock| {
            let row: Option<AttemptRow> = sqlx::query_as(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM credit_topup_attempts WHERE attempt_id = $1"
            ))
            .bind(attempt_id)
            .fetch_optional(pool)
            .await?;
            row.map(Attempt::try_from).transpose()
        })
    }

    /// The user's attempts, oldest first.
    pub async fn attempts(&self, user_id: &str) -> Result<Vec<Attempt>, StoreError> {
        on_store!(self, |pool, begin, insert, lock| {
            let rows: Vec<AttemptRow> = sqlx::query_as(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM credit_topup_attempts WHERE user_id = $1 \
                 ORDER BY created_at_us, attempt_id"
            ))
            .bind(user_id)
            .fetch_all(pool)
            .await?;
            rows.into_iter().map(Attempt::try_from).collect()
        })
    }
}
