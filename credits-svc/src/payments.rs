//! Money that moved at Stripe, as the ledger sees it: a payment credited, refunds and
//! disputes taken back from it, failed refunds and won disputes given back. Rules
//! only, free of I/O: the stores load the payment's state under the user's lock, call
//! [`decide`], and write what it says in the same transaction.
//!
//! What this module guarantees, whatever the order or the number of deliveries:
//! - a refund or dispute moves the balance of the user the payment credited (the
//!   ledger's own record), never a user named by the event;
//! - a refund event carries the charge's cumulative `amount_refunded`, and only the
//!   part not yet debited for refunds is debited, so partial refunds without
//!   `previous_attributes`, out of order or redelivered, debit exactly the total;
//! - a reinstatement gives back exactly what its dispute's debit took, once, and
//!   nothing when the dispute was never debited (a reinstatement seen first means
//!   the withdrawal debits nothing later);
//! - refunds plus disputes never debit one payment for more than it credited.
//!
//! It must never read a clock, guess a user, or write an entry whose key is not
//! derived from Stripe's ids (key source [`KeySource::Stripe`]).

use reeve_runtime::Micros;

use crate::ledger::{EntryKind, InvalidWrite, KeySource, WriteRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentEventKind {
    PaymentSucceeded,
    Refunded,
    RefundFailed,
    DisputeFundsWithdrawn,
    DisputeFundsReinstated,
}

/// One Stripe fact about a payment, as the bridge read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentEvent {
    pub kind: PaymentEventKind,
    /// The payment intent id.
    pub payment_id: String,
    /// Only for `PaymentSucceeded`: who paid.
    pub user_id: String,
    /// See the proto: amount received, cumulative refunded, failed refund, disputed.
    pub amount: Micros,
    /// The charge (refunds), refund (failed refunds) or dispute id.
    pub object_id: String,
    pub description: String,
}

/// What the ledger knows of one credited payment (table `credit_payments`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentState {
    pub payment_id: String,
    pub user_id: String,
    pub credited: Micros,
    /// Net debited for refunds (debits less failed refunds given back).
    pub refunded: Micros,
    /// Every refund debit ever made, never lowered: makes each refund key unique.
    pub refund_debits_total: Micros,
    /// Net debited for disputes (debits less reinstatements).
    pub disputed: Micros,
}

impl PaymentState {
    /// What refunds and disputes may still take from this payment.
    pub fn uncapped(&self) -> Micros {
        Micros((self.credited.0 - self.refunded.0 - self.disputed.0).max(0))
    }
}

/// One dispute of a payment (table `credit_disputes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisputeState {
    pub dispute_id: String,
    pub payment_id: Option<String>,
    /// What the dispute's debit took (0 when it debited nothing).
    pub debited: Micros,
    /// Won: its debit (if any) was given back, and no later withdrawal debits.
    pub reinstated: bool,
}

/// What one event does, given the payment's state.
// Made once per event and consumed at once: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Append `write` (an adjustment keyed in the Stripe namespace) and save the states.
    Write {
        write: WriteRequest,
        payment: PaymentState,
        dispute: Option<DisputeState>,
        capped: Micros,
    },
    /// Nothing to append; save `dispute` when given (a reinstatement seen first).
    Nothing {
        detail: String,
        capped: Micros,
        dispute: Option<DisputeState>,
    },
}

/// The ledger key of a dispute's debit and of its reinstatement (the same text the
/// bridge used before key sources existed, so entries written then still match).
pub fn dispute_key(dispute_id: &str) -> String {
    format!("stripe:dispute:{dispute_id}")
}

pub fn reinstatement_key(dispute_id: &str) -> String {
    format!("stripe:dispute-reinstated:{dispute_id}")
}

pub fn refund_failed_key(refund_id: &str) -> String {
    format!("stripe:refund-failed:{refund_id}")
}

/// The key an event's entry would have when it does not depend on the state (used to
/// find a redelivery before deciding); `None` for refunds, whose key follows the tally.
pub fn fixed_key(event: &PaymentEvent) -> Option<String> {
    match event.kind {
        PaymentEventKind::PaymentSucceeded => Some(event.payment_id.clone()),
        PaymentEventKind::Refunded => None,
        PaymentEventKind::RefundFailed => Some(refund_failed_key(&event.object_id)),
        PaymentEventKind::DisputeFundsWithdrawn => Some(dispute_key(&event.object_id)),
        PaymentEventKind::DisputeFundsReinstated => Some(reinstatement_key(&event.object_id)),
    }
}

impl PaymentEvent {
    /// The shape of the event; amounts and ids are checked before any lookup.
    pub fn validate(&self) -> Result<(), InvalidWrite> {
        reeve_runtime::ids::check_key(&self.payment_id, "payment_id")?;
        reeve_runtime::ids::check_description(&self.description)?;
        if self.kind == PaymentEventKind::PaymentSucceeded {
            reeve_runtime::ids::check_user_id(&self.user_id)?;
        } else {
            reeve_runtime::ids::check_key(&self.object_id, "object_id")?;
        }
        let (amount_ok, rule) = match self.kind {
            // A charge fully refunded and then its refund failed reports 0.
            PaymentEventKind::Refunded => (self.amount.0 >= 0, "must not be negative"),
            _ => (self.amount.0 > 0, "must be greater than zero"),
        };
        if !amount_ok {
            return Err(InvalidWrite::new(
                "invalid_amount",
                format!("amount_micros {rule}"),
            ));
        }
        crate::ledger::check_amount_cap(self.amount)
    }

    /// The purchase a `PaymentSucceeded` event appends.
    pub fn purchase(&self) -> WriteRequest {
        WriteRequest {
            user_id: self.user_id.clone(),
            kind: EntryKind::Purchase,
            amount: self.amount,
            idempotency_key: self.payment_id.clone(),
            key_source: KeySource::Stripe,
            payment_id: Some(self.payment_id.clone()),
            description: self.description.clone(),
            lot_terms: None,
            target_lot_id: None,
        }
    }
}

fn adjustment(
    payment: &PaymentState,
    amount: Micros,
    key: String,
    description: &str,
) -> WriteRequest {
    WriteRequest {
        user_id: payment.user_id.clone(),
        kind: EntryKind::Adjustment,
        amount,
        idempotency_key: key,
        key_source: KeySource::Stripe,
        payment_id: Some(payment.payment_id.clone()),
        description: description.to_owned(),
        lot_terms: None,
        target_lot_id: None,
    }
}

fn nothing(detail: String) -> Decision {
    Decision::Nothing {
        detail,
        capped: Micros::ZERO,
        dispute: None,
    }
}

fn describe(event: &PaymentEvent, fallback: String) -> String {
    if event.description.trim().is_empty() {
        fallback
    } else {
        event.description.clone()
    }
}

/// Decides a refund, failed refund or dispute event of a credited payment. `dispute`
/// is the stored dispute named by the event (dispute kinds only). A redelivery of a
/// fixed-key event has already been answered by the store from the existing entry.
pub fn decide(
    event: &PaymentEvent,
    payment: &PaymentState,
    dispute: Option<&DisputeState>,
) -> Decision {
    let mut next = payment.clone();
    match event.kind {
        // The store credits payments through the ordinary plan.
        PaymentEventKind::PaymentSucceeded => nothing("a payment is not decided here".to_owned()),
        PaymentEventKind::Refunded => {
            let wanted = event.amount.0 - payment.refunded.0;
            if wanted <= 0 {
                return nothing(format!(
                    "refunds of {} already debited {} (charge reports {})",
                    payment.payment_id, payment.refunded, event.amount
                ));
            }
            let debit = wanted.min(payment.uncapped().0);
            let capped = Micros(wanted - debit);
            if debit == 0 {
                return Decision::Nothing {
                    detail: format!(
                        "payment {} has nothing left to take back (cap)",
                        payment.payment_id
                    ),
                    capped,
                    dispute: None,
                };
            }
            let key = format!(
                "stripe:refund:{}:{}:{}",
                event.object_id, payment.refund_debits_total.0, event.amount.0
            );
            next.refunded = Micros(payment.refunded.0 + debit);
            next.refund_debits_total = Micros(payment.refund_debits_total.0 + debit);
            Decision::Write {
                write: adjustment(
                    payment,
                    Micros(-debit),
                    key,
                    &describe(event, format!("Stripe refund on {}", event.object_id)),
                ),
                payment: next,
                dispute: None,
                capped,
            }
        }
        PaymentEventKind::RefundFailed => {
            let back = event.amount.0.min(payment.refunded.0);
            if back <= 0 {
                return nothing(format!(
                    "failed refund {}: no refund of {} was debited",
                    event.object_id, payment.payment_id
                ));
            }
            next.refunded = Micros(payment.refunded.0 - back);
            Decision::Write {
                write: adjustment(
                    payment,
                    Micros(back),
                    refund_failed_key(&event.object_id),
                    &describe(
                        event,
                        format!("Stripe refund {} failed: given back", event.object_id),
                    ),
                ),
                payment: next,
                dispute: None,
                capped: Micros(event.amount.0 - back),
            }
        }
        PaymentEventKind::DisputeFundsWithdrawn => {
            if let Some(dispute) = dispute {
                if dispute.reinstated {
                    return nothing(format!("dispute {} was already won", event.object_id));
                }
                if dispute.debited.0 > 0 {
                    return nothing(format!("dispute {} was already debited", event.object_id));
                }
            }
            let wanted = event.amount.0;
            let debit = wanted.min(payment.uncapped().0);
            let capped = Micros(wanted - debit);
            if debit == 0 {
                return Decision::Nothing {
                    detail: format!(
                        "payment {} has nothing left to take back (cap)",
                        payment.payment_id
                    ),
                    capped,
                    dispute: None,
                };
            }
            next.disputed = Micros(payment.disputed.0 + debit);
            Decision::Write {
                write: adjustment(
                    payment,
                    Micros(-debit),
                    dispute_key(&event.object_id),
                    &describe(event, format!("Stripe dispute {}", event.object_id)),
                ),
                payment: next,
                dispute: Some(DisputeState {
                    dispute_id: event.object_id.clone(),
                    payment_id: Some(payment.payment_id.clone()),
                    debited: Micros(debit),
                    reinstated: false,
                }),
                capped,
            }
        }
        PaymentEventKind::DisputeFundsReinstated => {
            let debited = dispute.map_or(Micros::ZERO, |d| d.debited);
            let won = DisputeState {
                dispute_id: event.object_id.clone(),
                payment_id: Some(payment.payment_id.clone()),
                debited,
                reinstated: true,
            };
            if dispute.is_some_and(|d| d.reinstated) {
                return nothing(format!(
                    "dispute {} was already reinstated",
                    event.object_id
                ));
            }
            if debited.0 <= 0 {
                return Decision::Nothing {
                    detail: format!(
                        "dispute {} was never debited: nothing to give back",
                        event.object_id
                    ),
                    capped: Micros::ZERO,
                    dispute: Some(won),
                };
            }
            next.disputed = Micros((payment.disputed.0 - debited.0).max(0));
            Decision::Write {
                write: adjustment(
                    payment,
                    debited,
                    reinstatement_key(&event.object_id),
                    &describe(
                        event,
                        format!("Stripe dispute {} won: funds reinstated", event.object_id),
                    ),
                ),
                payment: next,
                dispute: Some(won),
                capped: Micros::ZERO,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDIT: i64 = 1_000_000;

    fn paid(credits: i64) -> PaymentState {
        PaymentState {
            payment_id: "pi_1".to_owned(),
            user_id: "payer".to_owned(),
            credited: Micros(credits * CREDIT),
            refunded: Micros::ZERO,
            refund_debits_total: Micros::ZERO,
            disputed: Micros::ZERO,
        }
    }

    fn event(kind: PaymentEventKind, credits: i64, object_id: &str) -> PaymentEvent {
        PaymentEvent {
            kind,
            payment_id: "pi_1".to_owned(),
            // Never used for refunds and disputes: the payment's user is.
            user_id: "someone-else".to_owned(),
            amount: Micros(credits * CREDIT),
            object_id: object_id.to_owned(),
            description: String::new(),
        }
    }

    /// Applies a sequence of events to one payment the way a store does, and returns
    /// the net amount moved (negative: debited) and the final state.
    fn replay(
        mut payment: PaymentState,
        events: &[PaymentEvent],
    ) -> (i64, PaymentState, Vec<String>) {
        let mut disputes: Vec<DisputeState> = Vec::new();
        let mut keys: Vec<String> = Vec::new();
        let mut moved = 0i64;
        for event in events {
            if let Some(key) = fixed_key(event)
                && keys.contains(&key)
            {
                continue; // a redelivery: the store answers the existing entry
            }
            let dispute = disputes
                .iter()
                .find(|d| d.dispute_id == event.object_id)
                .cloned();
            match decide(event, &payment, dispute.as_ref()) {
                Decision::Write {
                    write,
                    payment: next,
                    dispute,
                    ..
                } => {
                    assert_eq!(write.user_id, "payer");
                    assert_eq!(write.key_source, KeySource::Stripe);
                    assert!(!keys.contains(&write.idempotency_key), "key reused");
                    keys.push(write.idempotency_key.clone());
                    moved += write.amount.0;
                    payment = next;
                    if let Some(d) = dispute {
                        disputes.retain(|x| x.dispute_id != d.dispute_id);
                        disputes.push(d);
                    }
                }
                Decision::Nothing { dispute, .. } => {
                    if let Some(d) = dispute {
                        disputes.retain(|x| x.dispute_id != d.dispute_id);
                        disputes.push(d);
                    }
                }
            }
        }
        (moved, payment, keys)
    }

    use PaymentEventKind::*;

    #[test]
    fn refund_table() {
        // (events as (kind, credits, object), expected net credits moved)
        type Row = (
            &'static str,
            Vec<(PaymentEventKind, i64, &'static str)>,
            i64,
        );
        let rows: Vec<Row> = vec![
            ("one full refund", vec![(Refunded, 25, "ch_1")], -25),
            (
                "two partial refunds in order",
                vec![(Refunded, 5, "ch_1"), (Refunded, 13, "ch_1")],
                -13,
            ),
            (
                "two partial refunds reversed",
                vec![(Refunded, 13, "ch_1"), (Refunded, 5, "ch_1")],
                -13,
            ),
            (
                "redelivered",
                vec![
                    (Refunded, 5, "ch_1"),
                    (Refunded, 5, "ch_1"),
                    (Refunded, 13, "ch_1"),
                    (Refunded, 13, "ch_1"),
                ],
                -13,
            ),
            (
                "more than paid is capped",
                vec![(Refunded, 40, "ch_1")],
                -25,
            ),
            (
                "refund then dispute capped",
                vec![(Refunded, 10, "ch_1"), (DisputeFundsWithdrawn, 25, "dp_1")],
                -25,
            ),
            (
                "dispute then refund capped",
                vec![(DisputeFundsWithdrawn, 25, "dp_1"), (Refunded, 10, "ch_1")],
                -25,
            ),
            (
                "dispute won",
                vec![
                    (DisputeFundsWithdrawn, 25, "dp_1"),
                    (DisputeFundsReinstated, 25, "dp_1"),
                ],
                0,
            ),
            (
                "won first, withdrawn later",
                vec![
                    (DisputeFundsReinstated, 25, "dp_1"),
                    (DisputeFundsWithdrawn, 25, "dp_1"),
                ],
                0,
            ),
            (
                "reinstated, never debited",
                vec![(DisputeFundsReinstated, 25, "dp_9")],
                0,
            ),
            (
                "reinstated twice",
                vec![
                    (DisputeFundsWithdrawn, 10, "dp_1"),
                    (DisputeFundsReinstated, 10, "dp_1"),
                    (DisputeFundsReinstated, 10, "dp_1"),
                ],
                0,
            ),
            (
                "capped dispute gives back only its debit",
                vec![
                    (Refunded, 20, "ch_1"),
                    (DisputeFundsWithdrawn, 25, "dp_1"),
                    (DisputeFundsReinstated, 25, "dp_1"),
                ],
                -20,
            ),
            (
                "failed refund given back",
                vec![(Refunded, 8, "ch_1"), (RefundFailed, 8, "re_1")],
                0,
            ),
            (
                "failed refund, new refund",
                vec![
                    (Refunded, 8, "ch_1"),
                    (RefundFailed, 8, "re_1"),
                    (Refunded, 8, "ch_1"),
                ],
                -8,
            ),
            (
                "failed refund never debited",
                vec![(RefundFailed, 8, "re_1")],
                0,
            ),
            (
                "withdrawn twice",
                vec![
                    (DisputeFundsWithdrawn, 10, "dp_1"),
                    (DisputeFundsWithdrawn, 10, "dp_1"),
                ],
                -10,
            ),
        ];
        for (name, events, expected) in rows {
            let events: Vec<PaymentEvent> = events
                .into_iter()
                .map(|(kind, credits, object)| event(kind, credits, object))
                .collect();
            let (moved, state, _) = replay(paid(25), &events);
            assert_eq!(moved, expected * CREDIT, "{name}");
            assert!(
                state.refunded.0 + state.disputed.0 <= state.credited.0,
                "{name}"
            );
        }
    }

    #[test]
    fn any_order_of_partial_refunds_and_a_dispute_debits_exactly_the_capped_total() {
        // Every permutation of three cumulative refund snapshots, a withdrawal and a
        // redelivery: the total is min(paid, refunded + disputed), never more.
        let base = [
            event(Refunded, 5, "ch_1"),
            event(Refunded, 13, "ch_1"),
            event(Refunded, 13, "ch_1"),
            event(DisputeFundsWithdrawn, 20, "dp_1"),
        ];
        let mut order: Vec<usize> = (0..base.len()).collect();
        let mut seen = 0;
        permute(&mut order, 0, &mut |order| {
            let events: Vec<PaymentEvent> = order.iter().map(|&i| base[i].clone()).collect();
            let (moved, _, _) = replay(paid(25), &events);
            assert_eq!(moved, -25 * CREDIT, "{order:?}");
            seen += 1;
        });
        assert_eq!(seen, 24);
    }

    fn permute(items: &mut Vec<usize>, at: usize, visit: &mut dyn FnMut(&[usize])) {
        if at == items.len() {
            visit(items);
            return;
        }
        for i in at..items.len() {
            items.swap(at, i);
            permute(items, at + 1, visit);
            items.swap(at, i);
        }
    }

    #[test]
    fn refunds_and_disputes_debit_the_payer_not_the_event_user() {
        let decision = decide(&event(Refunded, 25, "ch_1"), &paid(25), None);
        let Decision::Write { write, .. } = decision else {
            panic!("{decision:?}")
        };
        assert_eq!(write.user_id, "payer");
        assert_eq!(write.payment_id.as_deref(), Some("pi_1"));
    }

    #[test]
    fn events_are_validated() {
        let mut bad = event(Refunded, 1, "ch_1");
        bad.payment_id = "pi\0".to_owned();
        assert_eq!(bad.validate().unwrap_err().code, "invalid_idempotency_key");
        let mut payment = event(PaymentSucceeded, 0, "");
        payment.user_id = "alice".to_owned();
        assert_eq!(payment.validate().unwrap_err().code, "invalid_amount");
        // Past what one write may move: the same code as a deduction's or a grant's.
        let cap = crate::ledger::MAX_WRITE_MICROS;
        for (micros, code) in [
            (cap, None),
            (cap + 1, Some("amount_overflow")),
            (i64::MAX, Some("amount_overflow")),
            (-1, Some("invalid_amount")),
        ] {
            payment.amount = Micros(micros);
            assert_eq!(payment.validate().err().map(|e| e.code), code, "{micros}");
        }
        // A refund reports 0 after a failed refund of all of it; never less.
        let mut refund = event(Refunded, 0, "ch_1");
        assert!(refund.validate().is_ok());
        refund.amount = Micros(-1);
        assert_eq!(refund.validate().unwrap_err().code, "invalid_amount");
        payment.amount = Micros(CREDIT);
        payment.user_id = "a\u{1}".to_owned();
        assert_eq!(payment.validate().unwrap_err().code, "invalid_user_id");
    }
}
