//! Auto top-up rules, without I/O: when a ledger write must create a top-up attempt,
//! what an attempt's Stripe answer makes of it (back-off, suspension, events), and
//! which settings are acceptable.
//!
//! - An attempt is due when a write lowers a user's available balance (balance − held)
//!   to below their threshold, auto top-up is enabled with a saved card, not suspended,
//!   past its back-off, with no attempt in flight, and this calendar month's (UTC)
//!   top-ups that succeeded or are in flight plus the amount stay within the cap.
//! - A decline backs off [`BACKOFF_US`]; [`SUSPEND_AFTER_DECLINES`] in a row suspend
//!   auto top-up until a new card is saved. A success or a new card resets the count.
//! - `requires_action` waits: the attempt stays in flight (counting toward the cap and
//!   blocking a second one) until the user completes it and Stripe's
//!   `payment_intent.succeeded` arrives, its payment fails or is canceled (the
//!   webhook's `TOPUP_FAILED`: a decline), or the user turns auto top-up off (which
//!   withdraws it). Paid later anyway, a withdrawn or failed attempt is completed then.
//!
//! This module must never read a clock, call Stripe or touch storage, and never
//! credit anything: credits arrive only through the payment webhook (a purchase keyed
//! by the payment intent). The stores (crate::store::topup) load the state under the
//! locks and persist what these functions return in the same transaction.

use reeve_events::NewEvent;
use reeve_runtime::Micros;
use reeve_runtime::money::MICROS_PER_CREDIT;
use serde_json::json;

use crate::ledger::InvalidWrite;

pub const TOPUP_SUCCEEDED: &str = "topup.succeeded";
pub const TOPUP_FAILED: &str = "topup.failed";
pub const TOPUP_REQUIRES_ACTION: &str = "topup.requires_action";
pub const TOPUP_SUSPENDED: &str = "topup.suspended";

/// How long after a decline no attempt is made: one hour.
pub const BACKOFF_US: i64 = 3_600 * 1_000_000;
/// Declines in a row that suspend auto top-up until a new card is saved.
pub const SUSPEND_AFTER_DECLINES: i32 = 3;
/// Bounds of the settings, in whole credits.
pub const MAX_THRESHOLD_CREDITS: i64 = 1_000_000_000;
/// Stripe takes at most 999,999.99 USD in one payment.
pub const MAX_AMOUNT_CREDITS: i64 = crate::checkout::MAX_PURCHASE_CREDITS;
pub const MAX_MONTHLY_CAP_CREDITS: i64 = 1_000_000_000;
/// The metadata key of a top-up PaymentIntent naming its attempt (the user is under
/// `user_id`, where the bridge reads every payment's user).
pub const ATTEMPT_METADATA_KEY: &str = "reeve_topup_attempt_id";
/// Prefix of attempt ids (which are also Stripe Idempotency-Keys).
pub const ATTEMPT_ID_PREFIX: &str = "topup_";

/// Where an attempt is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptState {
    /// Created by a ledger write; no worker has it yet.
    Pending,
    /// A worker claimed it and is (or was, if its lease ran out) talking to Stripe.
    Processing,
    /// Stripe needs the customer to authenticate; waits for them.
    RequiresAction,
    /// Stripe took the payment; the credits come with its webhook.
    Succeeded,
    /// Stripe refused the payment.
    Failed,
}

impl AttemptState {
    pub const IN_FLIGHT: [AttemptState; 3] = [
        AttemptState::Pending,
        AttemptState::Processing,
        AttemptState::RequiresAction,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptState::Pending => "pending",
            AttemptState::Processing => "processing",
            AttemptState::RequiresAction => "requires_action",
            AttemptState::Succeeded => "succeeded",
            AttemptState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<AttemptState> {
        [
            AttemptState::Pending,
            AttemptState::Processing,
            AttemptState::RequiresAction,
            AttemptState::Succeeded,
            AttemptState::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    pub fn in_flight(self) -> bool {
        AttemptState::IN_FLIGHT.contains(&self)
    }
}

/// Why auto top-up is suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendReason {
    /// [`SUSPEND_AFTER_DECLINES`] declines in a row.
    CardDeclined,
}

impl SuspendReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuspendReason::CardDeclined => "card_declined",
        }
    }

    pub fn parse(text: &str) -> Option<SuspendReason> {
        (text == "card_declined").then_some(SuspendReason::CardDeclined)
    }
}

/// A saved card: the Stripe customer and payment method charged off-session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    pub customer_id: String,
    pub payment_method_id: String,
}

/// Settings as the user set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    pub threshold: Micros,
    pub amount: Micros,
    pub monthly_cap: Micros,
}

impl Settings {
    /// Checks settings given in micros (whole credits within bounds), naming the field.
    pub fn validate(
        enabled: bool,
        threshold_micros: i64,
        amount_micros: i64,
        monthly_cap_micros: i64,
    ) -> Result<Settings, InvalidWrite> {
        let whole = |micros: i64, max_credits: i64, code: &'static str, name: &str| {
            if micros <= 0
                || micros % MICROS_PER_CREDIT != 0
                || micros / MICROS_PER_CREDIT > max_credits
            {
                return Err(InvalidWrite::new(
                    code,
                    format!("{name} must be a whole number of credits from 1 to {max_credits}"),
                ));
            }
            Ok(Micros(micros))
        };
        Ok(Settings {
            enabled,
            threshold: whole(
                threshold_micros,
                MAX_THRESHOLD_CREDITS,
                "invalid_threshold",
                "threshold",
            )?,
            amount: whole(
                amount_micros,
                MAX_AMOUNT_CREDITS,
                "invalid_topup_amount",
                "amount",
            )?,
            monthly_cap: whole(
                monthly_cap_micros,
                MAX_MONTHLY_CAP_CREDITS,
                "invalid_monthly_cap",
                "monthly_cap",
            )?,
        })
    }
}

/// What a ledger write needs to know of a user's auto top-up (one row of the
/// outbox's lookup, loaded under the user's balance lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerState {
    pub settings: Settings,
    pub card: Option<Card>,
    pub suspended: bool,
    pub retry_after_us: i64,
    /// This calendar month's attempts that succeeded or are in flight.
    pub month_used: Micros,
    /// An attempt is pending, processing or waiting for the customer.
    pub in_flight: bool,
}

/// A new attempt to create in the write's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAttempt {
    pub user_id: String,
    pub amount: Micros,
    pub card: Card,
}

/// The attempt a write that moves `user_id`'s available balance from `before` to
/// `after` (micros) must create, if any.
pub fn trigger(
    user_id: &str,
    state: &TriggerState,
    before: i64,
    after: i64,
    now_us: i64,
) -> Option<NewAttempt> {
    let settings = &state.settings;
    let card = state.card.as_ref()?;
    let lowered_below = after < before && after < settings.threshold.0;
    let within_cap = state
        .month_used
        .0
        .checked_add(settings.amount.0)
        .is_some_and(|total| total <= settings.monthly_cap.0);
    (settings.enabled
        && lowered_below
        && !state.suspended
        && !state.in_flight
        && now_us >= state.retry_after_us
        && within_cap)
        .then(|| NewAttempt {
            user_id: user_id.to_owned(),
            amount: settings.amount,
            card: card.clone(),
        })
}

/// The attempts a plan creates: one per user whose available balance it moved from
/// `before` to `after` (see [`crate::events::available_moves`]) when [`trigger`] says so.
/// Money Stripe takes back (a refund or a dispute, the only debits keyed in Stripe's
/// namespace) never charges the card again: a refunded top-up would be bought back at
/// once, and a disputed card charged while its owner disputes it.
pub fn attempts_for(
    plan: &crate::ledger::Plan,
    moves: &std::collections::BTreeMap<String, (i64, i64)>,
    states: &std::collections::HashMap<String, TriggerState>,
    now_us: i64,
) -> Vec<NewAttempt> {
    let taken_back: std::collections::HashSet<&str> = plan
        .inserts
        .iter()
        .filter(|entry| {
            entry.write.key_source == crate::ledger::KeySource::Stripe && entry.write.amount.0 < 0
        })
        .map(|entry| entry.write.user_id.as_str())
        .collect();
    moves
        .iter()
        .filter(|(user, _)| !taken_back.contains(user.as_str()))
        .filter_map(|(user, &(before, after))| {
            trigger(user, states.get(user)?, before, after, now_us)
        })
        .collect()
}

/// The first instant of the calendar month (UTC) of `now_us`, in microseconds.
pub fn month_start_us(now_us: i64) -> i64 {
    const DAY_US: i64 = 86_400 * 1_000_000;
    let days = now_us.div_euclid(DAY_US);
    let (year, month, _) = civil_from_days(days);
    days_from_civil(year, month, 1) * DAY_US
}

/// (year, month 1–12, day 1–31) of a count of days since 1970-01-01 (Howard
/// Hinnant's algorithm for the proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One attempt as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub attempt_id: String,
    pub user_id: String,
    pub amount: Micros,
    pub state: AttemptState,
    pub card: Card,
    pub payment_intent_id: Option<String>,
    pub failure_code: Option<String>,
    pub action_url: Option<String>,
    pub lease_until_us: i64,
    /// How many times a worker claimed it: a worker records its result only while the
    /// attempt still carries the count it claimed with.
    pub claims: i32,
    pub created_at_us: i64,
}

/// What Stripe answered an attempt's PaymentIntent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeResult {
    Succeeded {
        payment_intent_id: String,
    },
    RequiresAction {
        payment_intent_id: String,
        action_url: Option<String>,
    },
    /// A card error or another definite refusal (4xx): nothing was charged.
    Declined {
        code: String,
        message: String,
        payment_intent_id: Option<String>,
    },
    /// No definite answer (network, timeout, 5xx, 409 in progress): the attempt stays
    /// claimed and is sent again, with the same key, once its lease runs out.
    Unknown(String),
}

/// What to persist after an attempt's answer, in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub state: AttemptState,
    pub payment_intent_id: Option<String>,
    pub failure_code: Option<String>,
    pub action_url: Option<String>,
    /// The user's declines in a row after this answer.
    pub consecutive_failures: i32,
    /// The user's back-off: no attempt before this instant.
    pub retry_after_us: i64,
    /// Suspend auto top-up.
    pub suspend: Option<SuspendReason>,
    pub events: Vec<NewEvent>,
}

fn attempt_data(attempt: &Attempt) -> serde_json::Value {
    json!({
        "user_id": attempt.user_id,
        "attempt_id": attempt.attempt_id,
        "amount": attempt.amount.to_string(),
        "amount_micros": attempt.amount.0,
    })
}

/// What `result` makes of `attempt` for a user with `failures_before` declines in a
/// row and back-off `retry_after_us`; `None` when the answer is unknown (nothing
/// changes).
pub fn resolve(
    attempt: &Attempt,
    failures_before: i32,
    retry_after_us: i64,
    result: &ChargeResult,
    now_us: i64,
) -> Option<Resolution> {
    let mut data = attempt_data(attempt);
    let user = Some(attempt.user_id.as_str());
    let resolution = match result {
        ChargeResult::Unknown(_) => return None,
        ChargeResult::Succeeded { payment_intent_id } => {
            data["payment_intent_id"] = json!(payment_intent_id);
            Resolution {
                state: AttemptState::Succeeded,
                payment_intent_id: Some(payment_intent_id.clone()),
                failure_code: None,
                action_url: None,
                consecutive_failures: 0,
                retry_after_us,
                suspend: None,
                events: vec![NewEvent::new(TOPUP_SUCCEEDED, user, data)],
            }
        }
        ChargeResult::RequiresAction {
            payment_intent_id,
            action_url,
        } => {
            data["payment_intent_id"] = json!(payment_intent_id);
            data["action_url"] = json!(action_url);
            Resolution {
                state: AttemptState::RequiresAction,
                payment_intent_id: Some(payment_intent_id.clone()),
                failure_code: None,
                action_url: action_url.clone(),
                consecutive_failures: failures_before,
                retry_after_us,
                suspend: None,
                events: vec![NewEvent::new(TOPUP_REQUIRES_ACTION, user, data)],
            }
        }
        ChargeResult::Declined {
            code,
            message,
            payment_intent_id,
        } => {
            let failures = failures_before.saturating_add(1);
            let retry_after_us = now_us.saturating_add(BACKOFF_US);
            data["payment_intent_id"] = json!(payment_intent_id);
            data["failure_code"] = json!(code);
            data["failure_message"] = json!(message);
            data["consecutive_failures"] = json!(failures);
            data["retry_after_us"] = json!(retry_after_us);
            let mut events = vec![NewEvent::new(TOPUP_FAILED, user, data)];
            let suspend =
                (failures >= SUSPEND_AFTER_DECLINES).then_some(SuspendReason::CardDeclined);
            if let Some(reason) = suspend {
                events.push(NewEvent::new(
                    TOPUP_SUSPENDED,
                    user,
                    json!({
                        "user_id": attempt.user_id,
                        "reason": reason.as_str(),
                        "consecutive_failures": failures,
                        "last_attempt_id": attempt.attempt_id,
                    }),
                ));
            }
            Resolution {
                state: AttemptState::Failed,
                payment_intent_id: payment_intent_id.clone(),
                failure_code: Some(code.clone()),
                action_url: None,
                consecutive_failures: failures,
                retry_after_us,
                suspend,
                events,
            }
        }
    };
    Some(resolution)
}

/// A new attempt id (also its Stripe Idempotency-Key).
pub fn new_attempt_id() -> String {
    reeve_events::event::new_id(ATTEMPT_ID_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDIT: i64 = MICROS_PER_CREDIT;

    fn card() -> Card {
        Card {
            customer_id: "cus_1".into(),
            payment_method_id: "pm_1".into(),
        }
    }

    fn state() -> TriggerState {
        TriggerState {
            settings: Settings {
                enabled: true,
                threshold: Micros(10 * CREDIT),
                amount: Micros(25 * CREDIT),
                monthly_cap: Micros(100 * CREDIT),
            },
            card: Some(card()),
            suspended: false,
            retry_after_us: 0,
            month_used: Micros::ZERO,
            in_flight: false,
        }
    }

    #[test]
    fn the_trigger_table() {
        let now = 1_000;
        let below = (11 * CREDIT, 9 * CREDIT);
        let cases: Vec<(&str, TriggerState, (i64, i64), bool)> = vec![
            ("crossing below", state(), below, true),
            (
                "already below and lower",
                state(),
                (9 * CREDIT, 8 * CREDIT),
                true,
            ),
            (
                "at the threshold is not below",
                state(),
                (11 * CREDIT, 10 * CREDIT),
                false,
            ),
            ("above", state(), (30 * CREDIT, 20 * CREDIT), false),
            (
                "a credit that leaves it below",
                state(),
                (5 * CREDIT, 6 * CREDIT),
                false,
            ),
            (
                "disabled",
                TriggerState {
                    settings: Settings {
                        enabled: false,
                        ..state().settings
                    },
                    ..state()
                },
                below,
                false,
            ),
            (
                "no card",
                TriggerState {
                    card: None,
                    ..state()
                },
                below,
                false,
            ),
            (
                "suspended",
                TriggerState {
                    suspended: true,
                    ..state()
                },
                below,
                false,
            ),
            (
                "in flight",
                TriggerState {
                    in_flight: true,
                    ..state()
                },
                below,
                false,
            ),
            (
                "backing off",
                TriggerState {
                    retry_after_us: now + 1,
                    ..state()
                },
                below,
                false,
            ),
            (
                "back-off over",
                TriggerState {
                    retry_after_us: now,
                    ..state()
                },
                below,
                true,
            ),
            (
                "cap reached exactly",
                TriggerState {
                    month_used: Micros(75 * CREDIT),
                    ..state()
                },
                below,
                true,
            ),
            (
                "cap would be passed",
                TriggerState {
                    month_used: Micros(76 * CREDIT),
                    ..state()
                },
                below,
                false,
            ),
            (
                "cap overflow",
                TriggerState {
                    month_used: Micros(i64::MAX),
                    ..state()
                },
                below,
                false,
            ),
        ];
        for (name, state, (before, after), expected) in cases {
            let attempt = trigger("u", &state, before, after, now);
            assert_eq!(attempt.is_some(), expected, "{name}");
            if let Some(attempt) = attempt {
                assert_eq!(attempt.amount, Micros(25 * CREDIT), "{name}");
                assert_eq!(attempt.card, card(), "{name}");
            }
        }
    }

    #[test]
    fn months_start_at_midnight_utc_of_the_first() {
        // 2026-03-15T12:34:56Z → 2026-03-01T00:00:00Z
        assert_eq!(month_start_us(1_773_578_096_000_000), 1_772_323_200_000_000);
        // The first instant of a month is its own start; the one before is the last month.
        assert_eq!(month_start_us(1_772_323_200_000_000), 1_772_323_200_000_000);
        // 2026-02-01T00:00:00Z
        assert_eq!(month_start_us(1_772_323_199_999_999), 1_769_904_000_000_000);
        // Leap day 2024-02-29T23:59:59Z → 2024-02-01
        assert_eq!(month_start_us(1_709_251_199_000_000), 1_706_745_600_000_000);
        assert_eq!(month_start_us(0), 0);
    }

    fn attempt() -> Attempt {
        Attempt {
            attempt_id: "topup_1".into(),
            user_id: "u".into(),
            amount: Micros(25 * CREDIT),
            state: AttemptState::Processing,
            card: card(),
            payment_intent_id: None,
            failure_code: None,
            action_url: None,
            lease_until_us: 0,
            claims: 1,
            created_at_us: 0,
        }
    }

    fn declined() -> ChargeResult {
        ChargeResult::Declined {
            code: "card_declined".into(),
            message: "Your card was declined.".into(),
            payment_intent_id: Some("pi_1".into()),
        }
    }

    fn types(resolution: &Resolution) -> Vec<&str> {
        resolution
            .events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect()
    }

    #[test]
    fn a_decline_backs_off_an_hour_and_the_third_in_a_row_suspends() {
        let now = 5_000;
        let first = resolve(&attempt(), 0, 0, &declined(), now).unwrap();
        assert_eq!(first.state, AttemptState::Failed);
        assert_eq!(first.retry_after_us, now + BACKOFF_US);
        assert_eq!(first.consecutive_failures, 1);
        assert_eq!(first.suspend, None);
        assert_eq!(types(&first), vec![TOPUP_FAILED]);
        assert_eq!(first.events[0].data["failure_code"], "card_declined");
        let third = resolve(&attempt(), 2, 0, &declined(), now).unwrap();
        assert_eq!(third.suspend, Some(SuspendReason::CardDeclined));
        assert_eq!(types(&third), vec![TOPUP_FAILED, TOPUP_SUSPENDED]);
        assert_eq!(third.events[1].data["reason"], "card_declined");
    }

    #[test]
    fn success_resets_declines_and_requires_action_waits() {
        let ok = ChargeResult::Succeeded {
            payment_intent_id: "pi_1".into(),
        };
        let done = resolve(&attempt(), 2, 77, &ok, 5).unwrap();
        assert_eq!(done.state, AttemptState::Succeeded);
        assert_eq!(done.consecutive_failures, 0);
        assert_eq!(done.retry_after_us, 77);
        assert_eq!(types(&done), vec![TOPUP_SUCCEEDED]);
        assert_eq!(done.events[0].data["amount_micros"], 25 * CREDIT);
        let action = ChargeResult::RequiresAction {
            payment_intent_id: "pi_2".into(),
            action_url: Some("https://example.test/auth".into()),
        };
        let waiting = resolve(&attempt(), 1, 0, &action, 5).unwrap();
        assert_eq!(waiting.state, AttemptState::RequiresAction);
        assert!(waiting.state.in_flight());
        assert_eq!(waiting.consecutive_failures, 1);
        assert_eq!(types(&waiting), vec![TOPUP_REQUIRES_ACTION]);
        assert_eq!(
            resolve(
                &attempt(),
                1,
                0,
                &ChargeResult::Unknown("timeout".into()),
                5
            ),
            None
        );
    }

    #[test]
    fn settings_are_whole_credits_within_bounds() {
        let ok = Settings::validate(true, 10 * CREDIT, 25 * CREDIT, 100 * CREDIT).unwrap();
        assert_eq!(ok.amount, Micros(25 * CREDIT));
        let code = |t: i64, a: i64, c: i64| Settings::validate(true, t, a, c).unwrap_err().code;
        assert_eq!(code(0, CREDIT, CREDIT), "invalid_threshold");
        assert_eq!(code(-CREDIT, CREDIT, CREDIT), "invalid_threshold");
        assert_eq!(code(CREDIT + 1, CREDIT, CREDIT), "invalid_threshold");
        assert_eq!(
            code(CREDIT, 1_000_000 * CREDIT, CREDIT),
            "invalid_topup_amount"
        );
        assert_eq!(code(CREDIT, CREDIT / 2, CREDIT), "invalid_topup_amount");
        assert_eq!(code(CREDIT, CREDIT, 0), "invalid_monthly_cap");
        assert_eq!(code(CREDIT, CREDIT, i64::MAX), "invalid_monthly_cap");
    }
}
