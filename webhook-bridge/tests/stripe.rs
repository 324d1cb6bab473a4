//! Purchases and Stripe webhooks end to end: real HTTP, real gRPC, real signatures,
//! real databases, the fake Stripe server on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use reeve_testkit::on_both_stores;

use common::{Backend, Stack, WEBHOOK_SECRET, event, fixture, now, payment_intent};
use reqwest::StatusCode;
use serde_json::json;

const CREDIT: i64 = 1_000_000;

/// purchase → fake checkout → signed webhooks → balance up by exactly the amount →
/// history shows it; then a partial refund and a dispute through the fake debit once.
async fn full_purchase_flow(backend: Backend) {
    let stack = Stack::start(backend).await;
    let alice = stack.token("alice");
    let (status, purchase) = stack
        .post("/api/credits/purchase", &alice, json!({"amount": 25}))
        .await;
    assert_eq!(status, StatusCode::OK, "{purchase}");
    let checkout_url = purchase["checkout_url"].as_str().unwrap();
    assert!(purchase["session_id"].as_str().unwrap().starts_with("cs_"));
    assert_eq!(purchase["amount"], "25.000000");
    assert_eq!(
        stack.balance("alice").await,
        0,
        "nothing is credited before payment"
    );

    let paid: serde_json::Value = common::json_of(stack.http.post(checkout_url)).await;
    for delivery in paid["deliveries"].as_array().unwrap() {
        assert_eq!(delivery["status"], 200, "{paid}");
    }
    assert_eq!(stack.balance("alice").await, 25 * CREDIT);
    let history = stack.history("alice").await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["kind"], "purchase");
    assert_eq!(history[0]["amount"], "25.000000");
    assert_eq!(history[0]["idempotency_key"], paid["payment_intent"]);

    // Paying again (here with a GET on the URL itself) answers the same payment and
    // sends nothing new.
    let again: serde_json::Value = common::json_of(stack.http.get(checkout_url)).await;
    assert_eq!(
        (again["already_paid"].as_bool(), &again["payment_intent"]),
        (Some(true), &paid["payment_intent"])
    );
    assert_eq!(again["deliveries"].as_array().map(Vec::len), Some(0));
    assert_eq!(stack.balance("alice").await, 25 * CREDIT);

    // A partial refund of 10.00, 5.00 spent, then a dispute of the whole 25.00, through
    // the fake: the dispute is capped at what the payment still had (15.00), so the
    // user owes what was spent.
    let pi = paid["payment_intent"].as_str().unwrap();
    let refund: serde_json::Value = common::json_of(
        stack
            .http
            .post(format!("{}v1/refunds", stack.fake.api_base()))
            .bearer_auth(common::STRIPE_KEY)
            .form(&[("payment_intent", pi), ("amount", "1000")]),
    )
    .await;
    assert_eq!(refund["delivery"]["status"], 200, "{refund}");
    assert_eq!(stack.balance("alice").await, 15 * CREDIT);
    let service = common::SERVICE_TOKEN;
    let (status, body) = stack
        .post(
            "/api/credits/deduct",
            service,
            json!({"user_id": "alice", "amount": "5", "idempotency_key": "spent-before-dispute"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let dispute: serde_json::Value = common::json_of(
        stack
            .http
            .post(format!("{}v1/test_helpers/disputes", stack.fake.api_base()))
            .bearer_auth(common::STRIPE_KEY)
            .form(&[("payment_intent", pi)]),
    )
    .await;
    assert_eq!(dispute["delivery"]["status"], 200, "{dispute}");
    assert_eq!(
        stack.balance("alice").await,
        -5 * CREDIT,
        "a dispute may leave a debt, never more than the payment"
    );

    // With a debt, deductions fail until it is repaid.
    let (status, body) = stack
        .post(
            "/api/credits/deduct",
            service,
            json!({"user_id": "alice", "amount": "0.01", "idempotency_key": "after-debt"}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(body["error"]["balance"], "-5.000000");
}

/// The same payment_intent.succeeded ten times at once, plus its
/// checkout.session.completed: credited once, every delivery answered 200.
async fn redelivered_payment_credits_once(backend: Backend) {
    let stack = Stack::start(backend).await;
    let succeeded = event(
        "evt_pi_1",
        "payment_intent.succeeded",
        payment_intent("pi_redelivered", Some("bob"), 1234, "usd"),
        None,
    );
    let mut session = fixture("checkout_session");
    session["payment_intent"] = json!("pi_redelivered");
    session["client_reference_id"] = json!("bob");
    session["status"] = json!("complete");
    session["payment_status"] = json!("paid");
    session["amount_total"] = json!(1234);
    let completed = event("evt_cs_1", "checkout.session.completed", session, None);

    let mut deliveries = Vec::new();
    for _ in 0..10 {
        deliveries.push(stack.send_event(&succeeded));
    }
    deliveries.push(stack.send_event(&completed));
    for (status, body) in futures::future::join_all(deliveries).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(stack.balance("bob").await, 12_340_000);
    assert_eq!(stack.history("bob").await.len(), 1);

    let stored = stack.bridge.events.get("evt_pi_1").await.unwrap().unwrap();
    assert_eq!(stored.deliveries, 10);
    assert_eq!(stored.outcome, "credited");
    assert!(stored.processed_at_us.is_some());
    assert_eq!(
        stored.payload,
        succeeded.to_string(),
        "the payload is kept as received"
    );
    let session = stack.bridge.events.get("evt_cs_1").await.unwrap().unwrap();
    assert_eq!(session.outcome, "ignored");

    // Later, out of order: the session event again, then the payment again.
    assert_eq!(stack.send_event(&completed).await.0, StatusCode::OK);
    assert_eq!(stack.send_event(&succeeded).await.0, StatusCode::OK);
    assert_eq!(stack.balance("bob").await, 12_340_000);
}

/// Refunds and disputes built from Stripe's fixtures, each redelivered: one debit each.
async fn refunds_and_disputes_debit_once(backend: Backend) {
    let stack = Stack::start(backend).await;
    let pi = payment_intent("pi_refunded", Some("carol"), 5000, "usd");
    assert_eq!(
        stack
            .send_event(&event("evt_pay", "payment_intent.succeeded", pi, None))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(stack.balance("carol").await, 50 * CREDIT);

    // The charge fixture, refunded in two steps (12.00 then 8.00), its user found by
    // the payment intent; each event delivered three times.
    let charge = |before: i64, after: i64| {
        let mut charge = fixture("charge");
        charge["id"] = json!("ch_for_pi_refunded");
        charge["payment_intent"] = json!("pi_refunded");
        charge["amount"] = json!(5000);
        charge["amount_refunded"] = json!(after);
        charge["refunded"] = json!(after == 5000);
        (charge, json!({"amount_refunded": before}))
    };
    let (first, first_previous) = charge(0, 1200);
    let (second, second_previous) = charge(1200, 2000);
    let first = event(
        "evt_refund_1",
        "charge.refunded",
        first,
        Some(first_previous),
    );
    let second = event(
        "evt_refund_2",
        "charge.refunded",
        second,
        Some(second_previous),
    );
    for _ in 0..3 {
        // The second step may arrive before the first: each is debited by its own key.
        assert_eq!(stack.send_event(&second).await.0, StatusCode::OK);
        assert_eq!(stack.send_event(&first).await.0, StatusCode::OK);
    }
    assert_eq!(stack.balance("carol").await, 30 * CREDIT);

    // The dispute fixture names the charge, not the payment intent; its status is an
    // inquiry's, which withdraws nothing: this one withdrew funds.
    let mut dispute = fixture("dispute");
    dispute["status"] = json!("needs_response");
    dispute["id"] = json!("dp_carol");
    dispute["charge"] = json!("ch_for_pi_refunded");
    dispute["amount"] = json!(1500);
    let dispute = event("evt_dispute", "charge.dispute.created", dispute, None);
    let (status, body) = stack.send_event(&dispute).await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (StatusCode::OK, Some("debited")),
        "{body}"
    );
    assert_eq!(stack.send_event(&dispute).await.0, StatusCode::OK);
    assert_eq!(stack.balance("carol").await, 15 * CREDIT);
    // Funds withdrawn for the same dispute: the same debit, not a second one.
    let mut withdrawn = dispute["data"]["object"].clone();
    withdrawn["status"] = json!("needs_response");
    let withdrawn = event(
        "evt_dispute_withdrawn",
        "charge.dispute.funds_withdrawn",
        withdrawn,
        None,
    );
    assert_eq!(stack.send_event(&withdrawn).await.0, StatusCode::OK);
    assert_eq!(stack.balance("carol").await, 15 * CREDIT);
    // The payment, one refund entry (the second step arrived first and carried the
    // cumulative 20.00; the first then had nothing new) and the dispute.
    assert_eq!(stack.history("carol").await.len(), 3);
    // The dispute is won: its funds come back, once.
    let mut won = dispute["data"]["object"].clone();
    won["status"] = json!("won");
    let won = event(
        "evt_dispute_won",
        "charge.dispute.funds_reinstated",
        won,
        None,
    );
    for _ in 0..2 {
        let (status, body) = stack.send_event(&won).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (StatusCode::OK, Some("credited")),
            "{body}"
        );
    }
    assert_eq!(stack.balance("carol").await, 30 * CREDIT);
}

/// A refund and a dispute delivered before their payment: stored as needing attention,
/// then applied (once) when the payment arrives, however often it is redelivered.
async fn refund_before_its_payment_is_applied_later(backend: Backend) {
    let stack = Stack::start(backend).await;
    let mut charge = fixture("charge");
    charge["id"] = json!("ch_for_pi_early");
    charge["payment_intent"] = json!("pi_early");
    charge["amount_refunded"] = json!(300);
    let refund = event(
        "evt_early_refund",
        "charge.refunded",
        charge,
        Some(json!({"amount_refunded": 0})),
    );
    let mut dispute = fixture("dispute");
    dispute["status"] = json!("needs_response");
    dispute["id"] = json!("dp_early");
    dispute["charge"] = json!("ch_for_pi_early");
    dispute["amount"] = json!(200);
    let dispute = event("evt_early_dispute", "charge.dispute.created", dispute, None);
    for early in [&refund, &dispute] {
        let (status, body) = stack.send_event(early).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (StatusCode::OK, Some("needs_attention")),
            "{body}"
        );
    }
    let paid = event(
        "evt_early_pay",
        "payment_intent.succeeded",
        payment_intent("pi_early", Some("frank"), 1000, "usd"),
        None,
    );
    let deliveries = futures::future::join_all((0..8).map(|_| stack.send_event(&paid))).await;
    assert!(
        deliveries
            .iter()
            .all(|(status, _)| *status == StatusCode::OK)
    );
    assert_eq!(
        stack.balance("frank").await,
        5 * CREDIT,
        "10.00 paid − 3.00 refunded − 2.00 disputed"
    );
    for id in ["evt_early_refund", "evt_early_dispute"] {
        assert_eq!(
            stack.bridge.events.get(id).await.unwrap().unwrap().outcome,
            "debited"
        );
    }
    assert!(
        stack
            .bridge
            .events
            .needing_attention(10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Missing, malformed, wrong-secret, tampered and stale signatures: 400, and nothing is
/// credited or stored.
async fn bad_signatures_are_refused(backend: Backend) {
    let stack = Stack::start(backend).await;
    let payload = event(
        "evt_forged",
        "payment_intent.succeeded",
        payment_intent("pi_forged", Some("mallory"), 100_000, "usd"),
        None,
    )
    .to_string();
    let t = now();
    let good = fake_stripe::sign(&payload, WEBHOOK_SECRET, t);
    let tampered = payload.replace("100000", "900000");
    let cases: Vec<(&str, String, Option<String>, &str)> = vec![
        ("missing", payload.clone(), None, "missing_signature"),
        (
            "malformed",
            payload.clone(),
            Some("not-a-signature".to_owned()),
            "malformed_signature",
        ),
        (
            "no v1",
            payload.clone(),
            Some(format!("t={t}")),
            "malformed_signature",
        ),
        (
            "wrong secret",
            payload.clone(),
            Some(fake_stripe::sign(&payload, "whsec_other", t)),
            "invalid_signature",
        ),
        (
            "tampered body",
            tampered,
            Some(good.clone()),
            "invalid_signature",
        ),
        (
            "6 minutes old",
            payload.clone(),
            Some(fake_stripe::sign(&payload, WEBHOOK_SECRET, t - 360)),
            "stale_signature",
        ),
    ];
    for (name, body, signature, code) in cases {
        let (status, reply) = stack.send_raw(&body, signature.as_deref()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {reply}");
        assert_eq!(reply["error"]["code"], code, "{name}");
    }
    assert_eq!(stack.balance("mallory").await, 0);
    assert!(
        stack
            .bridge
            .events
            .get("evt_forged")
            .await
            .unwrap()
            .is_none(),
        "nothing unverified is stored"
    );
    // The genuine delivery still works afterwards.
    let (status, _) = stack.send_raw(&payload, Some(&good)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stack.balance("mallory").await, 1_000 * CREDIT);
}

/// A currency other than the configured one, a payment without a user, and an unknown
/// event type: 200, stored, not credited.
async fn unusable_events_are_stored_not_credited(backend: Backend) {
    let stack = Stack::start(backend).await;
    let eur = event(
        "evt_eur",
        "payment_intent.succeeded",
        payment_intent("pi_eur", Some("dave"), 1000, "eur"),
        None,
    );
    let anonymous = event(
        "evt_anon",
        "payment_intent.succeeded",
        payment_intent("pi_anon", None, 1000, "usd"),
        None,
    );
    let unknown = fixture("event");
    for (event, outcome) in [
        (&eur, "ignored_currency"),
        (&anonymous, "needs_attention"),
        (&unknown, "ignored"),
    ] {
        let (status, body) = stack.send_event(event).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["outcome"], outcome);
        let id = event["id"].as_str().unwrap();
        assert_eq!(
            stack.bridge.events.get(id).await.unwrap().unwrap().outcome,
            outcome
        );
    }
    assert_eq!(stack.balance("dave").await, 0);
    let attention = stack.bridge.events.needing_attention(10).await.unwrap();
    let mut ids: Vec<&str> = attention.iter().map(|e| e.event_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        ["evt_anon", "evt_eur"],
        "a payment not credited is for a person to see"
    );
}

/// Credits-svc down: 503 (Stripe retries), recorded as failed; once it is back, the
/// redelivery credits exactly once.
async fn credits_down_answers_503_then_retry_credits(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.credits_shutdown.cancel();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let paid = event(
        "evt_retry",
        "payment_intent.succeeded",
        payment_intent("pi_retry", Some("erin"), 700, "usd"),
        None,
    );
    let (status, body) = stack.send_event(&paid).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        stack
            .bridge
            .events
            .get("evt_retry")
            .await
            .unwrap()
            .unwrap()
            .outcome,
        "failed"
    );

    // credits-svc comes back on the same address.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _credits = credits_svc::start(
        common::credits_config(&stack.db.url, stack.credits_addr, stack.fake.api_base()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let (status, body) = stack.send_event(&paid).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(stack.send_event(&paid).await.0, StatusCode::OK);
    assert_eq!(stack.balance("erin").await, 7 * CREDIT);
    let stored = stack.bridge.events.get("evt_retry").await.unwrap().unwrap();
    assert_eq!(
        (stored.outcome.as_str(), stored.deliveries),
        ("credited", 3)
    );
    shutdown.cancel();
}

on_both_stores!(
    full_purchase_flow,
    redelivered_payment_credits_once,
    refunds_and_disputes_debit_once,
    refund_before_its_payment_is_applied_later,
    bad_signatures_are_refused,
    unusable_events_are_stored_not_credited,
    credits_down_answers_503_then_retry_credits,
);

/// Each of Stripe's own fixture objects, wrapped in an event of its kind, is answered
/// without a 5xx (acted upon, ignored, or stored as needing attention).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stripe_fixture_is_accepted() {
    let stack = Stack::start(Backend::Sqlite).await;
    let cases = [
        ("payment_intent", "payment_intent.succeeded"),
        ("checkout_session", "checkout.session.completed"),
        ("charge", "charge.refunded"),
        ("refund", "refund.created"),
        ("refund", "charge.refund.updated"),
        ("dispute", "charge.dispute.created"),
    ];
    for (i, (name, event_type)) in cases.into_iter().enumerate() {
        let (status, body) = stack
            .send_event(&event(
                &format!("evt_fixture_{i}"),
                event_type,
                fixture(name),
                None,
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{name} as {event_type}: {body}");
    }
    let (status, body) = stack.send_event(&fixture("event")).await;
    assert_eq!(status, StatusCode::OK, "event fixture: {body}");
}

/// The fake's Checkout Session, and Stripe's own fixture of one, parse with
/// async-stripe's typed model (the purchase path depends on it).
#[test]
fn checkout_session_shapes_parse_with_async_stripe() {
    use stripe_webhook::Webhook;
    let session = fake_stripe::objects::Session {
        id: "cs_test_1".to_owned(),
        created: now(),
        amount_total: 2500,
        currency: "usd".to_owned(),
        client_reference_id: Some("alice".to_owned()),
        metadata: serde_json::Map::new(),
        payment_intent_metadata: serde_json::Map::new(),
        success_url: None,
        cancel_url: None,
        url: "http://127.0.0.1/checkout/cs_test_1".to_owned(),
        payment_intent: Some("pi_1".to_owned()),
    };
    for object in [session.to_json(), fixture("checkout_session")] {
        let payload = event("evt_typed", "checkout.session.completed", object, None).to_string();
        let signature = fake_stripe::sign(&payload, WEBHOOK_SECRET, now());
        let parsed = Webhook::construct_event(&payload, &signature, WEBHOOK_SECRET);
        assert!(parsed.is_ok(), "{:?}", parsed.err());
    }
}
