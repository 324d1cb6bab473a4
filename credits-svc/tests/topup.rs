//! Auto top-up's trigger on PostgreSQL and SQLite (issue 12): an attempt is created in
//! the transaction of the write that takes the available balance below the
//! threshold, one at a time per user whatever the concurrency, never past the
//! monthly cap, and not while backing off or suspended. (The worker, Stripe and the
//! webhook are exercised end to end in webhook-bridge's tests/topup.rs.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, CREDIT, Client, TestDb, client, deduct};
use credits_svc::events::CREDITS_BALANCE_LOW;
use credits_svc::ledger::{EntryKind, WriteRequest};
use credits_svc::topup::{AttemptState, Card, ChargeResult, TOPUP_SUCCEEDED};
use futures::future::join_all;
use reeve_events::EventStore;
use reeve_proto::credits::v1 as pb;
use reeve_runtime::Micros;
use reeve_testkit::on_both_stores;

on_both_stores!(
    one_attempt_and_one_balance_low_from_100_concurrent_deductions_crossing_the_threshold,
    the_monthly_cap_is_never_exceeded_and_a_new_month_starts_afresh,
    no_attempt_without_a_card_while_disabled_or_backing_off,
    settings_are_refused_whole_and_nothing_is_written,
    an_attempt_without_an_answer_is_resent_only_while_its_key_holds,
    refunds_and_disputes_never_charge_the_card_again,
    disabling_withdraws_an_attempt_no_worker_has_sent,
    a_payment_webhook_answers_only_the_attempt_it_belongs_to,
);

fn card() -> Card {
    Card {
        customer_id: "cus_test".into(),
        payment_method_id: "pm_test".into(),
    }
}

fn settings(user: &str, threshold: i64, amount: i64, cap: i64) -> pb::SetAutoTopUpRequest {
    pb::SetAutoTopUpRequest {
        user_id: user.into(),
        enabled: true,
        threshold_micros: threshold * CREDIT,
        amount_micros: amount * CREDIT,
        monthly_cap_micros: cap * CREDIT,
    }
}

/// Turns auto top-up on or off with the usual test settings (below 10 credits, buy 5,
/// at most 1,000 a month).
async fn switch(c: &mut Client, user: &str, enabled: bool) {
    c.set_auto_top_up(pb::SetAutoTopUpRequest {
        enabled,
        ..settings(user, 10, 5, 1_000)
    })
    .await
    .unwrap();
}

fn grant(user: &str, credits: i64, key: &str) -> WriteRequest {
    WriteRequest::caller(user, EntryKind::Grant, Micros(credits * CREDIT), key, "")
}

fn deduction(user: &str, micros: i64, key: &str) -> WriteRequest {
    WriteRequest::caller(user, EntryKind::Deduction, Micros(-micros), key, "")
}

async fn one_attempt_and_one_balance_low_from_100_concurrent_deductions_crossing_the_threshold(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let mut c = client(server.local_addr).await;
    c.set_auto_top_up(settings("alice", 50, 25, 100))
        .await
        .unwrap();
    let now = reeve_runtime::clock::now_us();
    assert!(
        store
            .topups()
            .save_card("alice", "pi_saved", &card(), now)
            .await
            .unwrap()
    );
    c.set_balance_alert(pb::SetBalanceAlertRequest {
        user_id: "alice".into(),
        threshold_micros: 50 * CREDIT,
    })
    .await
    .unwrap();
    store
        .apply(&[grant("alice", 100, "g1")], now)
        .await
        .unwrap();

    let calls = (0..100).map(|i| {
        let mut c = c.clone();
        async move {
            deduct(&mut c, "alice", 900_000, &format!("d{i}"))
                .await
                .unwrap();
        }
    });
    join_all(calls).await;

    let attempts = store.topups().attempts("alice").await.unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    assert_eq!(attempts[0].state, AttemptState::Pending);
    assert_eq!(attempts[0].amount, Micros(25 * CREDIT));
    assert_eq!(attempts[0].card, card());
    let events = EventStore::open(&db.url)
        .await
        .unwrap()
        .outbox(0, 10_000)
        .await
        .unwrap();
    let low: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == CREDITS_BALANCE_LOW)
        .collect();
    assert_eq!(low.len(), 1);
    let view = c
        .get_auto_top_up(pb::GetAutoTopUpRequest {
            user_id: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(view.enabled && view.payment_method_saved && !view.suspended);
    assert_eq!(view.month_used_micros, 25 * CREDIT);
    assert_eq!(view.last_attempt.unwrap().state, "pending");
}

async fn the_monthly_cap_is_never_exceeded_and_a_new_month_starts_afresh(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let mut c = client(server.local_addr).await;
    c.set_auto_top_up(settings("bob", 10, 25, 60))
        .await
        .unwrap();
    // 2031-01-15T00:00:00Z, and 2031-02-01T00:00:00Z.
    let mid_january: i64 = 1_926_201_600_000_000;
    let february: i64 = 1_927_670_400_000_000;
    let topups = store.topups();
    topups
        .save_card("bob", "pi_saved", &card(), mid_january)
        .await
        .unwrap();
    store
        .apply(&[grant("bob", 20, "g0")], mid_january)
        .await
        .unwrap();
    // Each round: go below 10, the attempt succeeds (as the worker records it), and
    // the balance is raised again.
    let mut at = mid_january;
    for round in 0..3 {
        at += 1_000_000;
        store
            .apply(
                &[deduction("bob", 15 * CREDIT, &format!("below-{round}"))],
                at,
            )
            .await
            .unwrap();
        let claimed = topups.claim(at, 60_000_000, 10).await.unwrap();
        if round < 2 {
            assert_eq!(claimed.len(), 1, "round {round}: 25 × {} ≤ 60", round + 1);
            let result = ChargeResult::Succeeded {
                payment_intent_id: format!("pi_{round}"),
            };
            assert!(topups.record(&claimed[0], &result, at).await.unwrap());
        } else {
            assert!(claimed.is_empty(), "a third 25 would make 75 > 60");
        }
        store
            .apply(&[grant("bob", 15, &format!("up-{round}"))], at)
            .await
            .unwrap();
    }
    let attempts = topups.attempts("bob").await.unwrap();
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|a| a.state == AttemptState::Succeeded));
    let events = EventStore::open(&db.url)
        .await
        .unwrap()
        .outbox(0, 10_000)
        .await
        .unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == TOPUP_SUCCEEDED)
            .count(),
        2
    );
    // February: the cap applies to February's top-ups only.
    store
        .apply(&[deduction("bob", 15 * CREDIT, "feb")], february)
        .await
        .unwrap();
    assert_eq!(topups.attempts("bob").await.unwrap().len(), 3);
    assert_eq!(
        topups.view("bob", february).await.unwrap().month_used,
        Micros(25 * CREDIT)
    );
}

async fn no_attempt_without_a_card_while_disabled_or_backing_off(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let mut c = client(server.local_addr).await;
    let topups = store.topups();
    let t0: i64 = 2_000_000_000_000_000;
    switch(&mut c, "carol", true).await;
    store.apply(&[grant("carol", 100, "g")], t0).await.unwrap();
    // No card: nothing.
    store
        .apply(&[deduction("carol", 95 * CREDIT, "d1")], t0)
        .await
        .unwrap();
    assert!(topups.attempts("carol").await.unwrap().is_empty());
    // A card, but disabled: nothing.
    topups
        .save_card("carol", "pi_card", &card(), t0)
        .await
        .unwrap();
    switch(&mut c, "carol", false).await;
    store
        .apply(&[deduction("carol", CREDIT, "d2")], t0)
        .await
        .unwrap();
    assert!(topups.attempts("carol").await.unwrap().is_empty());
    // Enabled: one; declined, so an hour of back-off.
    switch(&mut c, "carol", true).await;
    store
        .apply(&[deduction("carol", CREDIT, "d3")], t0)
        .await
        .unwrap();
    let claimed = topups.claim(t0, 60_000_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let declined = ChargeResult::Declined {
        code: "card_declined".into(),
        message: "declined".into(),
        payment_intent_id: None,
    };
    assert!(topups.record(&claimed[0], &declined, t0).await.unwrap());
    let hour = 3_600 * 1_000_000;
    store
        .apply(&[deduction("carol", 1, "d4")], t0 + hour - 1)
        .await
        .unwrap();
    assert_eq!(topups.attempts("carol").await.unwrap().len(), 1);
    store
        .apply(&[deduction("carol", 1, "d5")], t0 + hour)
        .await
        .unwrap();
    assert_eq!(topups.attempts("carol").await.unwrap().len(), 2);
    // A recorded answer is not recorded twice (a second worker's late answer).
    assert!(!topups.record(&claimed[0], &declined, t0).await.unwrap());
}

async fn settings_are_refused_whole_and_nothing_is_written(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    let cases = [
        (settings("dave", 0, 5, 10), "INVALID_THRESHOLD"),
        (settings("dave", -1, 5, 10), "INVALID_THRESHOLD"),
        (
            pb::SetAutoTopUpRequest {
                threshold_micros: 1,
                ..settings("dave", 1, 5, 10)
            },
            "INVALID_THRESHOLD",
        ),
        (settings("dave", 10, 0, 10), "INVALID_TOPUP_AMOUNT"),
        (settings("dave", 10, 1_000_000, 10), "INVALID_TOPUP_AMOUNT"),
        (settings("dave", 10, 5, 0), "INVALID_MONTHLY_CAP"),
        (
            pb::SetAutoTopUpRequest {
                monthly_cap_micros: i64::MAX,
                ..settings("dave", 10, 5, 10)
            },
            "INVALID_MONTHLY_CAP",
        ),
        (settings("dave\u{0}", 10, 5, 10), "INVALID_USER_ID"),
    ];
    for (request, reason) in cases {
        let status = c.set_auto_top_up(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let details = tonic_types::StatusExt::get_error_details(&status);
        assert_eq!(details.error_info().unwrap().reason, reason);
    }
    let view = c
        .get_auto_top_up(pb::GetAutoTopUpRequest {
            user_id: "dave".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!view.configured && !view.enabled && view.last_attempt.is_none());
}

/// An attempt Stripe never answered definitively is claimed again after each lease
/// (the same request under the same Idempotency-Key), but only within the resend
/// window: later the key may be gone and a resend could charge twice, so it stays
/// `processing`, still blocking a second attempt for its user.
async fn an_attempt_without_an_answer_is_resent_only_while_its_key_holds(backend: Backend) {
    use credits_svc::store::topup::RESEND_WINDOW_US;
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let mut c = client(server.local_addr).await;
    let topups = store.topups();
    let t0: i64 = 2_000_000_000_000_000;
    let lease = 60_000_000;
    switch(&mut c, "dora", true).await;
    store.apply(&[grant("dora", 20, "g")], t0).await.unwrap();
    topups
        .save_card("dora", "pi_card", &card(), t0)
        .await
        .unwrap();
    store
        .apply(&[deduction("dora", 15 * CREDIT, "d1")], t0)
        .await
        .unwrap();
    let first = topups.claim(t0, lease, 10).await.unwrap();
    assert_eq!(first.len(), 1);
    let unknown = ChargeResult::Unknown("HTTP 500: api_error".into());
    assert!(!topups.record(&first[0], &unknown, t0).await.unwrap());
    assert!(
        topups
            .claim(t0 + lease - 1, lease, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = topups.claim(t0 + lease, lease, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt_id, first[0].attempt_id, "the same key");
    // Past the window: never sent again, and no second attempt either.
    let late = t0 + RESEND_WINDOW_US + 1;
    assert!(topups.claim(late, lease, 10).await.unwrap().is_empty());
    store
        .apply(&[deduction("dora", CREDIT, "d2")], late)
        .await
        .unwrap();
    let attempts = topups.attempts("dora").await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].state, AttemptState::Processing);
}

/// Money Stripe takes back never triggers a top-up: a refund or a dispute taking the
/// balance below the threshold makes no attempt (buying the refunded credits back, or
/// charging a card while it is disputed); the next deduction below it does.
async fn refunds_and_disputes_never_charge_the_card_again(backend: Backend) {
    use pb::PaymentEventKind as Kind;
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let mut c = client(server.local_addr).await;
    let topups = store.topups();
    let now = reeve_runtime::clock::now_us();
    switch(&mut c, "rita", true).await;
    topups
        .save_card("rita", "pi_card", &card(), now)
        .await
        .unwrap();
    let event = |kind: Kind, amount: i64, object: &str| pb::PaymentEventRequest {
        kind: kind as i32,
        payment_id: "pi_rita".into(),
        user_id: "rita".into(),
        amount_micros: amount * CREDIT,
        object_id: object.into(),
        ..Default::default()
    };
    c.record_payment_event(event(Kind::PaymentSucceeded, 20, ""))
        .await
        .unwrap();
    // 20 − 12 refunded = 8 < 10; − 3 disputed = 5.
    c.record_payment_event(event(Kind::Refunded, 12, "ch_rita"))
        .await
        .unwrap();
    c.record_payment_event(event(Kind::DisputeFundsWithdrawn, 3, "dp_rita"))
        .await
        .unwrap();
    assert_eq!(
        store.balance("rita", now).await.unwrap().balance,
        Micros(5 * CREDIT)
    );
    assert!(topups.attempts("rita").await.unwrap().is_empty());
    // Back above, then a deduction below: that one charges.
    store.apply(&[grant("rita", 10, "g")], now).await.unwrap();
    store
        .apply(&[deduction("rita", 6 * CREDIT, "d")], now)
        .await
        .unwrap();
    assert_eq!(topups.attempts("rita").await.unwrap().len(), 1);
}

async fn disabling_withdraws_an_attempt_no_worker_has_sent(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let mut c = client(server.local_addr).await;
    let topups = store.topups();
    let t0: i64 = 2_000_000_000_000_000;
    switch(&mut c, "dora", true).await;
    topups
        .save_card("dora", "pi_card", &card(), t0)
        .await
        .unwrap();
    store.apply(&[grant("dora", 20, "g")], t0).await.unwrap();
    store
        .apply(&[deduction("dora", 15 * CREDIT, "d1")], t0)
        .await
        .unwrap();
    assert_eq!(
        topups.attempts("dora").await.unwrap()[0].state,
        AttemptState::Pending
    );
    // The user turns it off before any worker picked the attempt up: never sent.
    switch(&mut c, "dora", false).await;
    assert!(
        topups
            .claim(t0 + 1, 60_000_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let withdrawn = topups.attempts("dora").await.unwrap();
    assert_eq!(withdrawn.len(), 1);
    assert_eq!(withdrawn[0].state, AttemptState::Failed);
    assert_eq!(
        withdrawn[0].failure_code.as_deref(),
        Some(credits_svc::store::topup::DISABLED_CODE)
    );
    let view = topups.view("dora", t0 + 1).await.unwrap();
    assert_eq!(
        view.month_used,
        Micros(0),
        "a withdrawn attempt uses no cap"
    );
    assert_eq!(view.consecutive_failures, 0, "nor counts as a decline");
    // Disabled, writes make nothing; enabled again, the next write makes a new one.
    store
        .apply(&[deduction("dora", 1, "d2")], t0 + 2)
        .await
        .unwrap();
    assert_eq!(topups.attempts("dora").await.unwrap().len(), 1);
    switch(&mut c, "dora", true).await;
    store
        .apply(&[deduction("dora", 1, "d3")], t0 + 3)
        .await
        .unwrap();
    let claimed = topups.claim(t0 + 3, 60_000_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].amount, Micros(5 * CREDIT));
    // A claimed attempt is already on its way to Stripe: disabling leaves it be.
    switch(&mut c, "dora", false).await;
    let attempt = topups
        .attempt(&claimed[0].attempt_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(attempt.state, AttemptState::Processing);
    // Stripe asks for the user's action; it waits in flight, so nothing new is made...
    switch(&mut c, "dora", true).await;
    let action = ChargeResult::RequiresAction {
        payment_intent_id: "pi_action".into(),
        action_url: Some("https://stripe.example/3ds".into()),
    };
    assert!(topups.record(&claimed[0], &action, t0 + 4).await.unwrap());
    store
        .apply(&[deduction("dora", 1, "d4")], t0 + 5)
        .await
        .unwrap();
    assert_eq!(topups.attempts("dora").await.unwrap().len(), 2);
    // ...until the user turns auto top-up off, which withdraws it; on again, the next
    // write makes a new attempt.
    switch(&mut c, "dora", false).await;
    let waited = topups
        .attempt(&claimed[0].attempt_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(waited.state, AttemptState::Failed);
    assert_eq!(
        waited.failure_code.as_deref(),
        Some(credits_svc::store::topup::DISABLED_CODE)
    );
    switch(&mut c, "dora", true).await;
    store
        .apply(&[deduction("dora", 1, "d5")], t0 + 6)
        .await
        .unwrap();
    let attempts = topups.attempts("dora").await.unwrap();
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts
            .iter()
            .any(|a| a.state == AttemptState::Pending && a.attempt_id != claimed[0].attempt_id)
    );
    // The user completes the withdrawn one after all: its own payment completes it,
    // another payment does not, nor does any payment complete one never sent.
    let never_sent = attempts
        .iter()
        .find(|a| a.failure_code.is_some() && a.attempt_id != claimed[0].attempt_id)
        .unwrap();
    for (attempt, payment) in [
        (&claimed[0].attempt_id, "pi_other"),
        (&never_sent.attempt_id, "pi_stray"),
    ] {
        assert!(
            !topups
                .complete(attempt, "dora", payment, t0 + 7)
                .await
                .unwrap()
        );
    }
    assert!(
        topups
            .complete(&claimed[0].attempt_id, "dora", "pi_action", t0 + 7)
            .await
            .unwrap()
    );
    let paid = topups
        .attempt(&claimed[0].attempt_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(paid.state, AttemptState::Succeeded);
}

/// A ledger write that read the settings as enabled is still open (its balance row
/// locked, its attempt written) when the user disables auto top-up: the disable waits
/// for it and withdraws the attempt, so no worker can charge it. (PostgreSQL: SQLite
/// has a single writer.) The open write is played by hand: the lock and the insert it
/// makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disabling_during_a_write_that_creates_an_attempt_withdraws_it() {
    let db = TestDb::new(Backend::Postgres).await;
    let server = db.start().await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let mut c = client(server.local_addr).await;
    let topups = store.topups();
    let t0: i64 = 2_000_000_000_000_000;
    switch(&mut c, "eve", true).await;
    topups
        .save_card("eve", "pi_card", &card(), t0)
        .await
        .unwrap();
    store.apply(&[grant("eve", 20, "g")], t0).await.unwrap();
    let pool = reeve_runtime::db::postgres_pool(&db.url, 2).await.unwrap();
    let mut write = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM credit_accounts WHERE user_id = 'eve' FOR UPDATE")
        .execute(&mut *write)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO credit_topup_attempts (attempt_id, user_id, amount_micros, state, \
         customer_id, payment_method_id, created_at_us, updated_at_us) \
         VALUES ('tu_in_flight', 'eve', 5000000, 'pending', 'cus_test', 'pm_test', $1, $1)",
    )
    .bind(t0)
    .execute(&mut *write)
    .await
    .unwrap();
    let addr = server.local_addr;
    let disable = tokio::spawn(async move {
        client(addr)
            .await
            .set_auto_top_up(pb::SetAutoTopUpRequest {
                enabled: false,
                ..settings("eve", 10, 5, 1_000)
            })
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !disable.is_finished(),
        "the disable waits for the open write"
    );
    write.commit().await.unwrap();
    disable.await.unwrap().unwrap();
    assert!(
        topups
            .claim(t0 + 1, 60_000_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let attempt = topups.attempt("tu_in_flight").await.unwrap().unwrap();
    assert_eq!(attempt.state, AttemptState::Failed);
    assert_eq!(
        attempt.failure_code.as_deref(),
        Some(credits_svc::store::topup::DISABLED_CODE)
    );
}

/// `payment_intent.payment_failed` / `.canceled` (`answer_from_webhook` with a decline) and
/// `payment_intent.succeeded` (`complete`) against every state an attempt can be in,
/// as a table: a failure ends only an attempt of this user and payment that is in
/// flight at Stripe (sent, or waiting for the user's action), once, as a decline; a
/// success completes its attempt even after a failure on the same payment.
async fn a_payment_webhook_answers_only_the_attempt_it_belongs_to(backend: Backend) {
    #[derive(Clone, Copy, Debug)]
    enum Start {
        Pending,
        Processing,
        WaitingOn(&'static str),
        Succeeded,
        FailedOn(&'static str),
    }
    #[derive(Clone, Copy, Debug)]
    enum Answer {
        Fail {
            user: &'static str,
            pi: &'static str,
        },
        Pay {
            pi: &'static str,
        },
    }
    use Answer::{Fail, Pay};
    use Start::{FailedOn, Pending, Processing, Succeeded, WaitingOn};
    // (starting state, webhook, whether it answers, state after, declines after)
    let cases: [(Start, Answer, bool, AttemptState, i32); 11] = [
        (
            WaitingOn("pi_a"),
            Fail {
                user: "",
                pi: "pi_a",
            },
            true,
            AttemptState::Failed,
            1,
        ),
        (
            WaitingOn(""),
            Fail {
                user: "",
                pi: "pi_a",
            },
            true,
            AttemptState::Failed,
            1,
        ),
        (
            WaitingOn("pi_a"),
            Fail {
                user: "",
                pi: "pi_b",
            },
            false,
            AttemptState::RequiresAction,
            0,
        ),
        (
            WaitingOn("pi_a"),
            Fail {
                user: "mallory",
                pi: "pi_a",
            },
            false,
            AttemptState::RequiresAction,
            0,
        ),
        (
            Processing,
            Fail {
                user: "",
                pi: "pi_a",
            },
            true,
            AttemptState::Failed,
            1,
        ),
        (
            Succeeded,
            Fail {
                user: "",
                pi: "pi_a",
            },
            false,
            AttemptState::Succeeded,
            0,
        ),
        (
            FailedOn("pi_a"),
            Fail {
                user: "",
                pi: "pi_a",
            },
            false,
            AttemptState::Failed,
            1,
        ),
        (
            FailedOn("pi_a"),
            Pay { pi: "pi_a" },
            true,
            AttemptState::Succeeded,
            0,
        ),
        (
            FailedOn("pi_a"),
            Pay { pi: "pi_b" },
            false,
            AttemptState::Failed,
            1,
        ),
        (
            WaitingOn("pi_a"),
            Pay { pi: "pi_a" },
            true,
            AttemptState::Succeeded,
            0,
        ),
        // Last: an attempt left pending would be claimed by the next case.
        (
            Pending,
            Fail {
                user: "",
                pi: "pi_a",
            },
            false,
            AttemptState::Pending,
            0,
        ),
    ];
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let mut c = client(server.local_addr).await;
    let topups = store.topups();
    let t0: i64 = 2_000_000_000_000_000;
    let declined = |pi: &str| ChargeResult::Declined {
        code: "payment_intent_authentication_failure".into(),
        message: "failed authentication".into(),
        payment_intent_id: Some(pi.into()),
    };
    for (case, (start, answer, answers, after, declines)) in cases.into_iter().enumerate() {
        let user = format!("user{case}");
        switch(&mut c, &user, true).await;
        topups
            .save_card(&user, &format!("pi_card{case}"), &card(), t0)
            .await
            .unwrap();
        store
            .apply(&[grant(&user, 20, &format!("g{case}"))], t0)
            .await
            .unwrap();
        store
            .apply(&[deduction(&user, 15 * CREDIT, &format!("d{case}"))], t0)
            .await
            .unwrap();
        let made = topups.attempts(&user).await.unwrap();
        assert_eq!(made.len(), 1, "case {case}");
        let attempt_id = made[0].attempt_id.clone();
        if !matches!(start, Pending) {
            let claimed = topups.claim(t0, 60_000_000, 10).await.unwrap();
            assert_eq!(claimed.len(), 1, "case {case}");
            let stripe = match start {
                WaitingOn(pi) => Some(ChargeResult::RequiresAction {
                    payment_intent_id: pi.into(),
                    action_url: None,
                }),
                Succeeded => Some(ChargeResult::Succeeded {
                    payment_intent_id: "pi_a".into(),
                }),
                FailedOn(pi) => Some(declined(pi)),
                Pending | Processing => None,
            };
            if let Some(result) = stripe {
                assert!(
                    topups.record(&claimed[0], &result, t0).await.unwrap(),
                    "case {case}"
                );
            }
        }
        let failures_before = topups.view(&user, t0).await.unwrap().consecutive_failures;
        let at = t0 + 1;
        let answered = match answer {
            Fail { user: other, pi } => {
                let owner = if other.is_empty() {
                    user.as_str()
                } else {
                    other
                };
                topups
                    .answer_from_webhook(&attempt_id, owner, &declined(pi), at)
                    .await
                    .unwrap()
            }
            Pay { pi } => topups.complete(&attempt_id, &user, pi, at).await.unwrap(),
        };
        assert_eq!(answered, answers, "case {case}: {start:?} {answer:?}");
        let attempt = topups.attempt(&attempt_id).await.unwrap().unwrap();
        assert_eq!(attempt.state, after, "case {case}: {start:?} {answer:?}");
        let view = topups.view(&user, at).await.unwrap();
        assert_eq!(
            view.consecutive_failures, declines,
            "case {case}: {start:?} {answer:?}"
        );
        if answers && after == AttemptState::Failed {
            assert_eq!(
                failures_before + 1,
                declines,
                "case {case}: one decline more"
            );
            assert_eq!(
                attempt.failure_code.as_deref(),
                Some("payment_intent_authentication_failure")
            );
            assert!(view.retry_after_us > at, "case {case}: backs off");
            // The worker's own answer to an attempt failed here records nothing.
            if matches!(start, Processing) {
                let paid = ChargeResult::Succeeded {
                    payment_intent_id: "pi_a".into(),
                };
                assert!(
                    !topups.record(&attempt, &paid, at).await.unwrap(),
                    "case {case}"
                );
            }
        }
    }

    // Three declines suspend auto top-up; the last one's payment succeeding after all
    // lifts the suspension with the declines.
    let user = "sue";
    switch(&mut c, user, true).await;
    topups
        .save_card(user, "pi_card_sue", &card(), t0)
        .await
        .unwrap();
    store.apply(&[grant(user, 20, "g_sue")], t0).await.unwrap();
    let mut at = t0;
    let mut last = None;
    for n in 0..credits_svc::topup::SUSPEND_AFTER_DECLINES {
        let micros = if n == 0 { 15 * CREDIT } else { 1 };
        store
            .apply(&[deduction(user, micros, &format!("d_sue{n}"))], at)
            .await
            .unwrap();
        // (The table's last attempt, left pending, is claimed here too.)
        let claimed: Vec<_> = topups
            .claim(at, 60_000_000, 10)
            .await
            .unwrap()
            .into_iter()
            .filter(|attempt| attempt.user_id == user)
            .collect();
        assert_eq!(claimed.len(), 1, "decline {n}");
        let pi = format!("pi_sue{n}");
        assert!(
            topups
                .record(&claimed[0], &declined(&pi), at)
                .await
                .unwrap()
        );
        last = Some((claimed[0].attempt_id.clone(), pi));
        at += credits_svc::topup::BACKOFF_US + 1;
    }
    let view = topups.view(user, at).await.unwrap();
    assert!(view.suspended.is_some(), "{view:?}");
    let (attempt_id, pi) = last.unwrap();
    assert!(topups.complete(&attempt_id, user, &pi, at).await.unwrap());
    let view = topups.view(user, at).await.unwrap();
    assert_eq!(view.suspended, None, "{view:?}");
    assert_eq!(view.consecutive_failures, 0);
}
