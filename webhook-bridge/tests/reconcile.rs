//! Reconciliation against Stripe (issue 13), end to end: the fake Stripe with dropped
//! and late webhooks, real signatures, the real bridge and credits-svc over loopback,
//! on PostgreSQL and SQLite. Each test names the guarantee it proves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{Backend, STRIPE_KEY, Stack};
use reeve_proto::credits::v1 as credits_pb;
use reeve_testkit::on_both_stores;
use serde_json::Value;
use webhook_bridge::stripe::reconcile::{Class, Reconciler, Report, StripeApi, Window};

const CREDIT: i64 = 1_000_000;

async fn reconciler(stack: &Stack) -> Reconciler {
    Reconciler {
        stripe: StripeApi::new(&STRIPE_KEY.to_owned().into(), &stack.fake.api_base()).unwrap(),
        credits: stack.credits_client().await,
        events: Some(stack.bridge.events.clone()),
        currency: "usd".to_owned(),
    }
}

fn window() -> Window {
    let now = fake_stripe::now_secs();
    Window {
        since: now - 3_600,
        until: now + 60,
    }
}

/// A succeeded payment at the fake Stripe (its webhook sent unless webhooks are off).
async fn pay(stack: &Stack, user: Option<&str>, cents: i64, currency: &str) -> String {
    let amount = cents.to_string();
    let mut form = vec![("amount", amount.as_str()), ("currency", currency)];
    if let Some(user) = user {
        form.push(("metadata[user_id]", user));
    }
    let paid = common::json_of(
        stack
            .http
            .post(format!(
                "{}v1/test_helpers/payment_intents",
                stack.fake.api_base()
            ))
            .bearer_auth(STRIPE_KEY)
            .form(&form),
    )
    .await;
    assert!(
        paid["delivery"]["status"] == 200 || paid["delivery"]["status"] == "dropped",
        "{paid}"
    );
    paid["id"].as_str().unwrap().to_owned()
}

async fn stripe_post(stack: &Stack, path: &str, form: &[(&str, &str)]) -> Value {
    common::json_of(
        stack
            .http
            .post(format!("{}v1/{path}", stack.fake.api_base()))
            .bearer_auth(STRIPE_KEY)
            .form(form),
    )
    .await
}

async fn refund(stack: &Stack, pi: &str, cents: Option<i64>) -> String {
    let amount = cents.map(|c| c.to_string());
    let mut form = vec![("payment_intent", pi)];
    if let Some(amount) = &amount {
        form.push(("amount", amount.as_str()));
    }
    let refund = stripe_post(stack, "refunds", &form).await;
    refund["charge"].as_str().unwrap().to_owned()
}

async fn dispute(stack: &Stack, pi: &str, status: &str) -> String {
    let opened = stripe_post(
        stack,
        "test_helpers/disputes",
        &[("payment_intent", pi), ("status", status)],
    )
    .await;
    opened["dispute"]["id"].as_str().unwrap().to_owned()
}

async fn close(stack: &Stack, dispute: &str, outcome: &str) {
    let closed = stripe_post(
        stack,
        &format!("test_helpers/disputes/{dispute}/close"),
        &[("outcome", outcome)],
    )
    .await;
    assert!(closed["dispute"]["status"].is_string(), "{closed}");
}

/// Each Stripe id with its class and amount.
fn by_id(report: &Report) -> BTreeMap<String, (Class, i64)> {
    report
        .items
        .iter()
        .map(|i| (i.stripe_id.clone(), (i.class, i.amount_micros)))
        .collect()
}

fn remaining(report: &Report) -> Vec<(Class, String)> {
    let mut left: Vec<(Class, String)> = report
        .remaining()
        .map(|i| (i.class, i.stripe_id.clone()))
        .collect();
    left.sort();
    left
}

/// Webhooks dropped for payments, a refund and a reinstatement; a payment in euros; a
/// payment without a user; a purchase Stripe does not know: the report names each
/// exactly, `--repair` fixes the certain ones, and neither a second repair nor the
/// late webhooks change a micro.
async fn the_report_names_each_difference_and_repair_fixes_only_the_certain(backend: Backend) {
    let stack = Stack::start(backend).await;
    let reconciler = reconciler(&stack).await;
    let ok = pay(&stack, Some("alice"), 2500, "usd").await;
    let refunded = pay(&stack, Some("carol"), 2500, "usd").await;
    let disputed = pay(&stack, Some("dan"), 2000, "usd").await;
    let dispute_id = dispute(&stack, &disputed, "needs_response").await;
    let euros = pay(&stack, Some("erin"), 700, "eur").await;
    let anonymous = pay(&stack, None, 900, "usd").await;
    assert_eq!(stack.balance("dan").await, 0);

    stack.fake.set_webhooks(false);
    let missing_1 = pay(&stack, Some("bob"), 1000, "usd").await;
    let missing_2 = pay(&stack, Some("bob"), 500, "usd").await;
    let charge = refund(&stack, &refunded, Some(800)).await;
    close(&stack, &dispute_id, "won").await;
    // A purchase credited by hand under a payment intent id Stripe never made.
    let ghost = stack
        .credits_client()
        .await
        .add_credits(credits_pb::AddCreditsRequest {
            user_id: "frank".to_owned(),
            amount_micros: 3 * CREDIT,
            idempotency_key: "pi_ghost_never_paid".to_owned(),
            kind: credits_pb::CreditKind::Purchase.into(),
            description: "manual".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();

    let report = reconciler.run(window(), false).await.unwrap();
    let expected: BTreeMap<String, (Class, i64)> = [
        (ok.clone(), (Class::Matched, 25 * CREDIT)),
        (refunded.clone(), (Class::Matched, 25 * CREDIT)),
        (disputed.clone(), (Class::Matched, 20 * CREDIT)),
        (euros.clone(), (Class::IgnoredCurrency, 7 * CREDIT)),
        (anonymous.clone(), (Class::UnknownUser, 9 * CREDIT)),
        (missing_1.clone(), (Class::MissingCredit, 10 * CREDIT)),
        (missing_2.clone(), (Class::MissingCredit, 5 * CREDIT)),
        (charge.clone(), (Class::RefundNotDebited, 8 * CREDIT)),
        (
            dispute_id.clone(),
            (Class::DisputeReinstatedNotReturned, 20 * CREDIT),
        ),
        (
            "pi_ghost_never_paid".to_owned(),
            (Class::LedgerWithoutPayment, 3 * CREDIT),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(by_id(&report), expected);
    assert_eq!(report.totals["missing_credit"].count, 2);
    assert_eq!(report.totals["missing_credit"].amount_micros, 15 * CREDIT);
    assert_eq!(report.totals["duplicate_credit"].count, 0);
    assert_eq!(report.totals.len(), Class::ALL.len());
    let ghost_item = report
        .items
        .iter()
        .find(|i| i.class == Class::LedgerWithoutPayment)
        .unwrap();
    assert_eq!(
        (ghost_item.user_id.as_str(), ghost_item.entry_ids.clone()),
        ("frank", vec![ghost.id])
    );
    let dispute_item = report
        .items
        .iter()
        .find(|i| i.stripe_id == dispute_id)
        .unwrap();
    assert_eq!(dispute_item.user_id, "dan");
    assert_eq!(dispute_item.entry_ids.len(), 1, "the debit's entry");
    // A report without --repair writes nothing.
    assert_eq!(stack.balance("bob").await, 0);
    assert_eq!(stack.balance("carol").await, 25 * CREDIT);
    assert_eq!(stack.balance("dan").await, 0);

    let repaired = reconciler.run(window(), true).await.unwrap();
    let fixed: Vec<&str> = repaired
        .items
        .iter()
        .filter(|i| i.repaired)
        .map(|i| i.stripe_id.as_str())
        .collect();
    assert_eq!(fixed.len(), 4, "{fixed:?}");
    for id in [&missing_1, &missing_2, &charge, &dispute_id] {
        assert!(fixed.contains(&id.as_str()), "{id} repaired");
    }
    let for_a_person = vec![
        (Class::UnknownUser, anonymous.clone()),
        (
            Class::LedgerWithoutPayment,
            "pi_ghost_never_paid".to_owned(),
        ),
        (Class::IgnoredCurrency, euros.clone()),
    ];
    let mut for_a_person_sorted = for_a_person.clone();
    for_a_person_sorted.sort();
    assert_eq!(remaining(&repaired), for_a_person_sorted);
    let balances = [
        ("alice", 25 * CREDIT),
        ("bob", 15 * CREDIT),
        ("carol", 17 * CREDIT),
        ("dan", 20 * CREDIT),
        ("erin", 0),
        ("frank", 3 * CREDIT),
    ];
    for (user, micros) in balances {
        assert_eq!(stack.balance(user).await, micros, "{user} after repair");
    }

    // A second repair finds them matched and changes nothing.
    let again = reconciler.run(window(), true).await.unwrap();
    assert!(again.items.iter().all(|i| !i.repaired));
    assert_eq!(remaining(&again), for_a_person_sorted);
    for id in [&missing_1, &missing_2, &charge, &dispute_id] {
        assert_eq!(by_id(&again)[id.as_str()].0, Class::Matched, "{id}");
    }
    // The late webhooks change nothing either.
    stack.fake.set_webhooks(true);
    for delivery in stack.fake.deliver_dropped().await {
        assert_eq!(delivery["status"], 200, "{delivery}");
    }
    for (user, micros) in balances {
        assert_eq!(
            stack.balance(user).await,
            micros,
            "{user} after late webhooks"
        );
    }
    let after = reconciler.run(window(), false).await.unwrap();
    assert_eq!(remaining(&after), for_a_person_sorted);
}

/// After the refund, dispute and inquiry cases of issue 8 (partial refunds, a dispute
/// won, a dispute lost, an inquiry closed by a refund, a refund of a disputed payment
/// withheld by the cap), every webhook delivered: only `matched` remains.
async fn after_refunds_disputes_and_inquiries_only_matched_remains(backend: Backend) {
    let stack = Stack::start(backend).await;
    let reconciler = reconciler(&stack).await;
    let partial = pay(&stack, Some("alice"), 2500, "usd").await;
    refund(&stack, &partial, Some(500)).await;
    refund(&stack, &partial, Some(800)).await;
    let won = pay(&stack, Some("bob"), 2500, "usd").await;
    let won_dispute = dispute(&stack, &won, "needs_response").await;
    close(&stack, &won_dispute, "won").await;
    let lost = pay(&stack, Some("carol"), 2500, "usd").await;
    let lost_dispute = dispute(&stack, &lost, "under_review").await;
    close(&stack, &lost_dispute, "lost").await;
    let inquiry = pay(&stack, Some("dave"), 2500, "usd").await;
    let inquiry_dispute = dispute(&stack, &inquiry, "warning_needs_response").await;
    refund(&stack, &inquiry, None).await;
    close(&stack, &inquiry_dispute, "won").await;
    let capped = pay(&stack, Some("eve"), 2500, "usd").await;
    dispute(&stack, &capped, "needs_response").await;
    refund(&stack, &capped, None).await;
    let balances = [
        ("alice", 12 * CREDIT),
        ("bob", 25 * CREDIT),
        ("carol", 0),
        ("dave", 0),
        ("eve", 0),
    ];
    for (user, micros) in balances {
        assert_eq!(stack.balance(user).await, micros, "{user}");
    }
    let report = reconciler.run(window(), true).await.unwrap();
    assert_eq!(remaining(&report), Vec::new(), "{:#?}", report.items);
    assert!(report.items.iter().all(|i| i.class == Class::Matched));
    // 5 payments, 3 refunded charges, 4 disputes.
    assert_eq!(report.totals["matched"].count, 12);
    for (user, micros) in balances {
        assert_eq!(stack.balance(user).await, micros, "{user} unchanged");
    }
}

/// 1,000 payments whose webhooks were all dropped, listed across ten pages of 100:
/// every one is found, repaired once, then matched.
async fn a_thousand_payments_across_pages_are_found_and_repaired_once(backend: Backend) {
    let stack = Stack::start(backend).await;
    let reconciler = reconciler(&stack).await;
    stack.fake.set_webhooks(false);
    for i in 0..1_000 {
        pay(&stack, Some(&format!("user-{}", i % 10)), 500, "usd").await;
    }
    let first_page = common::json_of(
        stack
            .http
            .get(format!(
                "{}v1/payment_intents?limit=100",
                stack.fake.api_base()
            ))
            .bearer_auth(STRIPE_KEY),
    )
    .await;
    assert_eq!(first_page["has_more"], true);
    assert_eq!(first_page["data"].as_array().unwrap().len(), 100);

    let report = reconciler.run(window(), false).await.unwrap();
    assert_eq!(report.totals["missing_credit"].count, 1_000);
    assert_eq!(
        report.totals["missing_credit"].amount_micros,
        5_000 * CREDIT
    );
    let repaired = reconciler.run(window(), true).await.unwrap();
    assert_eq!(repaired.items.iter().filter(|i| i.repaired).count(), 1_000);
    let after = reconciler.run(window(), true).await.unwrap();
    assert_eq!(after.totals["matched"].count, 1_000);
    assert_eq!(after.remaining().count(), 0);
    for i in 0..10 {
        assert_eq!(stack.balance(&format!("user-{i}")).await, 500 * CREDIT);
    }
}

on_both_stores!(
    the_report_names_each_difference_and_repair_fixes_only_the_certain,
    after_refunds_disputes_and_inquiries_only_matched_remains,
    a_thousand_payments_across_pages_are_found_and_repaired_once,
);

/// `REEVE_RECONCILE_INTERVAL`'s job, as `main.rs` spawns it: every interval it reports
/// over the last 24 hours through the gauges on `/metrics`, and never repairs. (One
/// store only: the gauges are the process's, and no other test here publishes them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_job_reports_differences_as_gauges_and_repairs_nothing() {
    let stack = Stack::start(Backend::Sqlite).await;
    stack.fake.set_webhooks(false);
    pay(&stack, Some("gus"), 1200, "usd").await;
    pay(&stack, Some("gus"), 300, "usd").await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let job = stack
        .bridge
        .spawn_reconciler(
            webhook_bridge::stripe::reconcile::Settings {
                interval: std::time::Duration::from_millis(200),
                secret_key: STRIPE_KEY.to_owned().into(),
                api_base: stack.fake.api_base(),
            },
            shutdown.clone(),
        )
        .unwrap();
    let wanted = [
        "reeve_reconcile_items{class=\"missing_credit\"} 2",
        "reeve_reconcile_amount_micros{class=\"missing_credit\"} 15000000",
        "reeve_reconcile_items{class=\"duplicate_credit\"} 0",
    ];
    let mut text = String::new();
    for _ in 0..100 {
        text = stack
            .http
            .get(format!("{}/metrics", stack.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if wanted.iter().all(|line| text.lines().any(|l| l == *line)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for line in wanted {
        assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
    }
    assert!(text.contains("reeve_reconcile_last_run_timestamp_seconds"));
    // Report only: several runs later, still nothing credited.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(stack.balance("gus").await, 0);
    shutdown.cancel();
    job.await.unwrap();
}
