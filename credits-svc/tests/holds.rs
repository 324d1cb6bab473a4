//! Holds (issue 10) over real gRPC on loopback, on PostgreSQL and SQLite: reserve under
//! concurrency, settle below/at/above the hold and past everything available, exactly
//! one of a concurrent settle and release, expiry at the instant (a late settle, a lot
//! expiring under a hold), a restart between hold and settle, and random histories
//! where balance = available + held and holds never take available below zero.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Backend, CREDIT, Client, TestDb, balance, client, deduct};
use futures::future::join_all;
use proptest::prelude::*;
use reeve_proto::credits::v1 as pb;
use reeve_runtime::clock::ManualClock;
use reeve_testkit::on_both_stores;
use tonic::Code;
use tonic_types::StatusExt;

on_both_stores!(
    a_thousand_concurrent_holds_reserve_exactly_what_is_there,
    settles_below_at_and_above_the_hold_record_the_real_cost,
    a_settle_past_everything_available_leaves_a_debt_and_blocks_the_next_hold,
    a_concurrent_settle_and_release_resolve_once,
    a_hold_stops_reserving_at_its_instant_and_a_late_settle_still_charges,
    a_hold_keeps_what_it_reserved_of_a_lot_that_expires_under_it,
    a_restart_between_hold_and_settle_charges_nothing,
    hold_ids_are_idempotency_keys_and_batches_settle_each_item,
    another_users_hold_on_an_expired_hold_id_leaves_the_owner_whole,
    list_holds_pages_through_every_hold_once_newest_first,
    concurrent_balance_questions_each_get_their_own_users_answer,
);

const T0: i64 = 2_000_000_000_000_000;

async fn start_at(db: &TestDb, clock: &ManualClock) -> credits_svc::RunningServer {
    let forever = tokio_util::sync::CancellationToken::new();
    common::start_with_clock(db, clock, Duration::from_secs(3600), &forever).await
}

async fn grant(c: &mut Client, user: &str, micros: i64, key: &str, expires_at_us: Option<i64>) {
    c.add_credits(pb::AddCreditsRequest {
        user_id: user.into(),
        amount_micros: micros,
        idempotency_key: key.into(),
        kind: pb::CreditKind::Grant.into(),
        expires_at: expires_at_us.map(|us| prost_types::Timestamp {
            seconds: us / 1_000_000,
            nanos: 0,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn hold(
    c: &mut Client,
    user: &str,
    id: &str,
    micros: i64,
    ttl: i64,
) -> Result<pb::HoldResponse, tonic::Status> {
    c.hold(pb::HoldRequest {
        user_id: user.into(),
        hold_id: id.into(),
        amount_micros: micros,
        ttl_seconds: ttl,
        description: String::new(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn settle(
    c: &mut Client,
    id: &str,
    micros: i64,
) -> Result<pb::SettleHoldResponse, tonic::Status> {
    c.settle_hold(pb::SettleHoldRequest {
        hold_id: id.into(),
        amount_micros: micros,
        description: String::new(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn release(c: &mut Client, id: &str) -> Result<pb::ReleaseHoldResponse, tonic::Status> {
    c.release_hold(pb::ReleaseHoldRequest { hold_id: id.into() })
        .await
        .map(|r| r.into_inner())
}

async fn get_hold(c: &mut Client, id: &str) -> pb::Hold {
    c.get_hold(pb::GetHoldRequest { hold_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap()
}

async fn assert_audit_clean(db: &TestDb, user: &str) {
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let audit = store.audit(user).await.unwrap();
    assert_eq!(audit.cached, audit.entries_sum, "{user} drifted");
}

fn status(hold: &pb::Hold) -> pb::HoldStatus {
    pb::HoldStatus::try_from(hold.status).unwrap()
}

async fn a_thousand_concurrent_holds_reserve_exactly_what_is_there(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "many", 100 * CREDIT, "g", None).await;
    // A gateway's few HTTP/2 connections, each carrying many calls at once.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(client(server.local_addr).await);
    }
    let clients = &clients;
    let results = join_all((0..1_000).map(|i| async move {
        let mut c = clients[i % clients.len()].clone();
        hold(&mut c, "many", &format!("h-{i}"), CREDIT, 600).await
    }))
    .await;
    let addr = server.local_addr;
    let held = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(held, 100);
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        let info = refused.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.reason, "INSUFFICIENT_CREDITS");
        assert_eq!(info.metadata["held_micros"], (100 * CREDIT).to_string());
        assert_eq!(info.metadata["balance_micros"], (100 * CREDIT).to_string());
    }
    let b = balance(&mut c, "many").await;
    assert_eq!(
        (b.balance_micros, b.held_micros, b.available_micros),
        (100 * CREDIT, 100 * CREDIT, 0)
    );
    // A deduction cannot spend what holds reserve.
    let refused = deduct(&mut c, "many", 1, "d").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let ids: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.hold.as_ref().unwrap().hold_id.clone())
        .collect();
    join_all(ids.iter().map(|id| async move {
        let mut c = client(addr).await;
        release(&mut c, id).await.unwrap();
    }))
    .await;
    let b = balance(&mut c, "many").await;
    assert_eq!(
        (b.balance_micros, b.held_micros, b.available_micros),
        (100 * CREDIT, 0, 100 * CREDIT)
    );
    assert_audit_clean(&db, "many").await;
}

async fn settles_below_at_and_above_the_hold_record_the_real_cost(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "s", 20 * CREDIT, "g", None).await;
    // (held, settled): below, at, above the hold; each is one deduction entry.
    let mut expected = 20 * CREDIT;
    for (i, (held, cost)) in [(5, 3), (4, 4), (2, 6)].into_iter().enumerate() {
        let id = format!("call-{i}");
        hold(&mut c, "s", &id, held * CREDIT, 600).await.unwrap();
        let settled = settle(&mut c, &id, cost * CREDIT).await.unwrap();
        expected -= cost * CREDIT;
        let entry = settled.entry.unwrap();
        assert_eq!(entry.kind, pb::EntryKind::Deduction as i32);
        assert_eq!(entry.amount_micros, -cost * CREDIT);
        assert_eq!(entry.balance_after_micros, expected);
        assert_eq!(settled.shortfall_micros, 0);
        let h = settled.hold.unwrap();
        assert_eq!(status(&h), pb::HoldStatus::Settled);
        assert_eq!(h.settled_micros, cost * CREDIT);
        assert_eq!(h.entry_id, entry.id);
        let b = balance(&mut c, "s").await;
        assert_eq!((b.balance_micros, b.held_micros), (expected, 0));
        // A retried settle answers the stored result and writes nothing.
        let again = settle(&mut c, &id, cost * CREDIT).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.entry.unwrap().id, entry.id);
    }
    // Settling 0 is a release.
    hold(&mut c, "s", "zero", CREDIT, 600).await.unwrap();
    let zero = settle(&mut c, "zero", 0).await.unwrap();
    assert!(zero.entry.is_none());
    assert_eq!(status(&zero.hold.unwrap()), pb::HoldStatus::Released);
    assert_eq!(balance(&mut c, "s").await.balance_micros, expected);
    assert_audit_clean(&db, "s").await;
}

async fn a_settle_past_everything_available_leaves_a_debt_and_blocks_the_next_hold(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "d", 5 * CREDIT, "g", None).await;
    hold(&mut c, "d", "big", 3 * CREDIT, 600).await.unwrap();
    let settled = settle(&mut c, "d-missing", CREDIT).await.unwrap_err();
    assert_eq!(settled.code(), Code::NotFound);
    // The call ran and cost 9: the 3 held, the 2 available, and 4 of debt.
    let settled = settle(&mut c, "big", 9 * CREDIT).await.unwrap();
    assert_eq!(settled.shortfall_micros, 4 * CREDIT);
    assert_eq!(settled.entry.unwrap().balance_after_micros, -4 * CREDIT);
    let refused = hold(&mut c, "d", "next", 1, 600).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    // Repaid, holds pass again.
    grant(&mut c, "d", 6 * CREDIT, "g2", None).await;
    let b = balance(&mut c, "d").await;
    assert_eq!(
        (b.balance_micros, b.available_micros),
        (2 * CREDIT, 2 * CREDIT)
    );
    hold(&mut c, "d", "next", CREDIT, 600).await.unwrap();
    assert_audit_clean(&db, "d").await;
}

async fn a_concurrent_settle_and_release_resolve_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "race", 50 * CREDIT, "g", None).await;
    let addr = server.local_addr;
    for round in 0..10 {
        let id = format!("r-{round}");
        hold(&mut c, "race", &id, 2 * CREDIT, 600).await.unwrap();
        let (settled, released) = tokio::join!(
            async {
                let mut c = client(addr).await;
                settle(&mut c, &id, CREDIT).await
            },
            async {
                let mut c = client(addr).await;
                release(&mut c, &id).await
            }
        );
        let winners = [settled.is_ok(), released.is_ok()]
            .iter()
            .filter(|ok| **ok)
            .count();
        assert_eq!(winners, 1, "round {round}: {settled:?} {released:?}");
        let loser = settled.as_ref().err().or(released.as_ref().err()).unwrap();
        assert_eq!(loser.code(), Code::FailedPrecondition);
        let info = loser.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.reason, "HOLD_ALREADY_RESOLVED");
        // The loser's details carry the stored outcome; a replayed settle writes nothing.
        if settled.is_ok() {
            assert_eq!(info.metadata["status"], "settled");
            let replay = settle(&mut c, &id, CREDIT).await.unwrap();
            assert!(replay.duplicate);
        } else {
            assert_eq!(info.metadata["status"], "released");
        }
    }
    let history = c
        .history(pb::HistoryRequest {
            user_id: "race".into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let settles = history
        .iter()
        .filter(|e| e.kind == pb::EntryKind::Deduction as i32)
        .count() as i64;
    let b = balance(&mut c, "race").await;
    assert_eq!(b.balance_micros, 50 * CREDIT - settles * CREDIT);
    assert_eq!(b.held_micros, 0);
    assert_audit_clean(&db, "race").await;
}

async fn a_hold_stops_reserving_at_its_instant_and_a_late_settle_still_charges(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    let server = start_at(&db, &clock).await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "e", 10 * CREDIT, "g", None).await;
    hold(&mut c, "e", "ttl", 4 * CREDIT, 60).await.unwrap();
    clock.set(T0 + 60_000_000 - 1);
    assert_eq!(balance(&mut c, "e").await.available_micros, 6 * CREDIT);
    assert_eq!(status(&get_hold(&mut c, "ttl").await), pb::HoldStatus::Held);
    // At the instant: nothing reserved, before any sweep.
    clock.set(T0 + 60_000_000);
    assert_eq!(balance(&mut c, "e").await.available_micros, 10 * CREDIT);
    assert_eq!(
        status(&get_hold(&mut c, "ttl").await),
        pb::HoldStatus::Expired
    );
    let extend = c
        .extend_hold(pb::ExtendHoldRequest {
            hold_id: "ttl".into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(extend.code(), Code::FailedPrecondition);
    // A late settle still records the cost (the call ran), marked late.
    let late = settle(&mut c, "ttl", 3 * CREDIT).await.unwrap();
    let h = late.hold.unwrap();
    assert!(h.late);
    assert_eq!(status(&h), pb::HoldStatus::Settled);
    assert_eq!(balance(&mut c, "e").await.balance_micros, 7 * CREDIT);
    // An extension before the instant moves it.
    hold(&mut c, "e", "long", CREDIT, 10).await.unwrap();
    clock.advance(9_000_000);
    let extended = c
        .extend_hold(pb::ExtendHoldRequest {
            hold_id: "long".into(),
            ttl_seconds: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    clock.advance(50_000_000);
    assert_eq!(
        status(&get_hold(&mut c, "long").await),
        pb::HoldStatus::Held
    );
    assert_eq!(
        extended.expires_at.unwrap().seconds,
        (clock.now_us() - 50_000_000) / 1_000_000 + 100
    );
    assert_audit_clean(&db, "e").await;
}

async fn a_hold_keeps_what_it_reserved_of_a_lot_that_expires_under_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    let server = start_at(&db, &clock).await;
    let mut c = client(server.local_addr).await;
    let lot_expiry = T0 + 30_000_000;
    grant(&mut c, "x", 10 * CREDIT, "promo", Some(lot_expiry)).await;
    hold(&mut c, "x", "over", 6 * CREDIT, 600).await.unwrap();
    // The lot expires: its unreserved 4 leave now; the hold's 6 stay promised.
    clock.set(lot_expiry);
    let b = balance(&mut c, "x").await;
    assert_eq!(
        (b.balance_micros, b.held_micros, b.available_micros),
        (6 * CREDIT, 6 * CREDIT, 0)
    );
    // Settled below the hold: 5 drawn from the expired lot, the freed 1 expires.
    let settled = settle(&mut c, "over", 5 * CREDIT).await.unwrap();
    assert_eq!(
        settled
            .entry
            .unwrap()
            .draws
            .iter()
            .map(|d| d.amount_micros)
            .sum::<i64>(),
        5 * CREDIT
    );
    let b = balance(&mut c, "x").await;
    assert_eq!(
        (b.balance_micros, b.held_micros, b.available_micros),
        (0, 0, 0)
    );
    let history = c
        .history(pb::HistoryRequest {
            user_id: "x".into(),
            page_size: 20,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let expired: i64 = history
        .iter()
        .filter(|e| e.kind == pb::EntryKind::Expiration as i32)
        .map(|e| e.amount_micros)
        .sum();
    assert_eq!(expired, -5 * CREDIT);
    assert_audit_clean(&db, "x").await;
}

async fn a_restart_between_hold_and_settle_charges_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = credits_svc::Config {
        clock: clock.clock(),
        lot_sweep_interval: Duration::from_millis(10),
        ..db.config()
    };
    let first = credits_svc::start(config.clone(), shutdown.clone())
        .await
        .unwrap();
    {
        let mut c = client(first.local_addr).await;
        grant(&mut c, "k", 10 * CREDIT, "g", None).await;
        hold(&mut c, "k", "lost", 7 * CREDIT, 30).await.unwrap();
    }
    // The gateway that held dies; the service goes down with it.
    shutdown.cancel();
    first.wait().await.unwrap();
    clock.advance(31_000_000);
    let second = credits_svc::start(config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let mut c = client(second.local_addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let h = get_hold(&mut c, "lost").await;
    assert_eq!(status(&h), pb::HoldStatus::Expired);
    let b = balance(&mut c, "k").await;
    assert_eq!(
        (b.balance_micros, b.held_micros, b.available_micros),
        (10 * CREDIT, 0, 10 * CREDIT)
    );
    // The sweeper marked it expired in storage too.
    let stored = credits_svc::store::open(&db.url)
        .await
        .unwrap()
        .hold("lost")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, credits_svc::holds::HoldStatus::Expired);
    assert_audit_clean(&db, "k").await;
}

async fn hold_ids_are_idempotency_keys_and_batches_settle_each_item(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "b", 30 * CREDIT, "g", None).await;
    let first = hold(&mut c, "b", "same", 2 * CREDIT, 600).await.unwrap();
    let again = hold(&mut c, "b", "same", 2 * CREDIT, 600).await.unwrap();
    assert!(again.duplicate && !first.duplicate);
    // The same hold id for another request is refused: another amount, another user
    // with credits (nothing of theirs gets held), a user without.
    grant(&mut c, "b2", 30 * CREDIT, "g2", None).await;
    for (user, amount) in [("b", 3 * CREDIT), ("b2", 2 * CREDIT), ("other", 2 * CREDIT)] {
        let refused = hold(&mut c, user, "same", amount, 600).await.unwrap_err();
        assert_eq!(refused.code(), Code::AlreadyExists, "{user}");
    }
    assert_eq!(balance(&mut c, "b2").await.held_micros, 0);
    // A hold retried after it was settled (nothing of the user held any more) answers
    // the stored hold and reserves nothing again.
    let once = hold(&mut c, "b2", "once", CREDIT, 600).await.unwrap();
    assert!(!once.duplicate);
    settle(&mut c, "once", CREDIT / 2).await.unwrap();
    let replay = hold(&mut c, "b2", "once", CREDIT, 600).await.unwrap();
    assert!(replay.duplicate);
    assert_eq!(status(&replay.hold.unwrap()), pb::HoldStatus::Settled);
    let b2 = balance(&mut c, "b2").await;
    assert_eq!(
        (b2.balance_micros, b2.held_micros),
        (30 * CREDIT - CREDIT / 2, 0)
    );
    for bad in [
        ("b", "h\0", CREDIT, 600),
        ("b", "h", 0, 600),
        ("b", "h", CREDIT, 86_401),
        ("b\u{1}", "h", CREDIT, 600),
    ] {
        assert_eq!(
            hold(&mut c, bad.0, bad.1, bad.2, bad.3)
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
    }
    for i in 0..3 {
        hold(&mut c, "b", &format!("batch-{i}"), 2 * CREDIT, 600)
            .await
            .unwrap();
    }
    release(&mut c, "batch-2").await.unwrap();
    let items = vec![
        pb::SettleHoldRequest {
            hold_id: "batch-0".into(),
            amount_micros: CREDIT,
            description: String::new(),
        },
        pb::SettleHoldRequest {
            hold_id: "batch-1".into(),
            amount_micros: 3 * CREDIT,
            description: String::new(),
        },
        pb::SettleHoldRequest {
            hold_id: "batch-2".into(),
            amount_micros: CREDIT,
            description: String::new(),
        },
        pb::SettleHoldRequest {
            hold_id: "nope".into(),
            amount_micros: CREDIT,
            description: String::new(),
        },
        pb::SettleHoldRequest {
            hold_id: "batch-0".into(),
            amount_micros: CREDIT,
            description: String::new(),
        },
        // Hostile items fail alone: an id PostgreSQL cannot store, a description with
        // a control character, an amount past the cap.
        pb::SettleHoldRequest {
            hold_id: "batch-\0".into(),
            amount_micros: CREDIT,
            description: String::new(),
        },
        pb::SettleHoldRequest {
            hold_id: "batch-1".into(),
            amount_micros: CREDIT,
            description: "\u{7}".into(),
        },
        pb::SettleHoldRequest {
            hold_id: "batch-1".into(),
            amount_micros: i64::MAX,
            description: String::new(),
        },
    ];
    let outcomes = c
        .settle_hold_batch(pb::SettleHoldBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    use pb::settle_hold_outcome::Result as R;
    assert!(matches!(&outcomes[0].result, Some(R::Settled(s)) if !s.duplicate));
    assert!(
        matches!(&outcomes[1].result, Some(R::Settled(s)) if s.entry.as_ref().unwrap().amount_micros == -3 * CREDIT)
    );
    assert!(
        matches!(&outcomes[2].result, Some(R::AlreadyResolved(h)) if h.status == pb::HoldStatus::Released as i32)
    );
    assert!(matches!(&outcomes[3].result, Some(R::Invalid(i)) if i.code == "hold_not_found"));
    assert!(matches!(&outcomes[4].result, Some(R::Settled(s)) if s.duplicate));
    let codes: Vec<&str> = outcomes[5..]
        .iter()
        .map(|outcome| match &outcome.result {
            Some(R::Invalid(invalid)) => invalid.code.as_str(),
            other => panic!("a hostile item was not refused alone: {other:?}"),
        })
        .collect();
    assert_eq!(
        codes,
        [
            "invalid_idempotency_key",
            "invalid_description",
            "amount_overflow"
        ]
    );
    let b = balance(&mut c, "b").await;
    assert_eq!((b.balance_micros, b.held_micros), (26 * CREDIT, 2 * CREDIT));
    let listed = c
        .list_holds(pb::ListHoldsRequest {
            user_id: "b".into(),
            status: pb::HoldStatus::Settled.into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.holds.len(), 1);
    assert!(!listed.next_page_token.is_empty());
    assert_audit_clean(&db, "b").await;
}

#[derive(Debug, Clone)]
enum Step {
    Grant { credits: i64 },
    Hold { nth: usize, micros: i64, ttl_s: i64 },
    Settle { nth: usize, micros: i64 },
    Release { nth: usize },
    Deduct { micros: i64 },
    Advance { seconds: i64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1i64..10).prop_map(|credits| Step::Grant { credits }),
        (0usize..6, 1i64..8_000_000, 1i64..40).prop_map(|(nth, micros, ttl_s)| Step::Hold {
            nth,
            micros,
            ttl_s
        }),
        (0usize..6, 0i64..10_000_000).prop_map(|(nth, micros)| Step::Settle { nth, micros }),
        (0usize..6).prop_map(|nth| Step::Release { nth }),
        (1i64..6_000_000).prop_map(|micros| Step::Deduct { micros }),
        (1i64..20).prop_map(|seconds| Step::Advance { seconds }),
    ]
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
    let u = "p";
    for (i, step) in steps.into_iter().enumerate() {
        let before = balance(&mut c, u).await;
        match step {
            Step::Grant { credits } => {
                grant(&mut c, u, credits * CREDIT, &format!("g{i}"), None).await
            }
            Step::Hold { nth, micros, ttl_s } => {
                match hold(&mut c, u, &format!("h{nth}"), micros, ttl_s).await {
                    Ok(_) => {}
                    Err(status) => assert!(matches!(
                        status.code(),
                        Code::FailedPrecondition | Code::AlreadyExists
                    )),
                }
            }
            Step::Settle { nth, micros } => {
                if let Err(status) = settle(&mut c, &format!("h{nth}"), micros).await {
                    assert!(
                        matches!(status.code(), Code::FailedPrecondition | Code::NotFound),
                        "{status:?}"
                    );
                }
            }
            Step::Release { nth } => {
                if let Err(status) = release(&mut c, &format!("h{nth}")).await {
                    assert!(matches!(
                        status.code(),
                        Code::FailedPrecondition | Code::NotFound
                    ));
                }
            }
            Step::Deduct { micros } => {
                let outcome = deduct(&mut c, u, micros, &format!("d{i}")).await;
                assert_eq!(
                    outcome.is_ok(),
                    before.available_micros >= micros,
                    "a deduction spends only what is available"
                );
            }
            Step::Advance { seconds } => clock.advance(seconds * 1_000_000),
        }
        let after = balance(&mut c, u).await;
        assert_eq!(
            after.balance_micros,
            after.available_micros + after.held_micros
        );
        assert!(after.held_micros >= 0);
        if after.available_micros < 0 {
            // Only a settle past everything (a debt) can do that, never a hold.
            assert!(after.balance_micros < after.held_micros || before.available_micros < 0);
        }
        let audit = store.audit(u).await.unwrap();
        assert_eq!(audit.cached, audit.entries_sum);
    }
    shutdown.cancel();
    server.wait().await.unwrap();
}

fn run_property(backend: Backend) {
    common::run_histories(step(), 10, |steps| replay(backend, steps));
}

#[test]
fn postgres_random_histories_keep_balance_equal_to_available_plus_held() {
    run_property(Backend::Postgres);
}

#[test]
fn sqlite_random_histories_keep_balance_equal_to_available_plus_held() {
    run_property(Backend::Sqlite);
}

/// A hold id past its instant, not yet swept, named by another user's `Hold`: the
/// other user is refused and the owner's hold and lot are left as they are (the
/// owner is not locked by that call), so the owner can spend all of it once the hold
/// expires on their own next write.
async fn another_users_hold_on_an_expired_hold_id_leaves_the_owner_whole(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    let server = start_at(&db, &clock).await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "owner", 10 * CREDIT, "g-owner", None).await;
    grant(&mut c, "taker", 10 * CREDIT, "g-taker", None).await;
    hold(&mut c, "owner", "shared", 4 * CREDIT, 60)
        .await
        .unwrap();
    clock.set(T0 + 61_000_000);
    let refused = hold(&mut c, "taker", "shared", CREDIT, 60)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists);
    assert_eq!(balance(&mut c, "taker").await.held_micros, 0);
    assert_eq!(balance(&mut c, "owner").await.available_micros, 10 * CREDIT);
    let spent = deduct(&mut c, "owner", 10 * CREDIT, "all").await.unwrap();
    assert_eq!(spent.entry.unwrap().balance_after_micros, 0);
    assert_eq!(
        status(&get_hold(&mut c, "shared").await),
        pb::HoldStatus::Expired
    );
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let lots = store.lots("owner", true, T0 + 61_000_000).await.unwrap();
    assert!(lots.iter().all(|lot| lot.held.0 == 0), "{lots:?}");
    assert_audit_clean(&db, "owner").await;
}

/// A settle whose hold is made while the settle's batch waits on another user's row
/// lock: the batch looked for the hold's owner before the hold existed, so that owner
/// is not locked when the hold turns up. The batch plans again with the owner locked:
/// the settle draws from the owner's reserved lots, frees the rest, and its entry
/// says the owner's real balance. PostgreSQL only (SQLite writers are serialised).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_settle_of_a_hold_made_while_it_waits_draws_from_the_owner() {
    use credits_svc::holds::{HoldOp, HoldOutcome, HoldRequest};
    use reeve_runtime::Micros;

    let db = TestDb::new(Backend::Postgres).await;
    let clock = ManualClock::at(T0);
    let server = start_at(&db, &clock).await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "owner", 10 * CREDIT, "g-owner", None).await;
    grant(&mut c, "blocker", 10 * CREDIT, "g-blocker", None).await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let pool = reeve_runtime::db::postgres_pool(&db.url, 2).await.unwrap();
    let (blocking, blocker_pid) = common::lock_balance_row(&pool, "blocker").await;
    // One batch: settle a hold not made yet, and a hold of the blocked user.
    let batch = tokio::spawn({
        let store = std::sync::Arc::clone(&store);
        async move {
            let ops = [
                HoldOp::Settle {
                    hold_id: "made-meanwhile".into(),
                    amount: Micros(3 * CREDIT),
                    description: String::new(),
                },
                HoldOp::Hold(HoldRequest {
                    hold_id: "blocker-hold".into(),
                    user_id: "blocker".into(),
                    amount: Micros(CREDIT),
                    ttl_secs: 600,
                    description: String::new(),
                }),
            ];
            store.apply_holds(&ops, T0).await
        }
    });
    // It waits on the blocker's row (on this session, not on another test's lock),
    // its owner lookup done...
    common::wait_until_blocked_by(&pool, blocker_pid, "the batch").await;
    // ... when the hold it settles is made; then the blocker lets go.
    hold(&mut c, "owner", "made-meanwhile", 4 * CREDIT, 600)
        .await
        .unwrap();
    blocking.rollback().await.unwrap();
    let outcomes = batch.await.unwrap().unwrap();
    let HoldOutcome::Settled {
        hold,
        entry,
        duplicate,
    } = &outcomes[0]
    else {
        panic!("the settle was not applied: {:?}", outcomes[0]);
    };
    assert!(!duplicate);
    assert_eq!(hold.user_id, "owner");
    assert_eq!(
        (entry.user_id.as_str(), entry.balance_after),
        ("owner", Micros(7 * CREDIT))
    );
    assert!(matches!(outcomes[1], HoldOutcome::Hold { .. }));
    let owner = balance(&mut c, "owner").await;
    assert_eq!(
        (
            owner.balance_micros,
            owner.held_micros,
            owner.available_micros
        ),
        (7 * CREDIT, 0, 7 * CREDIT)
    );
    assert_eq!(balance(&mut c, "blocker").await.held_micros, CREDIT);
    assert_audit_clean(&db, "owner").await;
    assert_audit_clean(&db, "blocker").await;
}

/// ListHolds pages through a user's holds newest first, ties of one instant by id
/// (descending), each hold exactly once, with and without a status filter; another
/// user's holds never show.
async fn list_holds_pages_through_every_hold_once_newest_first(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    let server = start_at(&db, &clock).await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "pager", 100 * CREDIT, "g-pager", None).await;
    grant(&mut c, "neighbour", 10 * CREDIT, "g-neighbour", None).await;
    // Five holds of one instant, then three of the next second, another user's between.
    for id in ["p-c", "p-a", "p-e", "p-b", "p-d"] {
        hold(&mut c, "pager", id, CREDIT, 600).await.unwrap();
    }
    hold(&mut c, "neighbour", "p-n", CREDIT, 600).await.unwrap();
    clock.set(T0 + 1_000_000);
    for id in ["p-g", "p-h", "p-f"] {
        hold(&mut c, "pager", id, CREDIT, 600).await.unwrap();
    }
    settle(&mut c, "p-b", CREDIT).await.unwrap();
    settle(&mut c, "p-g", CREDIT).await.unwrap();
    let pages = |status: pb::HoldStatus| {
        let mut c = c.clone();
        async move {
            let mut seen = Vec::new();
            let mut token = String::new();
            loop {
                let page = c
                    .list_holds(pb::ListHoldsRequest {
                        user_id: "pager".into(),
                        status: status.into(),
                        page_size: 2,
                        page_token: token,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(page.holds.len() <= 2);
                seen.extend(page.holds.into_iter().map(|h| h.hold_id));
                if page.next_page_token.is_empty() {
                    return seen;
                }
                token = page.next_page_token;
            }
        }
    };
    assert_eq!(
        pages(pb::HoldStatus::Unspecified).await,
        ["p-h", "p-g", "p-f", "p-e", "p-d", "p-c", "p-b", "p-a"]
    );
    assert_eq!(
        pages(pb::HoldStatus::Held).await,
        ["p-h", "p-f", "p-e", "p-d", "p-c", "p-a"]
    );
    assert_eq!(pages(pb::HoldStatus::Settled).await, ["p-g", "p-b"]);
}

/// Many balance questions at once (PostgreSQL answers them in one statement per batch):
/// every answer is its own user's, with that user's lots, holds and instant, whichever
/// users share its batch; an unknown user is all zeros.
async fn concurrent_balance_questions_each_get_their_own_users_answer(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clock = ManualClock::at(T0);
    let server = start_at(&db, &clock).await;
    let mut c = client(server.local_addr).await;
    const USERS: i64 = 24;
    let expiry_us = T0 + 7_200_000_000;
    for i in 0..USERS {
        let user = format!("bq-{i:02}");
        grant(&mut c, &user, (i + 1) * CREDIT, &format!("g-{i}"), None).await;
        if i % 3 == 0 {
            grant(
                &mut c,
                &user,
                CREDIT / 2,
                &format!("e-{i}"),
                Some(expiry_us),
            )
            .await;
        }
        if i % 3 == 1 {
            // Half of them stop reserving before the questions are asked.
            let ttl = if i % 2 == 0 { 60 } else { 3_600 };
            hold(&mut c, &user, &format!("h-{i}"), (i + 1) * 1_000, ttl)
                .await
                .unwrap();
        }
    }
    clock.advance(120_000_000);
    let expected = |i: i64| {
        let balance = (i + 1) * CREDIT + if i % 3 == 0 { CREDIT / 2 } else { 0 };
        let held = if i % 3 == 1 && i % 2 == 1 {
            (i + 1) * 1_000
        } else {
            0
        };
        let next = if i % 3 == 0 { CREDIT / 2 } else { 0 };
        (balance, held, balance - held, next)
    };
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(client(server.local_addr).await);
    }
    let questions = (0..400_i64).map(|n| {
        let mut c = clients[usize::try_from(n % 8).unwrap()].clone();
        // Every 7th question is about a user nobody credited.
        let i = (n * 7) % (USERS + 1);
        async move {
            let user = if i == USERS {
                "bq-nobody".to_owned()
            } else {
                format!("bq-{i:02}")
            };
            (i, user.clone(), balance(&mut c, &user).await)
        }
    });
    for (i, user, answer) in join_all(questions).await {
        assert_eq!(answer.user_id, user);
        let got = (
            answer.balance_micros,
            answer.held_micros,
            answer.available_micros,
            answer.next_expiry_micros,
        );
        if i == USERS {
            assert_eq!(got, (0, 0, 0, 0), "{user}");
            assert_eq!(answer.paid_micros + answer.promotional_micros, 0, "{user}");
            continue;
        }
        assert_eq!(got, expected(i), "{user}");
        assert_eq!(
            answer.promotional_micros, answer.balance_micros,
            "{user}: grants are promotional"
        );
        assert_eq!(
            answer.next_expiry_at.map(|t| t.seconds),
            (i % 3 == 0).then_some(expiry_us / 1_000_000),
            "{user}"
        );
    }

    // GetBalances: the same answers, one per id in order, repeats and unknown users
    // included.
    let mut asked: Vec<String> = (0..USERS).rev().map(|i| format!("bq-{i:02}")).collect();
    asked.push("bq-nobody".to_owned());
    asked.push("bq-05".to_owned());
    let answers = c
        .get_balances(pb::GetBalancesRequest {
            user_ids: asked.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .balances;
    assert_eq!(answers.len(), asked.len());
    for (user, answer) in asked.iter().zip(&answers) {
        assert_eq!(&answer.user_id, user);
        let single = balance(&mut c, user).await;
        assert_eq!(answer, &single, "{user}");
    }
    assert_eq!(
        (answers[0].balance_micros, answers[0].held_micros),
        (expected(USERS - 1).0, expected(USERS - 1).1)
    );
    let empty = c
        .get_balances(pb::GetBalancesRequest { user_ids: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.balances.is_empty());
    // One invalid id refuses the call, naming its position; so do too many ids.
    let refused = c
        .get_balances(pb::GetBalancesRequest {
            user_ids: vec!["bq-00".into(), "bq-01".into(), "bq\u{7f}02".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("user_ids[2]"), "{refused:?}");
    let too_many = c
        .get_balances(pb::GetBalancesRequest {
            user_ids: vec!["bq-00".into(); 1_001],
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert_eq!(
        too_many.get_details_error_info().map(|info| info.reason),
        Some("TOO_MANY_USER_IDS".to_owned())
    );
}
