//! Every error the bridge answers is the README's envelope
//! `{"error": {"code": "...", "message": "..."}}`, the HTTP layer's own refusals
//! included: 413 (body too large), 405, 404 for unknown routes, and a duplicated query
//! parameter.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, SERVICE_TOKEN, Stack};
use reqwest::StatusCode;
use serde_json::Value;

/// Sends a request and checks that the answer is the envelope with `status` and `code`.
async fn assert_envelope(
    request: reqwest::RequestBuilder,
    status: StatusCode,
    code: &str,
) -> reqwest::header::HeaderMap {
    let response = request.send().await.unwrap();
    let headers = response.headers().clone();
    let got = response.status();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    assert!(
        content_type.starts_with("application/json"),
        "{status}: content-type {content_type:?}, body {text:?}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    headers
}

#[tokio::test]
async fn http_layer_refusals_are_json_envelopes() {
    let stack = Stack::start(Backend::Sqlite).await;
    let url = |path: &str| format!("{}{path}", stack.base);
    let user = stack.token("alice");
    let too_large = vec![b' '; 9 * 1024 * 1024];

    // 413, on a JSON route and on the webhook (which reads raw bytes).
    assert_envelope(
        stack
            .http
            .post(url("/api/credits/deduct"))
            .bearer_auth(SERVICE_TOKEN)
            .header("content-type", "application/json")
            .body(too_large.clone()),
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    )
    .await;
    assert_envelope(
        stack
            .http
            .post(url("/api/credits/webhook"))
            .header("content-type", "application/json")
            .header("stripe-signature", "t=1,v1=00")
            .body(too_large),
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    )
    .await;

    // 405, keeping the Allow header.
    let headers = assert_envelope(
        stack
            .http
            .get(url("/api/credits/deduct"))
            .bearer_auth(SERVICE_TOKEN),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    assert_eq!(headers.get("allow").unwrap(), "POST");
    assert_envelope(
        stack.http.delete(url("/healthz")),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;

    // 404 for routes nobody serves.
    assert_envelope(
        stack.http.get(url("/api/credits/nope")),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_envelope(
        stack
            .http
            .get(url("/api/credits/balance/"))
            .bearer_auth(&user),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    // A duplicated query parameter.
    assert_envelope(
        stack
            .http
            .get(url(
                "/api/tier/check?feature=ad_generations&feature=ad_generations",
            ))
            .bearer_auth(&user),
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    assert_envelope(
        stack
            .http
            .get(url("/api/credits/history?limit=5&limit=6"))
            .bearer_auth(&user),
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    assert_envelope(
        stack
            .http
            .get(url("/api/credits/history?cursor=1&cursor=2"))
            .bearer_auth(&user),
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
}
