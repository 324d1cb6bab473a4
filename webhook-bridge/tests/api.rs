//! The REST API: user and service auth, exact amounts, per-user isolation, deductions,
//! tier usage and checks, health and the OpenAPI document. Real HTTP to the bridge,
//! real gRPC behind it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use reeve_testkit::on_both_stores;

use common::{Backend, JWT_SECRET, SERVICE_TOKEN, Stack, hs256_token, now};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use webhook_bridge::auth::JwtKey;

const CREDIT: i64 = 1_000_000;
const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(format!("{KEYS}/{name}")).unwrap()
}

fn rs256_token(claims: Value, private_pem: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(private_pem).unwrap(),
    )
    .unwrap()
}

/// A token with `alg: none` and no signature, as an attacker would forge it.
fn unsigned_token(claims: &Value) -> String {
    use base64::Engine;
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    format!(
        "{}.{}.",
        encode(br#"{"alg":"none","typ":"JWT"}"#),
        encode(claims.to_string().as_bytes())
    )
}

async fn assert_unauthorized(stack: &Stack, token: &str, case: &str) {
    for path in [
        "/api/credits/balance",
        "/api/credits/history",
        "/api/tier/usage",
    ] {
        let (status, body) = stack.get(path, token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case} on {path}: {body}");
        assert!(body["error"]["code"].is_string(), "{case}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_tokens_are_verified_strictly() {
    let stack = Stack::start(Backend::Sqlite).await;
    let valid = stack.token("alice");
    assert_eq!(
        stack.get("/api/credits/balance", &valid).await.0,
        StatusCode::OK
    );
    let claims = json!({"sub": "alice", "exp": now() + 3600});
    let cases = [
        (
            "expired",
            hs256_token(json!({"sub": "alice", "exp": now() - 5}), JWT_SECRET),
        ),
        ("no exp", hs256_token(json!({"sub": "alice"}), JWT_SECRET)),
        (
            "wrong key",
            hs256_token(claims.clone(), "another-secret-of-enough-bytes"),
        ),
        ("alg none", unsigned_token(&claims)),
        (
            "RS256 instead of HS256",
            rs256_token(claims.clone(), &key_file("rs256-private.pem")),
        ),
        (
            "missing sub",
            hs256_token(json!({"exp": now() + 3600}), JWT_SECRET),
        ),
        (
            "empty sub",
            hs256_token(json!({"sub": "", "exp": now() + 3600}), JWT_SECRET),
        ),
        ("garbage", "not.a.jwt".to_owned()),
        ("service token", SERVICE_TOKEN.to_owned()),
    ];
    for (case, token) in cases {
        assert_unauthorized(&stack, &token, case).await;
    }
    let (status, body) = stack
        .request(reqwest::Method::GET, "/api/credits/balance", None, None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_token"))
    );
    let (_, body) = stack
        .get(
            "/api/credits/balance",
            &hs256_token(json!({"sub": "a", "exp": now() - 5}), JWT_SECRET),
        )
        .await;
    assert_eq!(body["error"]["code"], "token_expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_refuse_algorithm_swaps() {
    let public = key_file("rs256-public.pem");
    let stack = Stack::start_with_jwt(Backend::Sqlite, JwtKey::Rs256Pem(public.clone())).await;
    let claims = json!({"sub": "alice", "exp": now() + 3600});
    let (status, body) = stack
        .get(
            "/api/credits/balance",
            &rs256_token(claims.clone(), &key_file("rs256-private.pem")),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "alice");
    // The classic swap: HS256 "signed" with the server's public key as the secret.
    let public_text = String::from_utf8(public).unwrap();
    let cases = [
        (
            "HS256 with the public key as secret",
            hs256_token(claims.clone(), &public_text),
        ),
        (
            "HS256 with the HS secret",
            hs256_token(claims.clone(), JWT_SECRET),
        ),
        ("alg none", unsigned_token(&claims)),
        (
            "another RSA key",
            rs256_token(claims.clone(), &key_file("other-private.pem")),
        ),
        (
            "expired",
            rs256_token(
                json!({"sub": "alice", "exp": now() - 5}),
                &key_file("rs256-private.pem"),
            ),
        ),
        (
            "missing sub",
            rs256_token(json!({"exp": now() + 3600}), &key_file("rs256-private.pem")),
        ),
    ];
    for (case, token) in cases {
        assert_unauthorized(&stack, &token, case).await;
    }
}

/// Without a configured audience, identity-provider tokens carrying `aud` are accepted;
/// with one, `aud` must be present and match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_is_checked_when_configured() {
    let open = Stack::start(Backend::Sqlite).await;
    let with_aud = hs256_token(
        json!({"sub": "alice", "exp": now() + 3600, "aud": "some-idp-client"}),
        JWT_SECRET,
    );
    assert_eq!(
        open.get("/api/credits/balance", &with_aud).await.0,
        StatusCode::OK
    );
    let strict = Stack::start_with_jwt_audience(
        Backend::Sqlite,
        JwtKey::Hs256(JWT_SECRET.into()),
        Some("reeve"),
    )
    .await;
    let token = |aud: Option<&str>| {
        let mut claims = json!({"sub": "alice", "exp": now() + 3600});
        if let Some(aud) = aud {
            claims["aud"] = json!(aud);
        }
        hs256_token(claims, JWT_SECRET)
    };
    assert_eq!(
        strict
            .get("/api/credits/balance", &token(Some("reeve")))
            .await
            .0,
        StatusCode::OK
    );
    for (case, aud) in [("no aud", None), ("another aud", Some("someone-else"))] {
        assert_unauthorized(&strict, &token(aud), case).await;
    }
    let not_yet = hs256_token(
        json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 600}),
        JWT_SECRET,
    );
    assert_unauthorized(&open, &not_yet, "nbf in the future").await;
}

/// A user's token only ever reads that user's data: no route takes a user id from the
/// query or the body.
async fn users_see_only_their_own(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("alice", 7).await;
    stack.grant("bob", 3).await;
    let alice = stack.token("alice");
    for path in ["/api/credits/balance?user_id=bob", "/api/credits/balance"] {
        let (status, body) = stack.get(path, &alice).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (body["user_id"].as_str(), body["balance"].as_str()),
            (Some("alice"), Some("7.000000")),
            "{path}"
        );
    }
    let (_, history) = stack.get("/api/credits/history?user_id=bob", &alice).await;
    let entries = history["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert!(entries.iter().all(|e| e["user_id"] == "alice"));
    let (_, usage) = stack.get("/api/tier/usage?user_id=bob", &alice).await;
    assert_eq!(usage["user_id"], "alice");
    // A purchase body naming someone else still buys for the token's user.
    let (status, purchase) = stack
        .post(
            "/api/credits/purchase",
            &alice,
            json!({"amount": 5, "user_id": "bob"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{purchase}");
    let paid: Value = common::json_of(stack.http.post(format!(
        "{}/pay",
        purchase["checkout_url"].as_str().unwrap()
    )))
    .await;
    assert_eq!(paid["deliveries"][1]["status"], 200);
    assert_eq!(stack.balance("alice").await, 12 * CREDIT);
    assert_eq!(stack.balance("bob").await, 3 * CREDIT);
}

/// Service routes refuse user tokens; user routes refuse service tokens.
async fn service_and_user_routes_are_separate(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("alice", 5).await;
    let deduction = json!({"user_id": "alice", "amount": 1, "idempotency_key": "k1"});
    let alice = stack.token("alice");
    for (path, body) in [
        ("/api/credits/deduct", deduction.clone()),
        (
            "/api/credits/deduct/batch",
            json!({"items": [deduction.clone()]}),
        ),
    ] {
        let (status, reply) = stack.post(path, &alice, body.clone()).await;
        assert_eq!(
            (status, reply["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_service_token")),
            "{path}"
        );
        let (status, _) = stack.post(path, "wrong-service-token", body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        stack.balance("alice").await,
        5 * CREDIT,
        "nothing deducted by refused calls"
    );
    let (status, _) = stack
        .post("/api/credits/purchase", SERVICE_TOKEN, json!({"amount": 5}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, reply) = stack
        .post("/api/credits/deduct", SERVICE_TOKEN, deduction)
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["entry"]["balance_after"], "4.000000");
}

/// Every malformed amount is a 400 with a stable code, and nothing is written.
async fn bad_amounts_are_refused(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("alice", 10).await;
    let cases: [(&str, &str); 12] = [
        ("0", "amount_not_positive"),
        ("-1", "amount_not_positive"),
        ("\"-0.5\"", "amount_not_positive"),
        ("0.0000001", "amount_too_precise"),
        ("\"1.1234567\"", "amount_too_precise"),
        ("1e2", "invalid_amount"),
        ("\"1E2\"", "invalid_amount"),
        ("\"NaN\"", "invalid_amount"),
        ("\"Infinity\"", "invalid_amount"),
        ("null", "invalid_amount"),
        ("99999999999999999999999", "amount_overflow"),
        ("\" 1\"", "invalid_amount"),
    ];
    for (i, (amount, code)) in cases.into_iter().enumerate() {
        let body =
            format!(r#"{{"user_id":"alice","amount":{amount},"idempotency_key":"bad-{i}"}}"#);
        let response = stack
            .http
            .post(format!("{}/api/credits/deduct", stack.base))
            .bearer_auth(SERVICE_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{amount}");
        let reply: Value = response.json().await.unwrap();
        assert_eq!(reply["error"]["code"], code, "{amount}: {reply}");
    }
    // Too large for the ledger, though it parses: refused by credits-svc, still 400.
    let (status, reply) = stack
        .post(
            "/api/credits/deduct",
            SERVICE_TOKEN,
            json!({"user_id": "alice", "amount": "9000000000000", "idempotency_key": "huge"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    // Not JSON at all.
    let (status, reply) = stack
        .post("/api/credits/deduct", SERVICE_TOKEN, json!("just a string"))
        .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    assert_eq!(stack.balance("alice").await, 10 * CREDIT);
    assert_eq!(stack.history("alice").await.len(), 1, "only the grant");

    // Purchases: whole credits within the configured 5..=1000.
    let alice = stack.token("alice");
    for (amount, code) in [
        (json!(2.5), "amount_not_whole"),
        (json!(0), "amount_not_positive"),
        (json!(4), "amount_out_of_range"),
        (json!(1001), "amount_out_of_range"),
        (json!("1e3"), "invalid_amount"),
    ] {
        let (status, reply) = stack
            .post("/api/credits/purchase", &alice, json!({"amount": amount}))
            .await;
        assert_eq!(
            (status, reply["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{amount}: {reply}"
        );
    }
    let (status, reply) = stack
        .post("/api/credits/purchase", &alice, json!({"amount": "1000"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
}

/// Exact decimals, 402 with balance and required, idempotent retries, 409 on reuse.
async fn deductions_are_exact_and_idempotent(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("alice", 1).await;
    let deduct = |amount: Value, key: &str| json!({"user_id": "alice", "amount": amount, "idempotency_key": key, "description": "llm call"});
    let (status, first) = stack
        .post(
            "/api/credits/deduct",
            SERVICE_TOKEN,
            deduct(json!(0.1), "d1"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["entry"]["amount"], "-0.100000");
    assert_eq!(first["entry"]["balance_after_micros"], 900_000);
    let (status, retry) = stack
        .post(
            "/api/credits/deduct",
            SERVICE_TOKEN,
            deduct(json!("0.1"), "d1"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (retry["duplicate"].as_bool(), &retry["entry"]["id"]),
        (Some(true), &first["entry"]["id"])
    );
    let (status, reused) = stack
        .post(
            "/api/credits/deduct",
            SERVICE_TOKEN,
            deduct(json!("0.2"), "d1"),
        )
        .await;
    assert_eq!(
        (status, reused["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_key_reused"))
    );
    let (status, short) = stack
        .post(
            "/api/credits/deduct",
            SERVICE_TOKEN,
            deduct(json!("0.900001"), "d2"),
        )
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{short}");
    assert_eq!(short["error"]["code"], "insufficient_credits");
    assert_eq!(
        (
            short["error"]["balance"].as_str(),
            short["error"]["required"].as_str()
        ),
        (Some("0.900000"), Some("0.900001"))
    );
    assert_eq!(
        (
            short["error"]["balance_micros"].as_i64(),
            short["error"]["required_micros"].as_i64()
        ),
        (Some(900_000), Some(900_001))
    );
    assert_eq!(stack.balance("alice").await, 900_000);
}

/// A batch: every item gets its outcome in order; a bad item sinks nothing else.
async fn batch_outcomes_in_order(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack.grant("alice", 2).await;
    let item = |amount: Value, key: &str| json!({"user_id": "alice", "amount": amount, "idempotency_key": key});
    let items = json!([
        item(json!("0.5"), "b1"),
        item(json!("1e1"), "b2"),
        item(json!(5), "b3"),
        item(json!("0.5"), "b1"),
        item(json!(1), "b4"),
        item(json!("0.000001"), "b5"),
    ]);
    let (status, reply) = stack
        .post(
            "/api/credits/deduct/batch",
            SERVICE_TOKEN,
            json!({"items": items}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let statuses: Vec<&str> = reply["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "applied",
            "invalid",
            "insufficient",
            "duplicate",
            "applied",
            "applied"
        ]
    );
    let outcomes = &reply["outcomes"];
    assert_eq!(outcomes[1]["code"], "invalid_amount");
    assert_eq!(
        (
            outcomes[2]["balance"].as_str(),
            outcomes[2]["required"].as_str()
        ),
        (Some("1.500000"), Some("5.000000"))
    );
    assert_eq!(outcomes[5]["balance_after"], "0.499999");
    assert_eq!(stack.balance("alice").await, 499_999);
    let too_many: Vec<Value> = (0..10_001)
        .map(|i| item(json!(1), &format!("many-{i}")))
        .collect();
    let (status, reply) = stack
        .post(
            "/api/credits/deduct/batch",
            SERVICE_TOKEN,
            json!({"items": too_many}),
        )
        .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("batch_too_large"))
    );
}

/// History pages newest first with a cursor; a bad cursor or limit is a 400.
async fn history_paginates(backend: Backend) {
    let stack = Stack::start(backend).await;
    for _ in 0..5 {
        stack.grant("alice", 1).await;
    }
    let alice = stack.token("alice");
    let (status, page) = stack.get("/api/credits/history?limit=2", &alice).await;
    assert_eq!(status, StatusCode::OK);
    let mut ids: Vec<i64> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    let mut cursor = page["next_cursor"].as_str().unwrap().to_owned();
    loop {
        let (_, page) = stack
            .get(
                &format!("/api/credits/history?limit=2&cursor={cursor}"),
                &alice,
            )
            .await;
        ids.extend(
            page["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    for query in ["limit=0", "limit=501", "limit=x", "cursor=garbage"] {
        let (status, body) = stack
            .get(&format!("/api/credits/history?{query}"), &alice)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
    }
}

/// Usage lists every feature; a check answers without consuming; unknown or missing
/// features are 400s with codes.
async fn tier_usage_and_check(backend: Backend) {
    let stack = Stack::start(backend).await;
    let alice = stack.token("alice");
    let (status, usage) = stack.get("/api/tier/usage", &alice).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["tier"], "free");
    let features = usage["features"].as_array().unwrap();
    assert_eq!(features.len(), 23);
    let ads = features
        .iter()
        .find(|f| f["feature"] == "ad_generations")
        .unwrap();
    assert_eq!(
        (
            ads["limit"].as_i64(),
            ads["used"].as_i64(),
            ads["remaining"].as_i64()
        ),
        (Some(10), Some(0), Some(10))
    );
    for _ in 0..2 {
        let (status, check) = stack
            .get("/api/tier/check?feature=agent_creations", &alice)
            .await;
        assert_eq!(status, StatusCode::OK, "{check}");
        assert_eq!(
            (
                check["allowed"].as_bool(),
                check["limit"].as_i64(),
                check["used"].as_i64()
            ),
            (Some(true), Some(3), Some(0))
        );
    }
    let (status, body) = stack
        .get("/api/tier/check?feature=teleportation", &alice)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unknown_feature"))
    );
    let (status, body) = stack.get("/api/tier/check", &alice).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("missing_feature"))
    );
}

on_both_stores!(
    users_see_only_their_own,
    service_and_user_routes_are_separate,
    bad_amounts_are_refused,
    deductions_are_exact_and_idempotent,
    batch_outcomes_in_order,
    history_paginates,
    tier_usage_and_check,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_openapi() {
    let stack = Stack::start(Backend::Sqlite).await;
    let (status, _) = stack
        .request(reqwest::Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, ready) = stack
        .request(reqwest::Method::GET, "/readyz", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    let (status, doc) = stack
        .request(reqwest::Method::GET, "/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/credits/balance", "get"),
        ("/api/credits/purchase", "post"),
        ("/api/credits/deduct", "post"),
        ("/api/credits/deduct/batch", "post"),
        ("/api/credits/history", "get"),
        ("/api/credits/webhook", "post"),
        ("/api/tier/usage", "get"),
        ("/api/tier/check", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    let (status, body) = stack
        .request(reqwest::Method::GET, "/api/nope", None, None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );

    // With credits-svc gone, readiness says so.
    stack.credits_shutdown.cancel();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, ready) = stack
        .request(reqwest::Method::GET, "/readyz", None, None)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["quota_svc"], "ok");
}
