//! Credit lots on REST: the balance's paid and promotional parts and next expiry, the
//! caller's live lots in spending order, grants (`POST /api/credits/grants`) with each
//! option and each refusal, draws and the new entry kinds in history, and the OpenAPI
//! document of the new routes. Real HTTP to the bridge, real gRPC behind it, on both
//! stores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use reeve_proto::credits::v1 as credits_pb;
use reeve_runtime::auth::{Scope, ServiceTokens};
use reeve_testkit::on_both_stores;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use common::{Backend, SERVICE_TOKEN, Stack, event, payment_intent};

const CREDIT: i64 = 1_000_000;

/// Now, to the microsecond (chrono's clock feature is not enabled here).
fn now() -> DateTime<Utc> {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    DateTime::from_timestamp_micros(i64::try_from(since_epoch.as_micros()).unwrap()).unwrap()
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// An instant `secs` from now, to the whole second (as clients usually write them).
fn in_secs(secs: i64) -> DateTime<Utc> {
    let at = now() + Duration::seconds(secs);
    DateTime::from_timestamp(at.timestamp(), 0).unwrap()
}

async fn grant(stack: &Stack, body: Value) -> (StatusCode, Value) {
    stack.post("/api/credits/grants", SERVICE_TOKEN, body).await
}

/// A grant that must succeed; its entry.
async fn granted(stack: &Stack, body: Value) -> Value {
    let (status, answer) = grant(stack, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["entry"].clone()
}

async fn lots(stack: &Stack, user: &str) -> Vec<Value> {
    let (status, body) = stack.get("/api/credits/lots", &stack.token(user)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], user);
    body["lots"].as_array().unwrap().clone()
}

async fn balance(stack: &Stack, user: &str) -> Value {
    let (status, body) = stack.get("/api/credits/balance", &stack.token(user)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn deduct(stack: &Stack, user: &str, amount: &str, key: &str) -> Value {
    let (status, body) = stack
        .post(
            "/api/credits/deduct",
            SERVICE_TOKEN,
            json!({"user_id": user, "amount": amount, "idempotency_key": key}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["entry"].clone()
}

/// Pays `credits` through a signed `payment_intent.succeeded`: a paid lot.
async fn purchase(stack: &Stack, user: &str, payment_id: &str, credits: i64) {
    let pi = payment_intent(payment_id, Some(user), credits * 100, "usd");
    let (status, body) = stack
        .send_event(&event(
            &format!("evt_{payment_id}"),
            "payment_intent.succeeded",
            pi,
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

on_both_stores!(
    the_balance_shows_paid_promotional_and_the_next_expiry,
    lots_are_listed_live_and_in_spending_order,
    grants_take_each_option,
    grants_refuse_each_bad_value,
    a_promotional_grant_is_spent_before_a_purchase,
    history_shows_expirations_and_revocations_with_their_draws,
);

async fn the_balance_shows_paid_promotional_and_the_next_expiry(backend: Backend) {
    let stack = Stack::start(backend).await;
    let empty = balance(&stack, "alice").await;
    assert_eq!(
        empty,
        json!({
            "user_id": "alice", "balance": "0.000000", "balance_micros": 0,
            "paid": "0.000000", "paid_micros": 0,
            "promotional": "0.000000", "promotional_micros": 0,
            "next_expiry": null,
            "held": "0.000000", "held_micros": 0,
            "available": "0.000000", "available_micros": 0,
        })
    );
    let soon = in_secs(3_600);
    let later = in_secs(7_200);
    granted(
        &stack,
        json!({"user_id": "alice", "amount": "2.5", "idempotency_key": "later", "expires_at": rfc3339(later)}),
    )
    .await;
    granted(
        &stack,
        json!({"user_id": "alice", "amount": 5, "idempotency_key": "soon", "expires_at": rfc3339(soon)}),
    )
    .await;
    granted(
        &stack,
        json!({"user_id": "alice", "amount": "3", "idempotency_key": "paid", "category": "paid"}),
    )
    .await;
    let body = balance(&stack, "alice").await;
    assert_eq!(body["balance"], "10.500000");
    assert_eq!(body["balance_micros"], 10_500_000);
    assert_eq!(
        (&body["paid"], &body["paid_micros"]),
        (&json!("3.000000"), &json!(3 * CREDIT))
    );
    assert_eq!(
        (&body["promotional"], &body["promotional_micros"]),
        (&json!("7.500000"), &json!(7_500_000))
    );
    assert_eq!(
        body["next_expiry"],
        json!({"at": rfc3339(soon), "amount": "5.000000", "amount_micros": 5 * CREDIT})
    );
    // Spending the soonest lot moves the next expiry to the later one.
    deduct(&stack, "alice", "5", "spend-soon").await;
    let body = balance(&stack, "alice").await;
    assert_eq!(
        body["next_expiry"],
        json!({"at": rfc3339(later), "amount": "2.500000", "amount_micros": 2_500_000})
    );
    assert_eq!(body["promotional"], "2.500000");
    // Another user sees only their own.
    assert_eq!(balance(&stack, "bob").await["next_expiry"], Value::Null);
}

async fn lots_are_listed_live_and_in_spending_order(backend: Backend) {
    let stack = Stack::start(backend).await;
    assert_eq!(lots(&stack, "carol").await, Vec::<Value>::new());
    let expiry = in_secs(86_400);
    let expiry_sooner = in_secs(3_600);
    // Made in an order unlike the spending order.
    let grants = [
        ("paid-50", json!({"category": "paid"})),
        ("promo-10-never", json!({})),
        ("promo-10-later", json!({"expires_at": rfc3339(expiry)})),
        (
            "paid-10-sooner",
            json!({"category": "paid", "priority": 10, "expires_at": rfc3339(expiry_sooner)}),
        ),
        ("promo-0", json!({"priority": 0})),
        ("paid-10-never", json!({"category": "paid", "priority": 10})),
    ];
    for (key, terms) in &grants {
        let mut body = json!({"user_id": "carol", "amount": "1", "idempotency_key": key});
        for (field, value) in terms.as_object().unwrap() {
            body[field] = value.clone();
        }
        granted(&stack, body).await;
    }
    let listed = lots(&stack, "carol").await;
    let sources: Vec<&str> = listed
        .iter()
        .map(|l| l["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        [
            "promo-0",
            "paid-10-sooner",
            "promo-10-later",
            "promo-10-never",
            "paid-10-never",
            "paid-50",
        ]
    );
    let first = &listed[1];
    assert!(first["id"].as_i64().unwrap() > 0);
    assert_eq!(first["category"], "paid");
    assert_eq!(first["priority"], 10);
    assert_eq!(first["original"], "1.000000");
    assert_eq!(first["original_micros"], CREDIT);
    assert_eq!(first["remaining"], "1.000000");
    assert_eq!(first["remaining_micros"], CREDIT);
    assert_eq!(first["expires_at"], rfc3339(expiry_sooner));
    let created = DateTime::parse_from_rfc3339(first["created_at"].as_str().unwrap()).unwrap();
    assert!((now() - created.with_timezone(&Utc)).num_seconds().abs() < 60);
    assert_eq!(listed[5]["category"], "paid");
    assert_eq!(listed[5]["priority"], 50);
    assert_eq!(listed[5]["expires_at"], Value::Null);
    assert_eq!(listed[3]["category"], "promotional");
    assert_eq!(listed[3]["priority"], 10);

    // 1.5 credits: the first lot is spent (and no longer listed), the second halved.
    let entry = deduct(&stack, "carol", "1.5", "spend").await;
    assert_eq!(
        entry["draws"],
        json!([
            {"lot_id": listed[0]["id"], "amount": "1.000000", "amount_micros": CREDIT},
            {"lot_id": listed[1]["id"], "amount": "0.500000", "amount_micros": CREDIT / 2},
        ])
    );
    let after = lots(&stack, "carol").await;
    assert_eq!(after.len(), 5);
    assert_eq!(after[0]["id"], listed[1]["id"]);
    assert_eq!(after[0]["remaining"], "0.500000");
    assert_eq!(after[0]["original"], "1.000000");
    // Lots are the caller's own.
    assert_eq!(lots(&stack, "dave").await, Vec::<Value>::new());
}

async fn grants_take_each_option(backend: Backend) {
    let stack = Stack::start(backend).await;
    // Defaults: promotional, priority 10, never expires.
    let (status, body) = grant(
        &stack,
        json!({"user_id": "erin", "amount": "0.000001", "idempotency_key": "g-default"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["duplicate"], false);
    let entry = &body["entry"];
    assert_eq!(entry["kind"], "grant");
    assert_eq!(entry["user_id"], "erin");
    assert_eq!(entry["amount"], "0.000001");
    assert_eq!(entry["amount_micros"], 1);
    assert_eq!(entry["balance_after_micros"], 1);
    assert_eq!(entry["idempotency_key"], "g-default");
    assert_eq!(entry["draws"], json!([]));
    // The same request again: the original entry, once.
    let (status, again) = grant(
        &stack,
        json!({"user_id": "erin", "amount": "0.000001", "idempotency_key": "g-default"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["entry"]["id"], entry["id"]);

    // Paid (default priority 50), an explicit priority, an expiry with an offset and
    // microseconds, a description; null is read as absent.
    let expiry = in_secs(86_400) + Duration::microseconds(123_456);
    let offset = expiry
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(SecondsFormat::Micros, false);
    granted(
        &stack,
        json!({"user_id": "erin", "amount": 2, "idempotency_key": "g-paid", "category": "paid", "description": "goodwill"}),
    )
    .await;
    granted(
        &stack,
        json!({"user_id": "erin", "amount": "3", "idempotency_key": "g-prio", "category": "promotional", "priority": 100}),
    )
    .await;
    granted(
        &stack,
        json!({"user_id": "erin", "amount": "4", "idempotency_key": "g-exp", "expires_at": offset, "priority": 0}),
    )
    .await;
    granted(
        &stack,
        json!({"user_id": "erin", "amount": "5", "idempotency_key": "g-null", "category": null, "priority": null, "expires_at": null}),
    )
    .await;
    let listed = lots(&stack, "erin").await;
    let by_source = |source: &str| -> Value {
        listed
            .iter()
            .find(|l| l["source"] == source)
            .cloned()
            .unwrap_or_else(|| panic!("{source} in {listed:?}"))
    };
    let terms = |lot: Value| {
        (
            lot["category"].clone(),
            lot["priority"].clone(),
            lot["expires_at"].clone(),
        )
    };
    assert_eq!(
        terms(by_source("g-default")),
        (json!("promotional"), json!(10), Value::Null)
    );
    assert_eq!(
        terms(by_source("g-paid")),
        (json!("paid"), json!(50), Value::Null)
    );
    assert_eq!(
        terms(by_source("g-prio")),
        (json!("promotional"), json!(100), Value::Null)
    );
    assert_eq!(
        terms(by_source("g-exp")),
        (json!("promotional"), json!(0), json!(rfc3339(expiry)))
    );
    assert_eq!(
        terms(by_source("g-null")),
        (json!("promotional"), json!(10), Value::Null)
    );
    let history = stack.history("erin").await;
    assert_eq!(
        history
            .iter()
            .find(|e| e["idempotency_key"] == "g-paid")
            .unwrap()["description"],
        "goodwill"
    );
    let body = balance(&stack, "erin").await;
    assert_eq!(body["paid_micros"], 2 * CREDIT);
    assert_eq!(body["promotional_micros"], 12 * CREDIT + 1);
}

async fn grants_refuse_each_bad_value(backend: Backend) {
    let stack = Stack::start(backend).await;
    let base = json!({"user_id": "frank", "amount": "1", "idempotency_key": "k"});
    let with = |field: &str, value: Value| {
        let mut body = base.clone();
        body[field] = value;
        body
    };
    let past = rfc3339(in_secs(-60));
    let cases = [
        (with("category", json!("PAID")), "invalid_category"),
        (with("category", json!("gift")), "invalid_category"),
        (with("category", json!(1)), "invalid_category"),
        (with("priority", json!(101)), "invalid_priority"),
        (with("priority", json!(-1)), "invalid_priority"),
        (with("priority", json!(1.5)), "invalid_priority"),
        (with("priority", json!("5")), "invalid_priority"),
        (with("expires_at", json!(past)), "invalid_expires_at"),
        (
            with("expires_at", json!("2030-01-01")),
            "invalid_expires_at",
        ),
        (
            with("expires_at", json!("2030-01-01T00:00:00.0000001Z")),
            "invalid_expires_at",
        ),
        (
            with("expires_at", json!(1_900_000_000)),
            "invalid_expires_at",
        ),
        (with("amount", json!("0")), "amount_not_positive"),
        (with("amount", json!("-1")), "amount_not_positive"),
        (with("amount", json!("0.0000001")), "amount_too_precise"),
        (with("user_id", json!("")), "invalid_user_id"),
        (
            with("idempotency_key", json!("k\u{0}")),
            "invalid_idempotency_key",
        ),
        (json!({"user_id": "frank", "amount": "1"}), "invalid_json"),
    ];
    for (body, code) in cases {
        let (status, answer) = grant(&stack, body.clone()).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{body}: {answer}"
        );
    }
    // Nothing was written by the refusals, so the key is still free.
    assert_eq!(stack.history("frank").await, Vec::<Value>::new());
    granted(&stack, base.clone()).await;
    // The key again for another amount or another user: 409.
    for body in [with("amount", json!("2")), with("user_id", json!("gina"))] {
        let (status, answer) = grant(&stack, body).await;
        assert_eq!(status, StatusCode::CONFLICT, "{answer}");
        assert_eq!(answer["error"]["code"], "idempotency_key_reused");
    }
    // A user token is not a service token; a deduct-only service token lacks admin.
    let (status, answer) = grant(&stack, base.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = stack
        .post("/api/credits/grants", &stack.token("frank"), base.clone())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_service_token");
    let (status, answer) = stack
        .request(
            reqwest::Method::POST,
            "/api/credits/grants",
            None,
            Some(base.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");

    const GATEWAY: &str = "gateway-deduct-only";
    const OPS: &str = "ops-admin-only";
    let mut config = stack.bridge_config.clone();
    config.service_tokens = ServiceTokens::new([SERVICE_TOKEN])
        .with_token("gateway", GATEWAY, &[Scope::Deduct])
        .with_token("ops", OPS, &[Scope::Admin]);
    let shutdown = CancellationToken::new();
    let scoped = webhook_bridge::start(config, shutdown.clone())
        .await
        .unwrap();
    let url = format!("http://{}/api/credits/grants", scoped.local_addr);
    let body = json!({"user_id": "frank", "amount": "1", "idempotency_key": "scoped"});
    let refused = stack
        .http
        .post(&url)
        .bearer_auth(GATEWAY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let answer: Value = refused.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "insufficient_scope");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("admin")
    );
    let allowed = stack
        .http
        .post(&url)
        .bearer_auth(OPS)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);
    shutdown.cancel();
    assert_eq!(balance(&stack, "frank").await["balance_micros"], 2 * CREDIT);
}

async fn a_promotional_grant_is_spent_before_a_purchase(backend: Backend) {
    let stack = Stack::start(backend).await;
    purchase(&stack, "hana", "pi_lots_1", 25).await;
    let grant_entry = granted(
        &stack,
        json!({"user_id": "hana", "amount": "5", "idempotency_key": "welcome-hana"}),
    )
    .await;
    assert_eq!(grant_entry["balance_after"], "30.000000");
    let listed = lots(&stack, "hana").await;
    assert_eq!(listed.len(), 2);
    let (promo, paid) = (&listed[0], &listed[1]);
    assert_eq!(
        (promo["category"].as_str(), promo["source"].as_str()),
        (Some("promotional"), Some("welcome-hana"))
    );
    assert_eq!(
        (paid["category"].as_str(), paid["source"].as_str()),
        (Some("paid"), Some("pi_lots_1"))
    );
    let body = balance(&stack, "hana").await;
    assert_eq!(
        (body["paid"].as_str(), body["promotional"].as_str()),
        (Some("25.000000"), Some("5.000000"))
    );

    let entry = deduct(&stack, "hana", "7", "llm-1").await;
    assert_eq!(
        entry["draws"],
        json!([
            {"lot_id": promo["id"], "amount": "5.000000", "amount_micros": 5 * CREDIT},
            {"lot_id": paid["id"], "amount": "2.000000", "amount_micros": 2 * CREDIT},
        ])
    );
    let body = balance(&stack, "hana").await;
    assert_eq!(body["balance"], "23.000000");
    assert_eq!(
        (body["paid"].as_str(), body["promotional"].as_str()),
        (Some("23.000000"), Some("0.000000"))
    );
    let listed = lots(&stack, "hana").await;
    assert_eq!(listed.len(), 1, "the spent promotion is no longer live");
    assert_eq!(listed[0]["remaining"], "23.000000");
    // History shows the same draws, and none on the credits.
    let history = stack.history("hana").await;
    let kinds: Vec<&str> = history
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["deduction", "grant", "purchase"]);
    // The same draws, in the order drawn.
    assert_eq!(history[0]["draws"], entry["draws"]);
    assert_eq!(history[1]["draws"], json!([]));
    assert_eq!(history[2]["draws"], json!([]));
}

async fn history_shows_expirations_and_revocations_with_their_draws(backend: Backend) {
    let stack = Stack::start(backend).await;
    // A lot that expires in about a second, and one an admin revokes.
    let expiry = now() + Duration::milliseconds(1_200);
    let expiry = DateTime::from_timestamp_micros(expiry.timestamp_micros()).unwrap();
    granted(
        &stack,
        json!({"user_id": "ivan", "amount": "1.25", "idempotency_key": "short", "expires_at": rfc3339(expiry)}),
    )
    .await;
    granted(
        &stack,
        json!({"user_id": "ivan", "amount": "2", "idempotency_key": "promo", "priority": 90}),
    )
    .await;
    let listed = lots(&stack, "ivan").await;
    let (short, promo) = (
        listed[0]["id"].as_i64().unwrap(),
        listed[1]["id"].as_i64().unwrap(),
    );
    let revoked = stack
        .credits_client()
        .await
        .revoke_lot(credits_pb::RevokeLotRequest {
            lot_id: promo,
            idempotency_key: "revoke-promo".to_owned(),
            reason: "promotion withdrawn".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!revoked.duplicate);

    let wait = (expiry - now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + std::time::Duration::from_millis(100)).await;
    // Gone from the balance and the lots at its instant, before any entry says so.
    let body = balance(&stack, "ivan").await;
    assert_eq!(body["balance_micros"], 0, "{body}");
    assert_eq!(body["next_expiry"], Value::Null);
    assert_eq!(lots(&stack, "ivan").await, Vec::<Value>::new());
    // The next write to the user's ledger records the expiration.
    granted(
        &stack,
        json!({"user_id": "ivan", "amount": "1", "idempotency_key": "after"}),
    )
    .await;
    let history = stack.history("ivan").await;
    let of_kind = |kind: &str| -> Value {
        history
            .iter()
            .find(|e| e["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} in {history:?}"))
    };
    let expiration = of_kind("expiration");
    assert_eq!(expiration["amount"], "-1.250000");
    assert_eq!(expiration["idempotency_key"], format!("expire:{short}"));
    assert_eq!(
        expiration["draws"],
        json!([{"lot_id": short, "amount": "1.250000", "amount_micros": 1_250_000}])
    );
    let revocation = of_kind("revocation");
    assert_eq!(revocation["amount"], "-2.000000");
    assert_eq!(revocation["description"], "promotion withdrawn");
    assert_eq!(
        revocation["draws"],
        json!([{"lot_id": promo, "amount": "2.000000", "amount_micros": 2 * CREDIT}])
    );
    assert_eq!(balance(&stack, "ivan").await["balance"], "1.000000");
}

#[tokio::test]
async fn the_document_describes_lots_and_grants() {
    let stack = Stack::start(Backend::Sqlite).await;
    let (status, doc) = stack
        .request(reqwest::Method::GET, "/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let lots = &doc["paths"]["/api/credits/lots"]["get"];
    assert_eq!(lots["security"], json!([{"user_jwt": []}]));
    for status in ["200", "401", "503"] {
        assert!(lots["responses"][status].is_object(), "lots {status}");
    }
    let grants = &doc["paths"]["/api/credits/grants"]["post"];
    assert_eq!(grants["security"], json!([{"service_token": []}]));
    for status in ["200", "400", "401", "403", "409", "413", "503"] {
        assert!(grants["responses"][status].is_object(), "grants {status}");
    }
    let balance = &doc["components"]["schemas"]["Balance"]["properties"];
    for field in [
        "paid",
        "paid_micros",
        "promotional",
        "promotional_micros",
        "next_expiry",
    ] {
        assert!(balance[field].is_object(), "Balance.{field}");
    }
    assert!(doc["components"]["schemas"]["Entry"]["properties"]["draws"].is_object());
    let body = &doc["components"]["schemas"]["GrantBody"];
    let required: Vec<&str> = body["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(required.len(), 3, "{required:?}");
    for field in ["user_id", "amount", "idempotency_key"] {
        assert!(required.contains(&field), "{field} is required");
    }
    let properties = &body["properties"];
    let deduct = &doc["components"]["schemas"]["DeductBody"]["properties"];
    for field in ["user_id", "idempotency_key", "description", "amount"] {
        assert_eq!(
            properties[field], deduct[field],
            "GrantBody.{field} as DeductBody's"
        );
    }
    assert_eq!(
        properties["category"]["enum"],
        json!(["paid", "promotional", null])
    );
    assert_eq!(
        (
            &properties["priority"]["minimum"],
            &properties["priority"]["maximum"]
        ),
        (&json!(0), &json!(100))
    );
    assert_eq!(properties["expires_at"]["format"], "date-time");

    // The server agrees at the priority's edges.
    for (priority, expected) in [
        (0, StatusCode::OK),
        (100, StatusCode::OK),
        (101, StatusCode::BAD_REQUEST),
        (-1, StatusCode::BAD_REQUEST),
    ] {
        let (status, body) = grant(
            &stack,
            json!({"user_id": "jo", "amount": 1, "idempotency_key": format!("edge{priority}"), "priority": priority}),
        )
        .await;
        assert_eq!(status, expected, "{priority}: {body}");
    }
}
