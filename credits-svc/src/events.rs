//! The events a ledger plan causes, derived without I/O: what the stores write into
//! the outbox (reeve-events) in the transaction that persists the plan, so an event
//! exists exactly when its change does.
//!
//! - an entry: `credits.purchased`, `credits.granted`, `credits.refunded`,
//!   `credits.disputed`, `lot.expired`;
//! - a hold the plan marks expired: `hold.expired`;
//! - a user's available balance (balance − held): `credits.depleted` when it goes from
//!   above zero to zero or below; `credits.balance_low` when it is below the user's
//!   alert threshold while the alert is armed (then disarmed; re-armed once the
//!   available balance is back at or above the threshold).
//!
//! This module must never read or write storage: the stores give it the state they
//! locked and persist what it returns. A plan that changes no balance, makes no
//! event-worthy entry and expires no hold yields nothing, and costs nothing.

use std::collections::{BTreeMap, HashMap};

use reeve_events::NewEvent;
use reeve_runtime::Micros;
use serde_json::json;

use crate::holds::HoldStatus;
use crate::ledger::{EntryKind, KeySource, LotRef, Plan};
use crate::lots::Lot;

pub const CREDITS_PURCHASED: &str = "credits.purchased";
pub const CREDITS_GRANTED: &str = "credits.granted";
pub const CREDITS_REFUNDED: &str = "credits.refunded";
pub const CREDITS_DISPUTED: &str = "credits.disputed";
pub const CREDITS_BALANCE_LOW: &str = "credits.balance_low";
pub const CREDITS_DEPLETED: &str = "credits.depleted";
pub const LOT_EXPIRED: &str = "lot.expired";
pub const LOT_EXPIRING: &str = "lot.expiring";
pub const HOLD_EXPIRED: &str = "hold.expired";

/// A user's low-balance alert as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceAlert {
    pub threshold: Micros,
    pub armed: bool,
}

/// What the store writes after a plan: events, and alerts whose armed state changes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Emitted {
    pub events: Vec<NewEvent>,
    pub alerts: Vec<(String, bool)>,
}

/// Available balance before and after the plan, per user whose one changes.
pub fn available_moves(
    plan: &Plan,
    balances: &HashMap<String, Micros>,
    lots: &[Lot],
) -> BTreeMap<String, (i64, i64)> {
    let mut delta: BTreeMap<&str, i64> = BTreeMap::new();
    for entry in &plan.inserts {
        *delta.entry(entry.write.user_id.as_str()).or_default() += entry.write.amount.0;
    }
    let owner: HashMap<i64, &str> = lots.iter().map(|l| (l.id, l.user_id.as_str())).collect();
    for (lot_id, moved) in &plan.lot_moves {
        if moved.held != 0
            && let Some(user) = owner.get(lot_id)
        {
            *delta.entry(user).or_default() -= moved.held;
        }
    }
    let mut held: HashMap<&str, i64> = HashMap::new();
    for lot in lots {
        *held.entry(lot.user_id.as_str()).or_default() += lot.held.0;
    }
    delta
        .into_iter()
        .filter(|(_, d)| *d != 0)
        .map(|(user, d)| {
            let before =
                balances.get(user).map_or(0, |b| b.0) - held.get(user).copied().unwrap_or(0);
            (user.to_owned(), (before, before.saturating_add(d)))
        })
        .collect()
}

fn amount(micros: i64) -> serde_json::Value {
    json!(Micros(micros).to_string())
}

/// The events of `plan` given each user's balance before it (`balances`), their lots
/// as locked, and the alerts of the users in `moves` (from [`available_moves`]).
pub fn derive(
    plan: &Plan,
    lots: &[Lot],
    moves: &BTreeMap<String, (i64, i64)>,
    alerts: &HashMap<String, BalanceAlert>,
) -> Emitted {
    let mut emitted = Emitted::default();
    for entry in &plan.inserts {
        let write = &entry.write;
        let kind = match (write.kind, write.key_source) {
            (EntryKind::Purchase, _) => CREDITS_PURCHASED,
            (EntryKind::Grant, _) => CREDITS_GRANTED,
            (EntryKind::Adjustment, KeySource::Stripe)
                if write.idempotency_key.starts_with("stripe:refund:") =>
            {
                CREDITS_REFUNDED
            }
            (EntryKind::Adjustment, KeySource::Stripe)
                if write.idempotency_key.starts_with("stripe:dispute:") =>
            {
                CREDITS_DISPUTED
            }
            (EntryKind::Expiration, _) => LOT_EXPIRED,
            _ => continue,
        };
        let mut data = json!({
            "user_id": write.user_id,
            "amount": amount(write.amount.0),
            "amount_micros": write.amount.0,
            "balance_after": amount(entry.balance_after.0),
            "balance_after_micros": entry.balance_after.0,
            "idempotency_key": write.idempotency_key,
        });
        if let Some(payment) = &write.payment_id {
            data["payment_id"] = json!(payment);
        }
        if write.kind == EntryKind::Expiration
            && let Some((LotRef::Existing(lot_id), _)) = entry.draws.first()
        {
            data["lot_id"] = json!(lot_id);
            if let Some(lot) = lots.iter().find(|l| l.id == *lot_id) {
                data["expires_at_us"] = json!(lot.expires_at_us);
            }
        }
        emitted
            .events
            .push(NewEvent::new(kind, Some(&write.user_id), data));
    }
    for change in &plan.holds {
        if change.dirty && change.hold.status == HoldStatus::Expired {
            let hold = &change.hold;
            emitted.events.push(NewEvent::new(
                HOLD_EXPIRED,
                Some(&hold.user_id),
                json!({
                    "user_id": hold.user_id,
                    "hold_id": hold.hold_id,
                    "amount": amount(hold.amount.0),
                    "amount_micros": hold.amount.0,
                    "expires_at_us": hold.expires_at_us,
                }),
            ));
        }
    }
    for (user, &(before, after)) in moves {
        if before > 0 && after <= 0 {
            emitted.events.push(NewEvent::new(
                CREDITS_DEPLETED,
                Some(user),
                json!({
                    "user_id": user,
                    "available": amount(after),
                    "available_micros": after,
                }),
            ));
        }
        let Some(alert) = alerts.get(user) else {
            continue;
        };
        let below = after < alert.threshold.0;
        if alert.armed && below {
            emitted.events.push(NewEvent::new(
                CREDITS_BALANCE_LOW,
                Some(user),
                json!({
                    "user_id": user,
                    "available": amount(after),
                    "available_micros": after,
                    "threshold": amount(alert.threshold.0),
                    "threshold_micros": alert.threshold.0,
                }),
            ));
            emitted.alerts.push((user.clone(), false));
        } else if !alert.armed && !below {
            emitted.alerts.push((user.clone(), true));
        }
    }
    emitted
}

/// `lot.expiring` for a lot that expires within the warning window.
pub fn lot_expiring(lot: &Lot) -> NewEvent {
    NewEvent::new(
        LOT_EXPIRING,
        Some(&lot.user_id),
        json!({
            "user_id": lot.user_id,
            "lot_id": lot.id,
            "category": lot.category.as_str(),
            "remaining": amount(lot.remaining.0),
            "remaining_micros": lot.remaining.0,
            "expires_at_us": lot.expires_at_us,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{WriteRequest, plan};
    use crate::lots::Category;

    fn lot(id: i64, user: &str, micros: i64, held: i64) -> Lot {
        Lot {
            id,
            user_id: user.to_owned(),
            category: Category::Paid,
            priority: 50,
            expires_at_us: None,
            source: format!("src-{id}"),
            original: Micros(micros),
            remaining: Micros(micros),
            created_at_us: 0,
            held: Micros(held),
            expired: Micros::ZERO,
        }
    }

    fn run(
        writes: &[WriteRequest],
        lots: &[Lot],
        alerts: &[(&str, i64, bool)],
    ) -> (BTreeMap<String, (i64, i64)>, Emitted) {
        let mut balances: HashMap<String, Micros> = HashMap::new();
        for lot in lots {
            balances
                .entry(lot.user_id.clone())
                .or_insert(Micros::ZERO)
                .0 += lot.remaining.0;
        }
        let plan = plan(writes, &balances, lots, &HashMap::new(), 0);
        let moves = available_moves(&plan, &balances, lots);
        let alerts = alerts
            .iter()
            .map(|(u, t, armed)| {
                (
                    (*u).to_owned(),
                    BalanceAlert {
                        threshold: Micros(*t),
                        armed: *armed,
                    },
                )
            })
            .collect();
        let emitted = derive(&plan, lots, &moves, &alerts);
        (moves, emitted)
    }

    fn deduct(user: &str, micros: i64, key: &str) -> WriteRequest {
        WriteRequest::caller(user, EntryKind::Deduction, Micros(-micros), key, "")
    }

    fn types(emitted: &Emitted) -> Vec<&str> {
        emitted
            .events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect()
    }

    #[test]
    fn deductions_of_a_user_without_alert_above_zero_emit_nothing() {
        let (_, emitted) = run(&[deduct("a", 10, "k")], &[lot(1, "a", 100, 0)], &[]);
        assert_eq!(emitted, Emitted::default());
    }

    #[test]
    fn balance_low_fires_once_when_crossing_and_rearms_above() {
        let lots = [lot(1, "a", 100, 30)];
        // Available 70 → 55: below 60, armed: one event, disarmed.
        let (moves, emitted) = run(&[deduct("a", 15, "k")], &lots, &[("a", 60, true)]);
        assert_eq!(moves["a"], (70, 55));
        assert_eq!(types(&emitted), vec![CREDITS_BALANCE_LOW]);
        assert_eq!(emitted.alerts, vec![("a".to_owned(), false)]);
        assert_eq!(emitted.events[0].data["threshold_micros"], 60);
        assert_eq!(emitted.events[0].data["available_micros"], 55);
        // Disarmed: further deductions stay quiet.
        let (_, emitted) = run(&[deduct("a", 5, "k")], &lots, &[("a", 80, false)]);
        assert_eq!(emitted, Emitted::default());
        // A grant lifting it back to the threshold re-arms, without an event.
        let grant = WriteRequest::caller("a", EntryKind::Grant, Micros(50), "g", "");
        let (_, emitted) = run(&[grant], &lots, &[("a", 100, false)]);
        assert_eq!(types(&emitted), vec![CREDITS_GRANTED]);
        assert_eq!(emitted.alerts, vec![("a".to_owned(), true)]);
    }

    #[test]
    fn depleted_when_available_reaches_zero() {
        let (_, emitted) = run(&[deduct("a", 100, "k")], &[lot(1, "a", 100, 0)], &[]);
        assert_eq!(types(&emitted), vec![CREDITS_DEPLETED]);
        assert_eq!(emitted.events[0].user_id.as_deref(), Some("a"));
    }

    #[test]
    fn stripe_adjustments_are_refunds_or_disputes_by_key() {
        let mut refund =
            WriteRequest::caller("a", EntryKind::Adjustment, Micros(-5), "x", "Stripe refund");
        refund.key_source = KeySource::Stripe;
        refund.idempotency_key = "stripe:refund:re_1:0:5".into();
        refund.payment_id = Some("pi_1".into());
        let mut dispute = refund.clone();
        dispute.idempotency_key = "stripe:dispute:dp_1".into();
        let (_, emitted) = run(&[refund, dispute], &[lot(1, "a", 100, 0)], &[]);
        assert_eq!(types(&emitted), vec![CREDITS_REFUNDED, CREDITS_DISPUTED]);
        assert_eq!(emitted.events[0].data["payment_id"], "pi_1");
        assert_eq!(emitted.events[0].data["amount"], "-0.000005");
    }
}
