//! Holds on REST: reserve, settle below and above the hold (and past everything, as a
//! debt), release, the duplicates a retried call gets, 402 with what is held, 409
//! `hold_already_resolved` with the stored outcome, 404, refused values, the balance's
//! held and available parts, expiry, and the `deduct` scope. Real HTTP to the bridge,
//! real gRPC behind it, on both stores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use reeve_runtime::auth::{Scope, ServiceTokens};
use reeve_testkit::on_both_stores;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use common::{Backend, SERVICE_TOKEN, Stack};

const CREDIT: i64 = 1_000_000;

async fn hold(stack: &Stack, body: Value) -> (StatusCode, Value) {
    stack.post("/api/credits/holds", SERVICE_TOKEN, body).await
}

/// A hold that must be granted; the answer (the hold and `duplicate`).
async fn held(stack: &Stack, user: &str, hold_id: &str, amount: &str) -> Value {
    let (status, body) = hold(
        stack,
        json!({"user_id": user, "amount": amount, "hold_id": hold_id}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn settle(stack: &Stack, hold_id: &str, amount: Value) -> (StatusCode, Value) {
    stack
        .post(
            &format!("/api/credits/holds/{hold_id}/settle"),
            SERVICE_TOKEN,
            json!({"amount": amount}),
        )
        .await
}

async fn release(stack: &Stack, hold_id: &str) -> (StatusCode, Value) {
    stack
        .request(
            reqwest::Method::POST,
            &format!("/api/credits/holds/{hold_id}/release"),
            Some(SERVICE_TOKEN),
            None,
        )
        .await
}

async fn read(stack: &Stack, hold_id: &str) -> (StatusCode, Value) {
    stack
        .get(&format!("/api/credits/holds/{hold_id}"), SERVICE_TOKEN)
        .await
}

async fn balance(stack: &Stack, user: &str) -> Value {
    let (status, body) = stack.get("/api/credits/balance", &stack.token(user)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// (balance, held, available) in micros, checking each decimal beside its micros.
async fn parts(stack: &Stack, user: &str) -> (i64, i64, i64) {
    let body = balance(stack, user).await;
    for part in ["balance", "held", "available"] {
        let micros = body[format!("{part}_micros")].as_i64().unwrap();
        assert_eq!(
            body[part],
            reeve_runtime::Micros(micros).to_string(),
            "{body}"
        );
    }
    (
        body["balance_micros"].as_i64().unwrap(),
        body["held_micros"].as_i64().unwrap(),
        body["available_micros"].as_i64().unwrap(),
    )
}

on_both_stores!(
    a_hold_reserves_and_a_settle_below_it_frees_the_rest,
    a_settle_above_the_hold_draws_the_excess_and_past_everything_leaves_a_shortfall,
    a_release_frees_the_reservation_once,
    a_settle_of_zero_is_a_release,
    a_repeated_hold_is_a_duplicate_and_another_request_under_its_id_is_409,
    holding_more_than_is_available_is_402_with_what_is_held,
    a_conflicting_settle_or_release_is_409_with_the_stored_outcome,
    an_unknown_hold_is_404,
    refused_values_are_400_with_their_codes,
    an_expired_hold_reserves_nothing_and_a_late_settle_still_charges,
    hold_routes_need_the_deduct_scope,
);

async fn a_hold_reserves_and_a_settle_below_it_frees_the_rest(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("ada", 10).await;
    let answer = held(&stack, "ada", "call-1", "2").await;
    assert_eq!(answer["duplicate"], false);
    assert_eq!(answer["hold_id"], "call-1");
    assert_eq!(answer["user_id"], "ada");
    assert_eq!(answer["amount"], "2.000000");
    assert_eq!(answer["amount_micros"], 2 * CREDIT);
    assert_eq!(answer["status"], "held");
    assert_eq!(answer["settled"], Value::Null);
    assert_eq!(answer["entry_id"], Value::Null);
    assert_eq!(answer["shortfall_micros"], 0);
    assert_eq!(answer["late"], false);
    assert_eq!(answer["resolved_at"], Value::Null);
    let created =
        chrono::DateTime::parse_from_rfc3339(answer["created_at"].as_str().unwrap()).unwrap();
    let expires =
        chrono::DateTime::parse_from_rfc3339(answer["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - created).num_seconds(), 600, "the default ttl");
    let reservations = answer["reservations"].as_array().unwrap();
    assert_eq!(reservations.len(), 1, "{answer}");
    assert_eq!(reservations[0]["amount"], "2.000000");
    assert_eq!(reservations[0]["amount_micros"], 2 * CREDIT);
    assert!(reservations[0]["lot_id"].as_i64().unwrap() > 0);
    assert_eq!(
        parts(&stack, "ada").await,
        (10 * CREDIT, 2 * CREDIT, 8 * CREDIT)
    );

    let (status, read_back) = read(&stack, "call-1").await;
    assert_eq!(status, StatusCode::OK, "{read_back}");
    assert_eq!(read_back["hold"]["status"], "held");
    assert_eq!(read_back["hold"]["reservations"], answer["reservations"]);

    let (status, settled) = settle(&stack, "call-1", json!("0.5")).await;
    assert_eq!(status, StatusCode::OK, "{settled}");
    assert_eq!(settled["duplicate"], false);
    assert_eq!(settled["shortfall"], "0.000000");
    assert_eq!(settled["shortfall_micros"], 0);
    assert_eq!(settled["hold"]["status"], "settled");
    assert_eq!(settled["hold"]["settled"], "0.500000");
    assert_eq!(settled["hold"]["settled_micros"], CREDIT / 2);
    assert_eq!(settled["hold"]["reservations"], json!([]));
    assert!(settled["hold"]["resolved_at"].is_string());
    let entry = &settled["entry"];
    assert_eq!(entry["kind"], "deduction");
    assert_eq!(entry["amount"], "-0.500000");
    assert_eq!(entry["balance_after"], "9.500000");
    assert_eq!(settled["hold"]["entry_id"], entry["id"]);
    assert_eq!(
        parts(&stack, "ada").await,
        (9_500_000, 0, 9_500_000),
        "the rest of the hold is free again"
    );

    // A retried settle answers the stored result and writes nothing.
    let (status, again) = settle(&stack, "call-1", json!(0.5)).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["entry"]["id"], entry["id"]);
    assert_eq!(parts(&stack, "ada").await.0, 9_500_000);
    assert_eq!(
        stack.history("ada").await.len(),
        2,
        "the grant and one deduction"
    );
}

async fn a_settle_above_the_hold_draws_the_excess_and_past_everything_leaves_a_shortfall(
    backend: Backend,
) {
    let stack = Stack::start(backend).await;
    stack.grant("bo", 3).await;
    held(&stack, "bo", "above", "1").await;
    let (status, settled) = settle(&stack, "above", json!("2")).await;
    assert_eq!(status, StatusCode::OK, "{settled}");
    assert_eq!(settled["entry"]["amount"], "-2.000000");
    assert_eq!(settled["shortfall_micros"], 0);
    assert_eq!(parts(&stack, "bo").await, (CREDIT, 0, CREDIT));

    // Past everything available: the full cost is recorded, the rest is a debt.
    held(&stack, "bo", "past", "1").await;
    let (status, settled) = settle(&stack, "past", json!("5")).await;
    assert_eq!(status, StatusCode::OK, "{settled}");
    assert_eq!(settled["entry"]["amount"], "-5.000000");
    assert_eq!(settled["shortfall"], "4.000000");
    assert_eq!(settled["shortfall_micros"], 4 * CREDIT);
    assert_eq!(settled["hold"]["shortfall"], "4.000000");
    assert_eq!(settled["hold"]["settled"], "5.000000");
    let (balance_micros, held_micros, _) = parts(&stack, "bo").await;
    assert_eq!((balance_micros, held_micros), (-4 * CREDIT, 0));

    // In debt, no new hold passes.
    let (status, refused) = hold(
        &stack,
        json!({"user_id": "bo", "amount": "0.000001", "hold_id": "in-debt"}),
    )
    .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{refused}");
    assert_eq!(refused["error"]["code"], "insufficient_credits");
}

async fn a_release_frees_the_reservation_once(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("cy", 5).await;
    held(&stack, "cy", "to-release", "4").await;
    assert_eq!(parts(&stack, "cy").await, (5 * CREDIT, 4 * CREDIT, CREDIT));
    let (status, released) = release(&stack, "to-release").await;
    assert_eq!(status, StatusCode::OK, "{released}");
    assert_eq!(released["duplicate"], false);
    assert_eq!(released["hold"]["status"], "released");
    assert_eq!(released["hold"]["settled"], Value::Null);
    assert_eq!(released["hold"]["entry_id"], Value::Null);
    assert!(released["hold"]["resolved_at"].is_string());
    assert_eq!(parts(&stack, "cy").await, (5 * CREDIT, 0, 5 * CREDIT));

    let (status, again) = release(&stack, "to-release").await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(
        again["hold"]["resolved_at"],
        released["hold"]["resolved_at"]
    );
    assert_eq!(
        stack.history("cy").await.len(),
        1,
        "a release writes no entry"
    );
}

async fn a_settle_of_zero_is_a_release(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("di", 2).await;
    held(&stack, "di", "zero", "1.5").await;
    let (status, settled) = settle(&stack, "zero", json!(0)).await;
    assert_eq!(status, StatusCode::OK, "{settled}");
    assert_eq!(settled["entry"], Value::Null);
    assert_eq!(settled["shortfall"], "0.000000");
    assert_eq!(settled["hold"]["status"], "released");
    assert_eq!(parts(&stack, "di").await, (2 * CREDIT, 0, 2 * CREDIT));
    assert_eq!(stack.history("di").await.len(), 1);
}

async fn a_repeated_hold_is_a_duplicate_and_another_request_under_its_id_is_409(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("ed", 5).await;
    let body = json!({"user_id": "ed", "amount": 1.25, "hold_id": "same", "ttl_seconds": 60, "description": "gpt call"});
    let (status, first) = hold(&stack, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["description"], "gpt call");
    let (status, again) = hold(&stack, body).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["created_at"], first["created_at"]);
    assert_eq!(again["expires_at"], first["expires_at"]);
    assert_eq!(parts(&stack, "ed").await.1, 1_250_000, "reserved once");

    let (status, refused) = hold(
        &stack,
        json!({"user_id": "ed", "amount": "2", "hold_id": "same"}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["error"]["code"], "idempotency_key_reused");
    assert_eq!(parts(&stack, "ed").await.1, 1_250_000);
}

async fn holding_more_than_is_available_is_402_with_what_is_held(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("fa", 1).await;
    held(&stack, "fa", "first", "0.75").await;
    let (status, refused) = hold(
        &stack,
        json!({"user_id": "fa", "amount": "0.5", "hold_id": "second"}),
    )
    .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{refused}");
    let error = &refused["error"];
    assert_eq!(error["code"], "insufficient_credits");
    assert_eq!(error["balance"], "1.000000");
    assert_eq!(error["balance_micros"], CREDIT);
    assert_eq!(error["held"], "0.750000");
    assert_eq!(error["held_micros"], 750_000);
    assert_eq!(error["required"], "0.500000");
    assert_eq!(error["required_micros"], 500_000);
    assert_eq!(parts(&stack, "fa").await, (CREDIT, 750_000, 250_000));
    let (status, _) = read(&stack, "second").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was reserved");

    // A deduction spends only what is available, and says what is held.
    let (status, refused) = stack
        .post(
            "/api/credits/deduct",
            SERVICE_TOKEN,
            json!({"user_id": "fa", "amount": "0.5", "idempotency_key": "deduct-over-hold"}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{refused}");
    assert_eq!(refused["error"]["held"], "0.750000");

    // Once the first is released, the refused hold id is free.
    release(&stack, "first").await;
    let answer = held(&stack, "fa", "second", "0.5").await;
    assert_eq!(answer["duplicate"], false);
}

async fn a_conflicting_settle_or_release_is_409_with_the_stored_outcome(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("gu", 5).await;
    held(&stack, "gu", "settled-once", "1").await;
    let (status, settled) = settle(&stack, "settled-once", json!("0.3")).await;
    assert_eq!(status, StatusCode::OK, "{settled}");
    let entry_id = settled["entry"]["id"].as_i64().unwrap();

    let (status, refused) = settle(&stack, "settled-once", json!("0.4")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    let error = &refused["error"];
    assert_eq!(error["code"], "hold_already_resolved");
    assert_eq!(error["hold_id"], "settled-once");
    assert_eq!(error["status"], "settled");
    assert_eq!(error["settled"], "0.300000");
    assert_eq!(error["settled_micros"], 300_000);
    assert_eq!(error["entry_id"], entry_id);
    assert_eq!(error["shortfall"], "0.000000");

    let (status, refused) = release(&stack, "settled-once").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["error"]["code"], "hold_already_resolved");
    assert_eq!(refused["error"]["status"], "settled");
    assert_eq!(refused["error"]["entry_id"], entry_id);

    // A settle after a release.
    held(&stack, "gu", "released-once", "1").await;
    release(&stack, "released-once").await;
    let (status, refused) = settle(&stack, "released-once", json!("0.2")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["error"]["code"], "hold_already_resolved");
    assert_eq!(refused["error"]["status"], "released");
    assert_eq!(refused["error"]["settled"], Value::Null);
    assert_eq!(refused["error"]["entry_id"], Value::Null);

    assert_eq!(parts(&stack, "gu").await, (4_700_000, 0, 4_700_000));
}

async fn an_unknown_hold_is_404(backend: Backend) {
    let stack = Stack::start(backend).await;
    for (status, body) in [
        read(&stack, "nope").await,
        settle(&stack, "nope", json!("1")).await,
        release(&stack, "nope").await,
    ] {
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
}

async fn refused_values_are_400_with_their_codes(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("hu", 5).await;
    let body = |extra: Value| {
        let mut body = json!({"user_id": "hu", "amount": "1", "hold_id": "bad"});
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        body
    };
    for (extra, code) in [
        (json!({"ttl_seconds": 0}), "invalid_ttl"),
        (json!({"ttl_seconds": 86_401}), "invalid_ttl"),
        (json!({"ttl_seconds": "60"}), "invalid_ttl"),
        (json!({"ttl_seconds": 1.5}), "invalid_ttl"),
        (json!({"amount": 0}), "amount_not_positive"),
        (json!({"amount": "0.0000001"}), "amount_too_precise"),
        (json!({"amount": "1e2"}), "invalid_amount"),
        (json!({"hold_id": ""}), "invalid_hold_id"),
        (json!({"hold_id": "a\u{0}b"}), "invalid_hold_id"),
        (json!({"hold_id": "k".repeat(257)}), "invalid_hold_id"),
        (json!({"user_id": ""}), "invalid_user_id"),
        (json!({"description": "a\u{1}"}), "invalid_description"),
        (json!({"description": 5}), "invalid_json"),
    ] {
        let (status, refused) = hold(&stack, body(extra.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {refused}");
        assert_eq!(refused["error"]["code"], code, "{extra}: {refused}");
    }
    assert_eq!(parts(&stack, "hu").await.1, 0, "nothing reserved");

    // The ttl bounds themselves are accepted, and a whole number written as a float.
    for (hold_id, ttl) in [
        ("ttl-1", json!(1)),
        ("ttl-day", json!(86_400)),
        ("ttl-float", json!(60.0)),
    ] {
        let (status, answer) = hold(
            &stack,
            json!({"user_id": "hu", "amount": "0.1", "hold_id": hold_id, "ttl_seconds": ttl}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }

    held(&stack, "hu", "to-settle", "1").await;
    for (amount, code) in [
        (json!(-1), "amount_negative"),
        (json!("-0.5"), "amount_negative"),
        (json!("0.0000001"), "amount_too_precise"),
        (json!(null), "invalid_amount"),
    ] {
        let (status, refused) = settle(&stack, "to-settle", amount.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{amount}: {refused}");
        assert_eq!(refused["error"]["code"], code, "{amount}: {refused}");
    }
    let long = "k".repeat(257);
    let (status, refused) = read(&stack, &long).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["error"]["code"], "invalid_hold_id");
    let (status, refused) = read(&stack, "a%01b").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["error"]["code"], "invalid_hold_id");
    // Still held: none of the refused settles touched it.
    let (_, read_back) = read(&stack, "to-settle").await;
    assert_eq!(read_back["hold"]["status"], "held");
}

async fn an_expired_hold_reserves_nothing_and_a_late_settle_still_charges(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("ib", 3).await;
    let (status, answer) = hold(
        &stack,
        json!({"user_id": "ib", "amount": "2", "hold_id": "short", "ttl_seconds": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(parts(&stack, "ib").await, (3 * CREDIT, 2 * CREDIT, CREDIT));
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;

    let (status, read_back) = read(&stack, "short").await;
    assert_eq!(status, StatusCode::OK, "{read_back}");
    assert_eq!(read_back["hold"]["status"], "expired");
    assert_eq!(read_back["hold"]["reservations"], json!([]));
    assert_eq!(parts(&stack, "ib").await, (3 * CREDIT, 0, 3 * CREDIT));

    let (status, settled) = settle(&stack, "short", json!("1.5")).await;
    assert_eq!(status, StatusCode::OK, "{settled}");
    assert_eq!(settled["hold"]["late"], true);
    assert_eq!(settled["hold"]["status"], "settled");
    assert_eq!(settled["entry"]["amount"], "-1.500000");
    assert_eq!(parts(&stack, "ib").await, (1_500_000, 0, 1_500_000));
}

async fn hold_routes_need_the_deduct_scope(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("jo", 5).await;
    held(&stack, "jo", "scoped", "1").await;
    held(&stack, "jo", "scoped-2", "1").await;

    const GATEWAY: &str = "gateway-deduct-only";
    const QUOTA: &str = "quota-only-token";
    let mut config = stack.bridge_config.clone();
    config.service_tokens = ServiceTokens::new([SERVICE_TOKEN])
        .with_token("gateway", GATEWAY, &[Scope::Deduct])
        .with_token("quota", QUOTA, &[Scope::Quota]);
    let shutdown = CancellationToken::new();
    let scoped = webhook_bridge::start(config, shutdown.clone())
        .await
        .unwrap();
    let base = format!("http://{}", scoped.local_addr);
    let send = |method: reqwest::Method, path: &str, bearer: Option<&str>, body: Option<Value>| {
        let mut request = stack.http.request(method, format!("{base}{path}"));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let calls = [
        (
            reqwest::Method::POST,
            "/api/credits/holds",
            Some(json!({"user_id": "jo", "amount": "1", "hold_id": "by-quota"})),
        ),
        (reqwest::Method::GET, "/api/credits/holds/scoped", None),
        (
            reqwest::Method::POST,
            "/api/credits/holds/scoped/settle",
            Some(json!({"amount": "1"})),
        ),
        (
            reqwest::Method::POST,
            "/api/credits/holds/scoped-2/release",
            None,
        ),
    ];
    for (method, path, body) in &calls {
        let (status, refused) = send(method.clone(), path, Some(QUOTA), body.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {refused}");
        assert_eq!(refused["error"]["code"], "insufficient_scope", "{path}");
        let (status, refused) = send(method.clone(), path, None, body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {refused}");
        assert_eq!(refused["error"]["code"], "missing_token", "{path}");
        let (status, refused) =
            send(method.clone(), path, Some(&stack.token("jo")), body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{path}: a user token: {refused}"
        );
        assert_eq!(refused["error"]["code"], "invalid_service_token", "{path}");
    }
    let (_, read_back) = read(&stack, "scoped").await;
    assert_eq!(read_back["hold"]["status"], "held", "nothing was done");
    let (_, read_back) = read(&stack, "scoped-2").await;
    assert_eq!(read_back["hold"]["status"], "held", "nothing was done");
    let (status, _) = read(&stack, "by-quota").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The deduct scope is enough for each of them.
    for (method, path, body) in &calls {
        let (status, answer) = send(method.clone(), path, Some(GATEWAY), body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
    }
    shutdown.cancel();
}
