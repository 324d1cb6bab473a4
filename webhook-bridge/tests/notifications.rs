//! `PUT /api/notifications/threshold` (issue 12): a service with the admin scope sets a
//! user's low-balance alert; the next deduction below it writes `credits.balance_low`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use reeve_testkit::on_both_stores;
use reqwest::{Method, StatusCode};
use serde_json::json;

use common::{Backend, SERVICE_TOKEN, Stack};

on_both_stores!(a_threshold_set_on_rest_fires_one_balance_low);

async fn put(stack: &Stack, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
    stack
        .request(
            Method::PUT,
            "/api/notifications/threshold",
            Some(SERVICE_TOKEN),
            Some(body),
        )
        .await
}

async fn a_threshold_set_on_rest_fires_one_balance_low(backend: Backend) {
    let stack = Stack::start(backend).await;
    let (status, body) = put(&stack, json!({"user_id": "alice", "threshold": "50"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"user_id": "alice", "threshold": "50.000000", "threshold_micros": 50_000_000})
    );
    for (bad, code) in [
        (
            json!({"user_id": "alice", "threshold": -1}),
            "amount_not_positive",
        ),
        (
            json!({"user_id": "alice", "threshold": "x"}),
            "invalid_amount",
        ),
        (json!({"user_id": "", "threshold": 5}), "invalid_user_id"),
    ] {
        let (status, body) = put(&stack, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"]["code"], code, "{bad}: {body}");
    }
    let (status, _) = stack
        .request(
            Method::PUT,
            "/api/notifications/threshold",
            Some(&stack.token("alice")),
            Some(json!({"user_id": "alice", "threshold": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    stack.grant("alice", 100).await;
    for (i, amount) in ["30", "30", "30"].iter().enumerate() {
        let (status, body) = stack
            .post(
                "/api/credits/deduct",
                SERVICE_TOKEN,
                json!({"user_id": "alice", "amount": amount, "idempotency_key": format!("d{i}")}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let outbox = reeve_events::EventStore::open(&stack.db.url)
        .await
        .unwrap()
        .outbox(0, 100)
        .await
        .unwrap();
    let low: Vec<_> = outbox
        .iter()
        .filter(|e| e.event_type == "credits.balance_low")
        .collect();
    assert_eq!(low.len(), 1, "{outbox:#?}");
    assert_eq!(low[0].body["data"]["available_micros"], 40_000_000);

    // Zero removes the alert.
    let (status, body) = put(&stack, json!({"user_id": "alice", "threshold": 0})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["threshold"], serde_json::Value::Null);
}
