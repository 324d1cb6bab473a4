//! Outbound events of the ledger (issue 12), on PostgreSQL and SQLite: written in the
//! transaction of the change, one `credits.balance_low` per crossing whatever the
//! concurrency, re-armed only above the threshold, `lot.expiring` once per lot, and
//! the running service's dispatcher delivering signed webhooks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Backend, CREDIT, Client, TestDb, client};
use credits_svc::events::{
    CREDITS_BALANCE_LOW, CREDITS_DEPLETED, CREDITS_DISPUTED, CREDITS_GRANTED, CREDITS_PURCHASED,
    CREDITS_REFUNDED, HOLD_EXPIRED, LOT_EXPIRED, LOT_EXPIRING,
};
use credits_svc::ledger::{EntryKind, WriteRequest};
use credits_svc::lots::{Category, LotTerms};
use futures::future::join_all;
use reeve_events::{EventStore, StoredEvent};
use reeve_proto::credits::v1 as pb;
use reeve_runtime::Micros;
use reeve_testkit::on_both_stores;

on_both_stores!(
    one_balance_low_from_100_concurrent_deductions_crossing_the_threshold,
    a_lot_is_warned_of_once_before_it_expires,
    the_service_delivers_signed_events_to_registered_endpoints,
    purchases_refunds_disputes_and_expired_holds_are_events_of_their_change,
);

async fn outbox(db: &TestDb) -> Vec<StoredEvent> {
    EventStore::open(&db.url)
        .await
        .unwrap()
        .outbox(0, 10_000)
        .await
        .unwrap()
}

fn of_type<'a>(events: &'a [StoredEvent], kind: &str) -> Vec<&'a StoredEvent> {
    events.iter().filter(|e| e.event_type == kind).collect()
}

async fn grant(c: &mut Client, user: &str, micros: i64, key: &str) {
    c.add_credits(pb::AddCreditsRequest {
        user_id: user.into(),
        amount_micros: micros,
        idempotency_key: key.into(),
        kind: pb::CreditKind::Grant.into(),
        description: "test grant".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn deduct(c: &mut Client, user: &str, micros: i64, key: &str) {
    common::deduct(c, user, micros, key).await.unwrap();
}

async fn one_balance_low_from_100_concurrent_deductions_crossing_the_threshold(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut c = client(server.local_addr).await;
    grant(&mut c, "alice", 100 * CREDIT, "g1").await;
    c.set_balance_alert(pb::SetBalanceAlertRequest {
        user_id: "alice".into(),
        threshold_micros: 50 * CREDIT,
    })
    .await
    .unwrap();
    let refused = c
        .set_balance_alert(pb::SetBalanceAlertRequest {
            user_id: "alice".into(),
            threshold_micros: -1,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // A user without an alert deducts without any event.
    grant(&mut c, "bob", 10 * CREDIT, "g-bob").await;
    deduct(&mut c, "bob", CREDIT, "bob-1").await;

    let calls = (0..100).map(|i| {
        let mut c = c.clone();
        async move { deduct(&mut c, "alice", 900_000, &format!("d{i}")).await }
    });
    join_all(calls).await;
    let events = outbox(&db).await;
    let low = of_type(&events, CREDITS_BALANCE_LOW);
    assert_eq!(low.len(), 1, "{events:#?}");
    assert_eq!(low[0].user_id.as_deref(), Some("alice"));
    assert_eq!(low[0].body["data"]["threshold_micros"], 50 * CREDIT);
    assert!(low[0].body["data"]["available_micros"].as_i64().unwrap() < 50 * CREDIT);
    assert!(of_type(&events, CREDITS_DEPLETED).is_empty());
    assert_eq!(of_type(&events, CREDITS_GRANTED).len(), 2);
    assert_eq!(events.len(), 3, "nothing for plain deductions: {events:#?}");

    // Back to the threshold re-arms; the next crossing fires again; zero depletes.
    grant(&mut c, "alice", 40 * CREDIT, "g2").await;
    deduct(&mut c, "alice", CREDIT, "below-again").await;
    deduct(&mut c, "alice", 49 * CREDIT, "to-zero").await;
    let events = outbox(&db).await;
    assert_eq!(of_type(&events, CREDITS_BALANCE_LOW).len(), 2);
    let depleted = of_type(&events, CREDITS_DEPLETED);
    assert_eq!(depleted.len(), 1);
    assert_eq!(depleted[0].body["data"]["available_micros"], 0);
    // Every event has the documented shape.
    for event in &events {
        assert!(event.id.starts_with("evt_"));
        assert_eq!(event.body["id"], event.id);
        assert_eq!(event.body["type"], event.event_type);
        assert!(event.body["created_at"].as_str().unwrap().ends_with('Z'));
    }
}

async fn a_lot_is_warned_of_once_before_it_expires(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let t0: i64 = 2_000_000_000_000_000;
    let day: i64 = 86_400 * 1_000_000;
    let mut write =
        WriteRequest::caller("carol", EntryKind::Grant, Micros(5 * CREDIT), "promo", "");
    write.lot_terms = Some(LotTerms {
        category: Category::Promotional,
        priority: 10,
        expires_at_us: Some(t0 + 10 * day),
    });
    store.apply(&[write], t0).await.unwrap();
    // Eight days ahead: not yet; seven-day window from day 3: once, however often swept.
    assert_eq!(store.warn_expiring(t0, 7 * day, 100).await.unwrap(), 0);
    assert_eq!(
        store
            .warn_expiring(t0 + 3 * day, 7 * day, 100)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .warn_expiring(t0 + 4 * day, 7 * day, 100)
            .await
            .unwrap(),
        0
    );
    store.expire_due(t0 + 10 * day, 100).await.unwrap();
    let events = outbox(&db).await;
    let expiring = of_type(&events, LOT_EXPIRING);
    assert_eq!(expiring.len(), 1);
    assert_eq!(expiring[0].body["data"]["remaining_micros"], 5 * CREDIT);
    let expired = of_type(&events, LOT_EXPIRED);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].body["data"]["amount_micros"], -5 * CREDIT);
    assert_eq!(
        expired[0].body["data"]["lot_id"],
        expiring[0].body["data"]["lot_id"]
    );
}

async fn the_service_delivers_signed_events_to_registered_endpoints(backend: Backend) {
    let db = TestDb::new(backend).await;
    let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let secret: Arc<Mutex<String>> = Arc::default();
    let (s, k) = (Arc::clone(&seen), Arc::clone(&secret));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                let key = k.lock().unwrap().clone();
                standardwebhooks::Webhook::new(&key)
                    .unwrap()
                    .verify(&body, &headers)
                    .unwrap();
                s.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                "ok"
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let server = db.start().await;
    let events = EventStore::open(&db.url).await.unwrap();
    let endpoint = events
        .add_endpoint(
            &url,
            &[CREDITS_GRANTED.to_owned()],
            reeve_runtime::clock::now_us(),
        )
        .await
        .unwrap();
    *secret.lock().unwrap() = endpoint.secret.clone();
    let mut c = client(server.local_addr).await;
    grant(&mut c, "dave", 3 * CREDIT, "g").await;
    deduct(&mut c, "dave", 3 * CREDIT, "all").await;
    for _ in 0..100 {
        if !seen.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "only the filtered type: {seen:#?}");
    assert_eq!(seen[0]["type"], CREDITS_GRANTED);
    assert_eq!(seen[0]["data"]["user_id"], "dave");
    assert_eq!(seen[0]["data"]["amount_micros"], 3 * CREDIT);
}

/// The events the other tests do not reach, each written by the change that causes it
/// and only once: a purchase, a refund and a dispute of it (Stripe-keyed adjustments),
/// and a hold that expired unsettled (by the sweep, then nothing more on a second one).
async fn purchases_refunds_disputes_and_expired_holds_are_events_of_their_change(backend: Backend) {
    use credits_svc::holds::{HoldOp, HoldRequest};
    use credits_svc::ledger::KeySource;
    let db = TestDb::new(backend).await;
    let store = credits_svc::store::open(&db.url).await.unwrap();
    let t0: i64 = 2_000_000_000_000_000;
    let stripe = |kind: EntryKind, micros: i64, key: &str| WriteRequest {
        key_source: KeySource::Stripe,
        payment_id: Some("pi_events".into()),
        ..WriteRequest::caller("dana", kind, Micros(micros), key, "Stripe money")
    };
    let purchase = stripe(EntryKind::Purchase, 25 * CREDIT, "pi_events");
    for _ in 0..2 {
        written(
            store
                .apply(std::slice::from_ref(&purchase), t0)
                .await
                .unwrap(),
        );
    }
    written(
        store
            .apply(
                &[stripe(
                    EntryKind::Adjustment,
                    -5 * CREDIT,
                    "stripe:refund:ch_events:0:500",
                )],
                t0,
            )
            .await
            .unwrap(),
    );
    written(
        store
            .apply(
                &[stripe(
                    EntryKind::Adjustment,
                    -20 * CREDIT,
                    "stripe:dispute:dp_events",
                )],
                t0,
            )
            .await
            .unwrap(),
    );
    written(
        store
            .apply(&[grant_write("dana", 3, "g")], t0)
            .await
            .unwrap(),
    );
    let hold = HoldOp::Hold(HoldRequest {
        hold_id: "h-events".into(),
        user_id: "dana".into(),
        amount: Micros(2 * CREDIT),
        ttl_secs: 60,
        description: String::new(),
    });
    store.apply_holds(&[hold], t0).await.unwrap();
    store.expire_due(t0 + 61_000_000, 100).await.unwrap();
    store.expire_due(t0 + 120_000_000, 100).await.unwrap();
    let events = outbox(&db).await;
    let one = |kind: &str| {
        let found = of_type(&events, kind);
        assert_eq!(found.len(), 1, "{kind}: {found:?}");
        found[0].body["data"].clone()
    };
    let purchased = one(CREDITS_PURCHASED);
    assert_eq!(purchased["amount_micros"], 25 * CREDIT);
    assert_eq!(purchased["payment_id"], "pi_events");
    assert_eq!(one(CREDITS_REFUNDED)["amount_micros"], -5 * CREDIT);
    let disputed = one(CREDITS_DISPUTED);
    assert_eq!(disputed["amount_micros"], -20 * CREDIT);
    assert_eq!(disputed["balance_after_micros"], 0);
    assert_eq!(one(CREDITS_DEPLETED)["user_id"], "dana");
    let expired = one(HOLD_EXPIRED);
    assert_eq!(expired["hold_id"], "h-events");
    assert_eq!(expired["amount_micros"], 2 * CREDIT);
    assert!(events.iter().all(|e| e.body["data"]["user_id"] == "dana"));
}

/// Every write applied (or a duplicate of one applied), none refused.
fn written(outcomes: Vec<credits_svc::ledger::WriteOutcome>) {
    use credits_svc::ledger::WriteOutcome;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, WriteOutcome::Applied(_) | WriteOutcome::Duplicate(_))),
        "{outcomes:?}"
    );
}

fn grant_write(user: &str, credits: i64, key: &str) -> WriteRequest {
    WriteRequest::caller(user, EntryKind::Grant, Micros(credits * CREDIT), key, "")
}
