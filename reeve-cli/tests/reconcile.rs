//! `reeve reconcile` and `reeve events` from the CLI, end to end: the real `reeve` binary
//! runs `reeve up` with `REEVE_FAKE_STRIPE_WEBHOOKS=off` in an empty folder; a payment
//! Stripe knows and the ledger does not is reported (exit 1, the JSON contract),
//! repaired (exit 0), and a dispute left needing attention is listed, shown and
//! replayed without moving money twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const REEVE: &str = env!("CARGO_BIN_EXE_reeve");
const FAKE_KEY: &str = "sk_test_reeve_fake_stripe";
const CLASSES: [&str; 10] = [
    "matched",
    "missing_credit",
    "amount_mismatch",
    "duplicate_credit",
    "refund_not_debited",
    "dispute_not_debited",
    "dispute_reinstated_not_returned",
    "unknown_user",
    "ledger_without_payment",
    "ignored_currency",
];

struct Up {
    child: Child,
    dir: PathBuf,
    fields: HashMap<String, String>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    fn start(dir: &Path) -> Up {
        let mut child = Command::new(REEVE)
            .arg("up")
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REEVE_HTTP_ADDR", "127.0.0.1:0")
            .env("REEVE_CREDITS_ADDR", "127.0.0.1:0")
            .env("REEVE_QUOTA_ADDR", "127.0.0.1:0")
            .env("REEVE_FAKE_STRIPE_ADDR", "127.0.0.1:0")
            .env("REEVE_FAKE_STRIPE_WEBHOOKS", "off")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("listening ") {
                    let _ = ready_tx.send(line);
                }
            }
        });
        let Ok(line) = ready_rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            panic!("reeve up did not start");
        };
        let fields = line
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Up {
            child,
            dir: dir.to_owned(),
            fields,
        }
    }

    fn stripe(&self) -> String {
        format!("http://{}/v1", self.fields["stripe"])
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(REEVE)
            .args(args)
            .current_dir(&self.dir)
            .env_clear()
            .env("REEVE_CREDITS_ADDR", &self.fields["credits"])
            .env("REEVE_HTTP_ADDR", &self.fields["http"])
            .env("REEVE_FAKE_STRIPE_ADDR", &self.fields["stripe"])
            .output()
            .unwrap()
    }

    /// Exit code and stdout as JSON.
    fn json(&self, args: &[&str]) -> (Option<i32>, Value) {
        let output = self.run(args);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "{args:?}: {e}: {text} / {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.code(), value)
    }
}

async fn stripe_post(http: &reqwest::Client, url: String, form: &[(&str, &str)]) -> Value {
    let response = http
        .post(url)
        .bearer_auth(FAKE_KEY)
        .form(form)
        .send()
        .await
        .unwrap();
    response.json().await.unwrap()
}

fn item<'a>(report: &'a Value, stripe_id: &str) -> &'a Value {
    report["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["stripe_id"] == stripe_id)
        .unwrap_or_else(|| panic!("no item {stripe_id} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_repairs_and_events_replay_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path());
    let http = reqwest::Client::new();

    // Paid at Stripe; its webhook dropped (REEVE_FAKE_STRIPE_WEBHOOKS=off).
    let paid = stripe_post(
        &http,
        format!("{}/test_helpers/payment_intents", up.stripe()),
        &[("amount", "2500"), ("metadata[user_id]", "alice")],
    )
    .await;
    assert_eq!(paid["delivery"]["status"], "dropped", "{paid}");
    let pi = paid["id"].as_str().unwrap().to_owned();

    let (code, report) = up.json(&["reconcile", "--json"]);
    assert_eq!(code, Some(1), "differences remain: {report}");
    for class in CLASSES {
        assert!(
            report["totals"][class]["count"].is_u64(),
            "{class}: {report}"
        );
        assert!(report["totals"][class]["amount_micros"].is_i64());
    }
    assert!(report["since"].is_string() && report["until"].is_string());
    assert_eq!(report["totals"]["missing_credit"]["count"], 1);
    assert_eq!(
        report["totals"]["missing_credit"]["amount_micros"],
        25_000_000
    );
    let missing = item(&report, &pi);
    assert_eq!(missing["class"], "missing_credit");
    assert_eq!(missing["user_id"], "alice");
    assert_eq!(missing["amount_micros"], 25_000_000);
    assert_eq!(missing["entry_ids"], serde_json::json!([]));
    assert_eq!(missing["repaired"], false);

    // Webhooks back on: a dispute of that payment reaches the bridge before its credit
    // and waits for a person.
    stripe_post(
        &http,
        format!("{}/test_helpers/webhooks/on", up.stripe()),
        &[],
    )
    .await;
    let disputed = stripe_post(
        &http,
        format!("{}/test_helpers/disputes", up.stripe()),
        &[("payment_intent", &pi)],
    )
    .await;
    assert_eq!(disputed["delivery"]["status"], 200, "{disputed}");
    let (code, attention) = up.json(&["--json", "events", "attention"]);
    assert_eq!(code, Some(0));
    let waiting = attention["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_type"] == "charge.dispute.created")
        .unwrap_or_else(|| panic!("{attention}"))
        .clone();
    assert_eq!(waiting["outcome"], "needs_attention");
    let event_id = waiting["event_id"].as_str().unwrap();
    let (code, shown) = up.json(&["events", "show", event_id]);
    assert_eq!(code, Some(0));
    assert_eq!(shown["payload"]["type"], "charge.dispute.created");

    // --repair credits the payment and debits the dispute, with the webhooks' keys.
    let (code, repaired) = up.json(&["--json", "reconcile", "--repair"]);
    assert_eq!(code, Some(0), "{repaired}");
    assert_eq!(item(&repaired, &pi)["repaired"], true);
    assert_eq!(repaired["totals"]["dispute_not_debited"]["count"], 1);
    let (_, balance) = up.json(&["--json", "balance", "alice"]);
    assert_eq!(balance["balance_micros"], 0);

    // The replay goes through the webhook path: the debit is already there.
    let (code, replayed) = up.json(&["--json", "events", "replay", event_id]);
    assert_eq!(code, Some(0), "{replayed}");
    assert_eq!(replayed["outcome"], "debited");
    let (_, balance) = up.json(&["--json", "balance", "alice"]);
    assert_eq!(balance["balance_micros"], 0);
    let (code, _) = up.json(&["reconcile", "--json"]);
    assert_eq!(code, Some(0));

    let bad = up.run(&["reconcile", "--since", "yesterday"]);
    assert_eq!(bad.status.code(), Some(2));
}
