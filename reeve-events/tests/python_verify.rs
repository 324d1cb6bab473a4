//! A receiver in another language verifies our signatures: Python's `standardwebhooks`
//! package checks what the dispatcher sent (with two live secrets during a rotation).
//! The interpreter is `REEVE_PYTHON` (default `python3`); without the package the test
//! says so and passes (`pip install standardwebhooks` to run it), except under CI
//! (`CI` set, as `.ci/run` does), where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use reeve_events::{Dispatcher, DispatcherConfig, EventStore, NewEvent};
use reeve_runtime::clock::Clock;
use reeve_testkit::{Backend, ScratchDb};

const VERIFY: &str = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
case = json.load(sys.stdin)
for secret in case["secrets"]:
    Webhook(secret).verify(case["body"], case["headers"])
print("verified")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_standardwebhooks_verifies_what_we_send() {
    let python = std::env::var("REEVE_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let has_package = Command::new(&python)
        .args(["-c", "import standardwebhooks"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_package {
        assert!(
            std::env::var_os("CI").is_none(),
            "{python} has no standardwebhooks package; CI installs it, so it must run there"
        );
        eprintln!("skipped: {python} has no standardwebhooks package");
        return;
    }
    let seen: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
    let s = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| async move {
            s.lock().unwrap().push((headers, body));
            "ok"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let db = ScratchDb::new(Backend::Sqlite, "pyverify").await;
    let store = EventStore::open(&db.url).await.unwrap();
    let now = reeve_runtime::clock::now_us();
    let endpoint = store.add_endpoint(&url, &[], now).await.unwrap();
    let rotated = store
        .rotate_secret(&endpoint.id, 3_600_000_000, now)
        .await
        .unwrap()
        .unwrap();
    let event = NewEvent::new(
        "credits.balance_low",
        Some("alice"),
        serde_json::json!({"user_id": "alice", "available": "0.500000", "note": "é ✓"}),
    );
    store
        .insert(std::slice::from_ref(&event), now)
        .await
        .unwrap();
    let dispatcher = Dispatcher::new(store, DispatcherConfig::default(), Clock::system()).unwrap();
    assert_eq!(dispatcher.run_once().await.unwrap(), 1);

    let (headers, body) = seen.lock().unwrap().pop().unwrap();
    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
    let case = serde_json::json!({
        "secrets": [endpoint.secret, rotated],
        "body": String::from_utf8(body.to_vec()).unwrap(),
        "headers": {
            "webhook-id": header("webhook-id"),
            "webhook-timestamp": header("webhook-timestamp"),
            "webhook-signature": header("webhook-signature"),
        },
    });
    let mut child = Command::new(&python)
        .args(["-c", VERIFY])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(case.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "python refused: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "verified");
    assert_eq!(header("webhook-id"), event.id);
}
