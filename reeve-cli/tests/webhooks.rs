//! `reeve endpoints` and `reeve deliveries`: the CLI contracts (text and `--json`) over
//! a real outbox (SQLite file), with a dispatcher sending to a failing receiver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use reeve_events::{Dispatcher, DispatcherConfig, EventStore, NewEvent};
use serde_json::Value;

const REEVE: &str = env!("CARGO_BIN_EXE_reeve");

struct Cli {
    dir: tempfile::TempDir,
    url: String,
}

impl Cli {
    fn new() -> Cli {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/reeve.db", dir.path().display());
        Cli { dir, url }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(REEVE)
            .args(args)
            .arg("--data-dir")
            .arg(self.dir.path())
            .env("REEVE_DATABASE_URL", &self.url)
            .env_remove("REEVE_CONFIG_FILE")
            .output()
            .unwrap()
    }

    /// Writes one event to the outbox and has a dispatcher make its one delivery.
    async fn send_event(&self, kind: &str, user: &str) -> (NewEvent, Dispatcher) {
        let store = EventStore::open(&self.url).await.unwrap();
        let event = NewEvent::new(kind, Some(user), serde_json::json!({"user_id": user}));
        store
            .insert(std::slice::from_ref(&event), reeve_runtime::clock::now_us())
            .await
            .unwrap();
        let dispatcher = Dispatcher::new(
            store,
            DispatcherConfig::default(),
            reeve_runtime::clock::Clock::system(),
        )
        .unwrap();
        assert_eq!(dispatcher.run_once().await.unwrap(), 1);
        (event, dispatcher)
    }

    fn json(&self, args: &[&str]) -> Value {
        let output = self.run(args);
        assert!(output.status.success(), "{args:?}: {output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_deliveries_keep_their_contracts() {
    let cli = Cli::new();
    // A receiver that always fails.
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy") }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let added = cli.json(&[
        "endpoints",
        "add",
        &url,
        "--events",
        "credits.balance_low,lot.expiring",
        "--json",
    ]);
    let keys: Vec<&str> = added
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 4);
    for key in ["id", "url", "events", "secret"] {
        assert!(added.get(key).is_some(), "{key} in {added}");
    }
    assert!(added["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(added["url"], url.as_str());
    assert_eq!(
        added["events"],
        serde_json::json!(["credits.balance_low", "lot.expiring"])
    );
    let id = added["id"].as_str().unwrap().to_owned();

    let text = cli.run(&["endpoints", "add", "https://example.com/other"]);
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("secret   whsec_"), "{text}");
    let bad = cli.run(&["endpoints", "add", "ftp://example.com/x"]);
    assert_eq!(bad.status.code(), Some(1));

    let list = cli.json(&["endpoints", "list", "--json"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|e| e.get("secret").is_none()));
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["status"], "enabled");

    // The second endpoint (every type) is removed before any event.
    let other = list[1]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        cli.json(&["endpoints", "remove", &other, "--json"]),
        serde_json::json!({"id": other, "removed": true})
    );
    assert_eq!(
        cli.run(&["endpoints", "remove", &other]).status.code(),
        Some(1)
    );
    let (event, dispatcher) = cli.send_event("credits.balance_low", "alice").await;

    let failed = cli.json(&["deliveries", "--failed", "--endpoint", &id, "--json"]);
    let failed = failed.as_array().unwrap();
    assert_eq!(failed.len(), 1);
    let attempt = &failed[0];
    assert_eq!(attempt["event_id"], event.id.as_str());
    assert_eq!(attempt["event_type"], "credits.balance_low");
    assert_eq!(attempt["endpoint_id"], id.as_str());
    assert_eq!(attempt["attempt"], 1);
    assert_eq!(attempt["outcome"], "failed");
    assert_eq!(attempt["status_code"], 503);
    assert_eq!(attempt["response_excerpt"], "busy");
    assert!(attempt["attempted_at"].as_str().unwrap().ends_with('Z'));
    let text = cli.run(&["deliveries"]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains(&event.id) && text.contains("#1") && text.contains("503"),
        "{text}"
    );

    let delivery = attempt["delivery_id"].as_str().unwrap().to_owned();
    // Waiting for its back-off: a manual retry makes it due now, and it is sent again
    // with the same webhook-id.
    assert_eq!(
        cli.json(&["deliveries", "retry", &delivery, "--json"]),
        serde_json::json!({"delivery_id": delivery, "outcome": "scheduled"})
    );
    assert_eq!(dispatcher.run_once().await.unwrap(), 1);
    let log = cli.json(&["deliveries", "--json"]);
    assert_eq!(log.as_array().unwrap().len(), 2);
    assert_eq!(log[0]["attempt"], 2);
    assert_eq!(log[0]["event_id"], event.id.as_str());
    assert_eq!(
        cli.run(&["deliveries", "retry", "dlv_missing"])
            .status
            .code(),
        Some(1)
    );
    let none = cli.json(&["deliveries", "--endpoint", "ep_other", "--json"]);
    assert_eq!(none, serde_json::json!([]));
}

/// `reeve endpoints rotate-secret` and `reeve endpoints enable`: after a rotation every
/// message carries two signatures (new and old secret) until the overlap ends; a
/// disabled endpoint is enabled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_is_rotated_with_an_overlap_and_a_disabled_endpoint_enabled() {
    let cli = Cli::new();
    let signatures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = std::sync::Arc::clone(&signatures);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let seen = std::sync::Arc::clone(&seen);
            async move {
                let signature = headers
                    .get("webhook-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                seen.lock().unwrap().push(signature);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let added = cli.json(&["endpoints", "add", &url, "--json"]);
    let id = added["id"].as_str().unwrap().to_owned();
    let rotated = cli.json(&["endpoints", "rotate-secret", &id, "--json"]);
    let new_secret = rotated["secret"].as_str().unwrap();
    assert!(new_secret.starts_with("whsec_"), "{rotated}");
    assert_ne!(new_secret, added["secret"].as_str().unwrap());
    assert_eq!(rotated["id"], id.as_str());
    assert!(
        rotated["previous_secret_valid_until"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let text = cli.run(&["endpoints", "rotate-secret", "ep_missing"]);
    assert_eq!(text.status.code(), Some(1));
    let text = cli.run(&["endpoints", "rotate-secret", &id, "--overlap-hours", "721"]);
    assert_eq!(text.status.code(), Some(2), "an overlap beyond 30 days");

    let (_, _dispatcher) = cli.send_event("credits.depleted", "ann").await;
    let header = signatures.lock().unwrap()[0].clone();
    let parts: Vec<&str> = header.split(' ').collect();
    assert_eq!(parts.len(), 2, "new and old secret sign: {header}");
    assert!(parts.iter().all(|p| p.starts_with("v1,")), "{header}");
    assert_ne!(parts[0], parts[1]);

    // Disabled (as days of failures leave it), then enabled by the operator.
    let pool = sqlx::SqlitePool::connect(&cli.url).await.unwrap();
    sqlx::query(
        "UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = 'failing' \
         WHERE endpoint_id = $1",
    )
    .bind(&id)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        cli.json(&["endpoints", "list", "--json"])[0]["status"],
        "disabled"
    );
    assert_eq!(
        cli.json(&["endpoints", "enable", &id, "--json"]),
        serde_json::json!({"id": id, "status": "enabled"})
    );
    let list = cli.json(&["endpoints", "list", "--json"]);
    assert_eq!(list[0]["status"], "enabled");
    assert_eq!(list[0]["disabled_reason"], Value::Null);
    assert_eq!(
        cli.run(&["endpoints", "enable", "ep_missing"])
            .status
            .code(),
        Some(1)
    );
}
