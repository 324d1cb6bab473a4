//! `/openapi.json` describes what the server does: every operation documents the
//! refusals it can answer (401, 403 for service routes, 413 for bodies, 503), request
//! schemas carry the constraints the server enforces, and the server agrees with them
//! at their edges (a value just inside is never refused for its shape, one just outside
//! is). Schemathesis (`.ci/schemathesis`) fuzzes the rest against `reeve up`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, SERVICE_TOKEN, Stack};
use reeve_runtime::ids::NO_CONTROL_PATTERN;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn every_operation_documents_its_refusals() {
    let stack = Stack::start(Backend::Sqlite).await;
    let (status, doc) = stack
        .request(reqwest::Method::GET, "/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 8);
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            let has = |status: &str| responses.contains_key(status);
            let security = operation["security"].to_string();
            let case = format!("{method} {path}");
            if path != "/api/credits/webhook" {
                assert!(has("401"), "{case}: 401");
            }
            if security.contains("service_token") {
                assert!(has("403"), "{case}: 403");
            }
            if operation.get("requestBody").is_some() {
                assert!(has("413"), "{case}: 413");
            }
            assert!(has("503"), "{case}: 503");
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{case}: {status} is the error envelope"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn schemas_carry_the_constraints_the_server_enforces() {
    let stack = Stack::start(Backend::Sqlite).await;
    let (_, doc) = stack
        .request(reqwest::Method::GET, "/openapi.json", None, None)
        .await;
    let deduct = &doc["components"]["schemas"]["DeductBody"]["properties"];
    assert_eq!(deduct["user_id"]["minLength"], 1);
    assert_eq!(deduct["user_id"]["maxLength"], 128);
    assert_eq!(deduct["user_id"]["pattern"], NO_CONTROL_PATTERN);
    assert_eq!(deduct["idempotency_key"]["minLength"], 1);
    assert_eq!(deduct["idempotency_key"]["maxLength"], 256);
    assert_eq!(deduct["idempotency_key"]["pattern"], NO_CONTROL_PATTERN);
    assert_eq!(deduct["description"]["maxLength"], 1024);
    assert!(deduct["amount"]["oneOf"][0]["pattern"].is_string());
    let parameter = |path: &str, name: &str| -> Value {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap()
    };
    let limit = parameter("/api/credits/history", "limit");
    assert_eq!(
        (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
        (&json!(1), &json!(500))
    );
    assert_eq!(limit["in"], "query");
    let feature = parameter("/api/tier/check", "feature");
    assert_eq!(feature["in"], "query");
    assert_eq!(feature["required"], true);
    let features = feature["schema"]["enum"].as_array().unwrap();
    assert_eq!(features.len(), 23, "the registry's features");
    assert!(features.contains(&json!("ad_generations")));

    // The server agrees at the edges: inside is never a 400, outside always is.
    let deduct = |user_id: String, key: String, amount: Value| {
        let stack = &stack;
        async move {
            stack
                .post(
                    "/api/credits/deduct",
                    SERVICE_TOKEN,
                    json!({"user_id": user_id, "idempotency_key": key, "amount": amount}),
                )
                .await
        }
    };
    let inside = [
        ("a".repeat(128), "k1".to_owned(), json!("0.000001")),
        ("ü".repeat(128), "k".repeat(256), json!(1)),
        ("bob".to_owned(), "k2".to_owned(), json!("999999999.999999")),
        ("bob".to_owned(), "k7".to_owned(), json!(1_000_000_000)),
    ];
    for (user_id, key, amount) in inside {
        let (status, body) = deduct(user_id, key, amount).await;
        assert_ne!(status, StatusCode::BAD_REQUEST, "{body}");
    }
    let outside = [
        (
            "a".repeat(129),
            "k3".to_owned(),
            json!(1),
            "invalid_user_id",
        ),
        (String::new(), "k4".to_owned(), json!(1), "invalid_user_id"),
        (
            "bob".to_owned(),
            "k".repeat(257),
            json!(1),
            "invalid_idempotency_key",
        ),
        (
            "bob".to_owned(),
            "k\u{85}".to_owned(),
            json!(1),
            "invalid_idempotency_key",
        ),
        (
            "bob".to_owned(),
            "k5".to_owned(),
            json!("0.0000001"),
            "amount_too_precise",
        ),
        (
            "bob".to_owned(),
            "k6".to_owned(),
            json!("0"),
            "amount_not_positive",
        ),
    ];
    for (user_id, key, amount, code) in outside {
        let (status, body) = deduct(user_id, key, amount).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{body}"
        );
    }
    let user = stack.token("alice");
    for (query, expected) in [
        ("limit=500", StatusCode::OK),
        ("limit=1", StatusCode::OK),
        ("cursor=123456789012345678", StatusCode::OK),
        ("limit=501", StatusCode::BAD_REQUEST),
        ("limit=0", StatusCode::BAD_REQUEST),
        ("limit=", StatusCode::BAD_REQUEST),
        ("cursor=", StatusCode::BAD_REQUEST),
    ] {
        let (status, body) = stack
            .get(&format!("/api/credits/history?{query}"), &user)
            .await;
        assert_eq!(status, expected, "{query}: {body}");
    }
    for feature in features {
        let path = format!("/api/tier/check?feature={}", feature.as_str().unwrap());
        let (status, body) = stack.get(&path, &user).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    let (status, _) = stack.get("/api/tier/check", &user).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
