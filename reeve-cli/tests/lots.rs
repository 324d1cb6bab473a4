//! Credit lots from the CLI, end to end: the real `reeve` binary runs `reeve up` in an
//! empty folder, then `reeve grant` with `--paid`, `--priority` and `--expires`,
//! `reeve lots` (table and `--json`, the same lots as REST), `reeve history` with draws,
//! `reeve balance` with its paid and promotional parts, and the CLI's refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

const REEVE: &str = env!("CARGO_BIN_EXE_reeve");

/// A running `reeve up` and the addresses it printed.
struct Up {
    child: Child,
    dir: PathBuf,
    http: String,
    credits: String,
    quota: String,
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
        let fields: HashMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .collect();
        Up {
            http: format!("http://{}", fields["http"]),
            credits: fields["credits"].to_owned(),
            quota: fields["quota"].to_owned(),
            dir: dir.to_owned(),
            child,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(REEVE)
            .args(args)
            .current_dir(&self.dir)
            .env_clear()
            .env("REEVE_CREDITS_ADDR", &self.credits)
            .env("REEVE_QUOTA_ADDR", &self.quota)
            .output()
            .unwrap()
    }

    /// A command that must succeed; its stdout.
    fn cli(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "reeve {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.cli(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// A command that must fail; its exit code and stderr.
    fn refused(&self, args: &[&str]) -> (Option<i32>, String) {
        let output = self.run(args);
        assert!(!output.status.success(), "reeve {args:?} succeeded");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.get(format!("{base}/readyz")).send().await
            && response.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz never turned 200");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// RFC 3339 for `secs` from now, to the second, as the bridge writes instants.
fn in_secs(secs: i64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    webhook_bridge::routes::timestamp(prost_types::Timestamp {
        seconds: i64::try_from(now.as_secs()).unwrap() + secs,
        nanos: 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_options_lots_history_and_balance_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path());
    let http = reqwest::Client::new();
    wait_ready(&http, &up.http).await;
    let expiry = in_secs(86_400);

    // Defaults (promotional, 10), --paid (50), --priority with --expires.
    let promo = up.json(&["grant", "alice", "5", "--key", "promo-1"]);
    assert_eq!(promo["duplicate"], false);
    assert_eq!(promo["entry"]["kind"], "grant");
    assert_eq!(promo["entry"]["draws"], json!([]));
    up.cli(&["grant", "alice", "3", "--key", "paid-1", "--paid"]);
    up.cli(&[
        "grant",
        "alice",
        "2",
        "--key",
        "soon-1",
        "--priority",
        "0",
        "--expires",
        &expiry,
        "--reason",
        "spring promotion",
    ]);
    // The same key and request again: applied once.
    let again = up.json(&["grant", "alice", "5", "--key", "promo-1"]);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["entry"]["id"], promo["entry"]["id"]);

    let lots = up.json(&["lots", "alice"]);
    assert_eq!(lots["user_id"], "alice");
    let listed = lots["lots"].as_array().unwrap();
    let terms: Vec<(&str, &str, i64, &Value)> = listed
        .iter()
        .map(|l| {
            (
                l["source"].as_str().unwrap(),
                l["category"].as_str().unwrap(),
                l["priority"].as_i64().unwrap(),
                &l["expires_at"],
            )
        })
        .collect();
    assert_eq!(
        terms,
        [
            ("soon-1", "promotional", 0, &json!(expiry)),
            ("promo-1", "promotional", 10, &Value::Null),
            ("paid-1", "paid", 50, &Value::Null),
        ]
    );
    assert_eq!(listed[0]["remaining"], "2.000000");
    assert_eq!(listed[0]["original_micros"], 2_000_000);
    // The CLI's JSON is the REST API's.
    let token = up.cli(&["dev-token", "alice"]).trim().to_owned();
    let rest: Value = http
        .get(format!("{}/api/credits/lots", up.http))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest, lots);
    let table = up.cli(&["lots", "alice"]);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(
        rows[0].starts_with("id") && rows[0].contains("expires_at"),
        "{table}"
    );
    assert!(
        rows[1].contains("soon-1") && rows[1].contains(&expiry),
        "{table}"
    );
    assert!(
        rows[3].contains("paid-1") && rows[3].contains("never"),
        "{table}"
    );

    let balance = up.json(&["balance", "alice"]);
    assert_eq!(balance["balance"], "10.000000");
    assert_eq!(balance["paid"], "3.000000");
    assert_eq!(balance["promotional_micros"], 7_000_000);
    assert_eq!(
        balance["next_expiry"],
        json!({"at": expiry, "amount": "2.000000", "amount_micros": 2_000_000})
    );

    // A deduction of 3 draws the soon lot (2) then the promotion (1).
    let service = {
        let text = std::fs::read_to_string(dir.path().join("reeve-data/dev-secrets.toml")).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        table["REEVE_SERVICE_TOKEN"].as_str().unwrap().to_owned()
    };
    let deducted = http
        .post(format!("{}/api/credits/deduct", up.http))
        .bearer_auth(&service)
        .json(&json!({"user_id": "alice", "amount": "3", "idempotency_key": "llm-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(deducted.status(), 200);
    let (soon_id, promo_id) = (&listed[0]["id"], &listed[1]["id"]);
    let history = up.json(&["history", "alice"]);
    let deduction = &history["entries"][0];
    assert_eq!(deduction["kind"], "deduction");
    // In the order drawn: the soon lot first, then the promotion.
    assert_eq!(
        deduction["draws"],
        json!([
            {"lot_id": soon_id, "amount": "2.000000", "amount_micros": 2_000_000},
            {"lot_id": promo_id, "amount": "1.000000", "amount_micros": 1_000_000},
        ])
    );
    let table = up.cli(&["history", "alice"]);
    assert!(table.lines().next().unwrap().contains("draws"), "{table}");
    assert!(
        table.contains(&format!("lot {soon_id}: 2.000000")),
        "{table}"
    );
    assert!(
        table.contains(&format!("lot {promo_id}: 1.000000")),
        "{table}"
    );
    assert!(table.contains("spring promotion"), "{table}");

    // The spent lot is gone from the live list, and back with --all.
    assert_eq!(
        up.json(&["lots", "alice"])["lots"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let all = up.json(&["lots", "alice", "--all"]);
    let spent = all["lots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == *soon_id)
        .cloned()
        .unwrap();
    assert_eq!(spent["remaining_micros"], 0);

    // Refusals: nothing written, a message that says why.
    let (code, stderr) = up.refused(&["grant", "alice", "1", "--key", "k", "--priority", "101"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--priority"), "{stderr}");
    let (_, stderr) = up.refused(&["grant", "alice", "1", "--key", "k", "--expires", "tomorrow"]);
    assert!(
        stderr.contains("--expires") && stderr.contains("RFC 3339"),
        "{stderr}"
    );
    let past = in_secs(-60);
    let (_, stderr) = up.refused(&["grant", "alice", "1", "--key", "k", "--expires", &past]);
    assert!(stderr.contains("in the future"), "{stderr}");
    let (_, stderr) = up.refused(&["grant", "alice", "9", "--key", "promo-1"]);
    assert!(stderr.contains("AlreadyExists"), "{stderr}");
    assert_eq!(up.json(&["balance", "alice"])["balance"], "7.000000");
}
