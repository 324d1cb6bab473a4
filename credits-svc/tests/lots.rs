//! Credit lots (issue 9) over real gRPC on loopback, on PostgreSQL and SQLite: the
//! spending order, expiry exact at its instant (with a clock the test moves, two
//! service instances and their sweepers racing), refunds from their own payment's lot,
//! debts paid by the next credit, revocation, and invariants over random histories.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Backend, CREDIT, Client, TestDb, balance, client};
use futures::future::join_all;
use proptest::prelude::*;
use reeve_proto::credits::v1 as pb;
use reeve_runtime::clock::ManualClock;
use reeve_testkit::on_both_stores;
use tonic::Code;
use tonic_types::StatusExt;

on_both_stores!(
    deductions_draw_lots_in_the_spending_order,
    a_lot_is_spent_until_its_instant_and_expires_exactly_once_at_it,
    a_refund_draws_its_own_lot_first_and_the_next_purchase_pays_the_debt,
    a_revoked_lot_leaves_once_and_never_again,
    grants_refuse_terms_they_cannot_honour,
    the_balance_tells_paid_promotional_and_the_next_expiry,
);

/// An instant comfortably in the future, on a whole second.
const T0: i64 = 2_000_000_000_000_000;

fn ts(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

async fn start_at(db: &TestDb, clock: &ManualClock, sweep: Duration) -> credits_svc::RunningServer {
    let forever = tokio_util::sync::CancellationToken::new();
    common::start_with_clock(db, clock, sweep, &forever).await
}

struct Grant<'a> {
    user: &'a str,
    credits: i64,
    key: &'a str,
    category: pb::CreditCategory,
    priority: Option<i32>,
    expires_at_us: Option<i64>,
}

async fn grant(c: &mut Client, g: Grant<'_>) -> pb::LedgerEntry {
    c.add_credits(pb::AddCreditsRequest {
        user_id: g.user.into(),
        amount_micros: g.credits * CREDIT,
        idempotency_key: g.key.into(),
        kind: pb::CreditKind::Grant.into(),
        description: String::new(),
        category: g.category.into(),
        priority: g.priority,
        expires_at: g.expires_at_us.map(ts),
    })
    .await
    .unwrap()
    .into_inner()
    .entry
    .unwrap()
}

async fn deduct(
    c: &mut Client,
    user: &str,
    micros: i64,
    key: &str,
) -> Result<pb::LedgerEntry, tonic::Status> {
    common::deduct(c, user, micros, key)
        .await
        .map(|r| r.entry.unwrap())
}

async fn lots(c: &mut Client, user: &str, include_spent: bool) -> Vec<pb::Lot> {
    c.list_lots(pb::ListLotsRequest {
        user_id: user.into(),
        include_spent,
    })
    .await
    .unwrap()
    .into_inner()
    .lots
}

async fn assert_audit_clean(db: &TestDb, user: &str) {
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let audit = store.audit(user).await.unwrap();
    assert_eq!(audit.cached, audit.entries_sum, "{user} drifted");
}

fn draws(entry: &pb::LedgerEntry) -> Vec<(i64, i64)> {
    entry
        .draws
        .iter()
        .map(|d| (d.lot_id, d.amount_micros / CREDIT))
        .collect()
}

use pb::CreditCategory::{Paid, Promotional};

async fn deductions_draw_lots_in_the_spending_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    let server = start_at(&db, &clock, Duration::from_secs(3600)).await;
    let mut c = client(server.local_addr).await;
    let u = "order";
    // (key, credits, category, priority, expiry): made in this order, so ids ascend.
    let made = [
        ("paid-default", 10, Paid, None, None),
        ("promo-late", 10, Promotional, None, Some(T0 + 200)),
        ("promo-forever", 10, Promotional, None, None),
        ("paid-10-late", 10, Paid, Some(10), Some(T0 + 200)),
        ("paid-first", 10, Paid, Some(0), None),
        ("promo-soon", 10, Promotional, None, Some(T0 + 100)),
    ];
    let mut ids = std::collections::HashMap::new();
    for (key, credits, category, priority, expires_at_us) in made {
        grant(
            &mut c,
            Grant {
                user: u,
                credits,
                key,
                category,
                priority,
                expires_at_us,
            },
        )
        .await;
        let listed = lots(&mut c, u, true).await;
        ids.insert(key, listed.iter().map(|l| l.lot_id).max().unwrap());
    }
    let id = |key: &str| ids[key];
    let listed: Vec<i64> = lots(&mut c, u, false)
        .await
        .iter()
        .map(|l| l.lot_id)
        .collect();
    let expected = vec![
        id("paid-first"),
        id("promo-soon"),
        id("promo-late"),
        id("paid-10-late"),
        id("promo-forever"),
        id("paid-default"),
    ];
    assert_eq!(listed, expected);
    let first = deduct(&mut c, u, 15 * CREDIT, "d1").await.unwrap();
    assert_eq!(
        draws(&first),
        vec![(id("paid-first"), 10), (id("promo-soon"), 5)]
    );
    let second = deduct(&mut c, u, 30 * CREDIT, "d2").await.unwrap();
    assert_eq!(
        draws(&second),
        vec![
            (id("promo-soon"), 5),
            (id("promo-late"), 10),
            (id("paid-10-late"), 10),
            (id("promo-forever"), 5)
        ]
    );
    // History shows the draws too.
    let history = c
        .history(pb::HistoryRequest {
            user_id: u.into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(draws(&history.entries[0]), draws(&second));
    let left = balance(&mut c, u).await;
    assert_eq!(left.balance_micros, 15 * CREDIT);
    assert_eq!(left.paid_micros, 10 * CREDIT);
    assert_eq!(left.promotional_micros, 5 * CREDIT);
    assert_audit_clean(&db, u).await;
}

async fn a_lot_is_spent_until_its_instant_and_expires_exactly_once_at_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    // Two instances on one database, each with a sweeper running every 5 ms.
    let one = start_at(&db, &clock, Duration::from_millis(5)).await;
    let two = start_at(&db, &clock, Duration::from_millis(5)).await;
    let mut c = client(one.local_addr).await;
    let expiry = T0 + 1_000_000;
    grant(
        &mut c,
        Grant {
            user: "exp",
            credits: 10,
            key: "promo",
            category: Promotional,
            priority: None,
            expires_at_us: Some(expiry),
        },
    )
    .await;
    grant(
        &mut c,
        Grant {
            user: "exp",
            credits: 3,
            key: "paid",
            category: Paid,
            priority: None,
            expires_at_us: None,
        },
    )
    .await;
    // 1 µs before the instant: the promotional lot is spent.
    clock.set(expiry - 1);
    let before = deduct(&mut c, "exp", 4 * CREDIT, "before").await.unwrap();
    assert_eq!(before.balance_after_micros, 9 * CREDIT);
    // At the instant: its remainder (6) is gone, on every read and write, whoever
    // writes the expiration (a sweeper on either instance, or a deduction).
    clock.set(expiry);
    assert_eq!(balance(&mut c, "exp").await.balance_micros, 3 * CREDIT);
    let addrs = [one.local_addr, two.local_addr];
    let results = join_all((0..40).map(|i| async move {
        let mut c = client(addrs[i % 2]).await;
        deduct(&mut c, "exp", CREDIT, &format!("at-{i}")).await
    }))
    .await;
    let applied = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(applied, 3, "only the paid lot can be spent");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let history = c
        .history(pb::HistoryRequest {
            user_id: "exp".into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let expirations: Vec<&pb::LedgerEntry> = history
        .iter()
        .filter(|e| e.kind == pb::EntryKind::Expiration as i32)
        .collect();
    assert_eq!(expirations.len(), 1, "{history:#?}");
    assert_eq!(expirations[0].amount_micros, -6 * CREDIT);
    assert_eq!(balance(&mut c, "exp").await.balance_micros, 0);
    assert_audit_clean(&db, "exp").await;
}

async fn a_refund_draws_its_own_lot_first_and_the_next_purchase_pays_the_debt(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    let pay = |payment: &str, credits: i64| pb::PaymentEventRequest {
        kind: pb::PaymentEventKind::PaymentSucceeded.into(),
        payment_id: payment.into(),
        user_id: "debtor".into(),
        amount_micros: credits * CREDIT,
        object_id: String::new(),
        description: String::new(),
        ..Default::default()
    };
    c.record_payment_event(pay("pi_a", 20)).await.unwrap();
    grant(
        &mut c,
        Grant {
            user: "debtor",
            credits: 5,
            key: "promo",
            category: Promotional,
            priority: None,
            expires_at_us: None,
        },
    )
    .await;
    let own_lot = lots(&mut c, "debtor", false)
        .await
        .into_iter()
        .find(|l| l.source == "pi_a")
        .unwrap()
        .lot_id;
    // Spend 10: the promotional lot first (5), then 5 of the paid one.
    deduct(&mut c, "debtor", 10 * CREDIT, "spend")
        .await
        .unwrap();
    // A full refund of the 20 paid: its own lot's 15 first, then debt of 5.
    let refund = c
        .record_payment_event(pb::PaymentEventRequest {
            kind: pb::PaymentEventKind::Refunded.into(),
            payment_id: "pi_a".into(),
            amount_micros: 20 * CREDIT,
            object_id: "ch_a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(draws(&refund), vec![(own_lot, 15)]);
    assert_eq!(refund.balance_after_micros, -5 * CREDIT);
    assert!(lots(&mut c, "debtor", false).await.is_empty());
    assert_eq!(
        deduct(&mut c, "debtor", 1, "blocked")
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    // The next purchase pays the debt first; only the rest becomes a lot.
    c.record_payment_event(pay("pi_b", 25)).await.unwrap();
    let live = lots(&mut c, "debtor", false).await;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].original_micros, 20 * CREDIT);
    assert_eq!(live[0].category, Paid as i32);
    assert_eq!(balance(&mut c, "debtor").await.balance_micros, 20 * CREDIT);
    assert_audit_clean(&db, "debtor").await;
}

async fn a_revoked_lot_leaves_once_and_never_again(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(
        &mut c,
        Grant {
            user: "rv",
            credits: 8,
            key: "promo",
            category: Promotional,
            priority: None,
            expires_at_us: None,
        },
    )
    .await;
    grant(
        &mut c,
        Grant {
            user: "rv",
            credits: 2,
            key: "paid",
            category: Paid,
            priority: None,
            expires_at_us: None,
        },
    )
    .await;
    deduct(&mut c, "rv", 3 * CREDIT, "d").await.unwrap();
    let promo = lots(&mut c, "rv", false).await[0].clone();
    assert_eq!(promo.remaining_micros, 5 * CREDIT);
    let revoke = |key: &str| pb::RevokeLotRequest {
        lot_id: promo.lot_id,
        idempotency_key: key.into(),
        reason: "promotion withdrawn".into(),
    };
    let first = c.revoke_lot(revoke("rv-1")).await.unwrap().into_inner();
    assert!(!first.duplicate);
    let entry = first.entry.unwrap();
    assert_eq!(entry.kind, pb::EntryKind::Revocation as i32);
    assert_eq!(entry.amount_micros, -5 * CREDIT);
    let again = c.revoke_lot(revoke("rv-1")).await.unwrap().into_inner();
    assert!(again.duplicate);
    let other_key = c.revoke_lot(revoke("rv-2")).await.unwrap_err();
    assert_eq!(other_key.code(), Code::FailedPrecondition);
    let missing = c
        .revoke_lot(pb::RevokeLotRequest {
            lot_id: 999_999,
            idempotency_key: "x".into(),
            reason: "r".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(balance(&mut c, "rv").await.balance_micros, 2 * CREDIT);
    assert_eq!(lots(&mut c, "rv", true).await.len(), 2);
    assert_audit_clean(&db, "rv").await;
}

async fn grants_refuse_terms_they_cannot_honour(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    let server = start_at(&db, &clock, Duration::from_secs(3600)).await;
    let mut c = client(server.local_addr).await;
    let request = |priority: Option<i32>,
                   expires_at_us: Option<i64>,
                   category,
                   kind: pb::CreditKind| pb::AddCreditsRequest {
        user_id: "terms".into(),
        amount_micros: CREDIT,
        idempotency_key: format!("k-{priority:?}-{expires_at_us:?}-{kind:?}"),
        kind: kind.into(),
        description: String::new(),
        category,
        priority,
        expires_at: expires_at_us.map(ts),
    };
    for bad in [
        request(Some(101), None, 0, pb::CreditKind::Grant),
        request(Some(-1), None, 0, pb::CreditKind::Grant),
        request(None, Some(T0), 0, pb::CreditKind::Grant),
        request(None, Some(T0 - 1), 0, pb::CreditKind::Grant),
        // The first instant past a protobuf timestamp's range (year 10000).
        request(
            None,
            Some(253_402_300_800_000_000),
            0,
            pb::CreditKind::Grant,
        ),
        request(None, None, 7, pb::CreditKind::Grant),
        request(None, None, Promotional as i32, pb::CreditKind::Purchase),
    ] {
        let status = c.add_credits(bad.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
    }
    assert_eq!(balance(&mut c, "terms").await.balance_micros, 0);
    // The last instant a timestamp holds is a valid expiry, and is answered back as is.
    let last = 253_402_300_799_999_999;
    c.add_credits(request(None, Some(last), 0, pb::CreditKind::Grant))
        .await
        .unwrap();
    assert_eq!(
        balance(&mut c, "terms").await.next_expiry_at,
        Some(ts(last))
    );
    // Only stored instants are held to that range: a query's bounds may lie past it (a
    // reconcile window to 9999-12-31T23:59:59Z plus its second of slack).
    let window = pb::ListPaymentEntriesRequest {
        payment_ids: Vec::new(),
        since: Some(prost_types::Timestamp {
            seconds: -62_135_596_801,
            nanos: 0,
        }),
        until: Some(ts(last + 1)),
        page_size: 10,
        page_token: String::new(),
    };
    c.list_payment_entries(window.clone()).await.unwrap();
    // A bound that is no timestamp at all is refused under its own code, not an
    // expiry's.
    let nanos = prost_types::Timestamp {
        seconds: 0,
        nanos: 1_000_000_000,
    };
    for bad in [
        pb::ListPaymentEntriesRequest {
            since: Some(nanos),
            ..window.clone()
        },
        pb::ListPaymentEntriesRequest {
            until: Some(nanos),
            ..window
        },
    ] {
        let status = c.list_payment_entries(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.get_details_error_info().map(|info| info.reason),
            Some("INVALID_TIMESTAMP".to_owned())
        );
    }
}

async fn the_balance_tells_paid_promotional_and_the_next_expiry(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    let server = start_at(&db, &clock, Duration::from_secs(3600)).await;
    let mut c = client(server.local_addr).await;
    let empty = balance(&mut c, "bal").await;
    assert_eq!(
        (
            empty.paid_micros,
            empty.promotional_micros,
            empty.next_expiry_micros
        ),
        (0, 0, 0)
    );
    assert!(empty.next_expiry_at.is_none());
    grant(
        &mut c,
        Grant {
            user: "bal",
            credits: 4,
            key: "a",
            category: Promotional,
            priority: None,
            expires_at_us: Some(T0 + 9_000_000),
        },
    )
    .await;
    grant(
        &mut c,
        Grant {
            user: "bal",
            credits: 6,
            key: "b",
            category: Promotional,
            priority: Some(60),
            expires_at_us: Some(T0 + 5_000_000),
        },
    )
    .await;
    grant(
        &mut c,
        Grant {
            user: "bal",
            credits: 7,
            key: "c",
            category: Paid,
            priority: None,
            expires_at_us: None,
        },
    )
    .await;
    let b = balance(&mut c, "bal").await;
    assert_eq!(b.balance_micros, 17 * CREDIT);
    assert_eq!(b.paid_micros, 7 * CREDIT);
    assert_eq!(b.promotional_micros, 10 * CREDIT);
    assert_eq!(b.next_expiry_at, Some(ts(T0 + 5_000_000)));
    assert_eq!(b.next_expiry_micros, 6 * CREDIT);
    // Past that instant the read no longer counts it, before any sweep.
    clock.set(T0 + 5_000_000);
    let later = balance(&mut c, "bal").await;
    assert_eq!(later.balance_micros, 11 * CREDIT);
    assert_eq!(later.next_expiry_at, Some(ts(T0 + 9_000_000)));
    assert_eq!(later.next_expiry_micros, 4 * CREDIT);
}

/// One step of a random history.
#[derive(Debug, Clone)]
enum Step {
    Grant {
        credits: i64,
        promotional: bool,
        priority: i32,
        expires_in_s: Option<i64>,
    },
    Purchase {
        credits: i64,
    },
    Deduct {
        micros: i64,
    },
    Refund {
        payment: usize,
        cumulative_credits: i64,
    },
    Revoke {
        nth: usize,
    },
    Advance {
        seconds: i64,
    },
    Sweep,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (
            1i64..20,
            any::<bool>(),
            0i32..=100,
            proptest::option::of(1i64..30)
        )
            .prop_map(
                |(credits, promotional, priority, expires_in_s)| Step::Grant {
                    credits,
                    promotional,
                    priority,
                    expires_in_s
                }
            ),
        (1i64..30).prop_map(|credits| Step::Purchase { credits }),
        (1i64..15_000_000).prop_map(|micros| Step::Deduct { micros }),
        (0usize..4, 1i64..40).prop_map(|(payment, cumulative_credits)| Step::Refund {
            payment,
            cumulative_credits
        }),
        (0usize..6).prop_map(|nth| Step::Revoke { nth }),
        (1i64..20).prop_map(|seconds| Step::Advance { seconds }),
        Just(Step::Sweep),
    ]
}

/// The invariants after every step: the cached balance is the sum of entries; the
/// balance read is the live lots' sum, or a debt with no live lot; no lot is negative.
async fn check_invariants(c: &mut Client, store: &dyn credits_svc::store::LedgerStore, user: &str) {
    let audit = store.audit(user).await.unwrap();
    assert_eq!(audit.cached, audit.entries_sum);
    let read = balance(c, user).await.balance_micros;
    let live: Vec<pb::Lot> = lots(c, user, false).await;
    let live_sum: i64 = live.iter().map(|l| l.remaining_micros).sum();
    if read >= 0 {
        assert_eq!(read, live_sum, "balance = sum of live remainders");
    } else {
        assert_eq!(live_sum, 0, "a debt only without live lots");
    }
    for lot in lots(c, user, true).await {
        assert!(lot.remaining_micros >= 0 && lot.remaining_micros <= lot.original_micros);
    }
}

async fn replay(backend: Backend, steps: Vec<Step>) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    // One store and one server per history, stopped at its end: a long run must not
    // pile up pools.
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = common::start_with_clock(&db, &clock, Duration::from_secs(3600), &shutdown).await;
    let mut c = client(server.local_addr).await;
    let user = "prop";
    let mut payments = 0usize;
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            Step::Grant {
                credits,
                promotional,
                priority,
                expires_in_s,
            } => {
                grant(
                    &mut c,
                    Grant {
                        user,
                        credits,
                        key: &format!("g{i}"),
                        category: if promotional { Promotional } else { Paid },
                        priority: Some(priority),
                        expires_at_us: expires_in_s.map(|s| clock.now_us() + s * 1_000_000),
                    },
                )
                .await;
            }
            Step::Purchase { credits } => {
                c.record_payment_event(pb::PaymentEventRequest {
                    kind: pb::PaymentEventKind::PaymentSucceeded.into(),
                    payment_id: format!("pi_{payments}"),
                    user_id: user.into(),
                    amount_micros: credits * CREDIT,
                    ..Default::default()
                })
                .await
                .unwrap();
                payments += 1;
            }
            Step::Deduct { micros } => {
                let before = balance(&mut c, user).await.balance_micros;
                match deduct(&mut c, user, micros, &format!("d{i}")).await {
                    Ok(entry) => {
                        assert!(before >= micros);
                        assert!(
                            entry.balance_after_micros >= 0,
                            "a deduction never overdraws"
                        );
                        assert_eq!(
                            entry.draws.iter().map(|d| d.amount_micros).sum::<i64>(),
                            micros
                        );
                    }
                    Err(status) => {
                        assert_eq!(status.code(), Code::FailedPrecondition);
                        assert!(before < micros);
                    }
                }
            }
            Step::Refund {
                payment,
                cumulative_credits,
            } if payment < payments => {
                c.record_payment_event(pb::PaymentEventRequest {
                    kind: pb::PaymentEventKind::Refunded.into(),
                    payment_id: format!("pi_{payment}"),
                    amount_micros: cumulative_credits * CREDIT,
                    object_id: format!("ch_{payment}"),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            Step::Refund { .. } => {}
            Step::Revoke { nth } => {
                let live = lots(&mut c, user, false).await;
                if let Some(lot) = live.get(nth) {
                    c.revoke_lot(pb::RevokeLotRequest {
                        lot_id: lot.lot_id,
                        idempotency_key: format!("r{i}"),
                        reason: "withdrawn".into(),
                    })
                    .await
                    .unwrap();
                }
            }
            Step::Advance { seconds } => clock.advance(seconds * 1_000_000),
            Step::Sweep => {
                store.expire_due(clock.now_us(), 100).await.unwrap();
            }
        }
        check_invariants(&mut c, store.as_ref(), user).await;
    }
}

fn run_property(backend: Backend) {
    common::run_histories(step(), 12, |steps| replay(backend, steps));
}

#[test]
fn postgres_random_histories_keep_balance_entries_and_lots_equal() {
    run_property(Backend::Postgres);
}

#[test]
fn sqlite_random_histories_keep_balance_entries_and_lots_equal() {
    run_property(Backend::Sqlite);
}
