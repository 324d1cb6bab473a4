//! End to end: the real `reeve` binary, started as a new user would (`reeve up` in an
//! empty folder), driven through REST, the fake Stripe and the CLI, then stopped with
//! SIGTERM. Also on PostgreSQL, with bad configuration, and under load while stopping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_runtime::auth::BearerToken;
use serde_json::{Value, json};

const REEVE: &str = env!("CARGO_BIN_EXE_reeve");

/// A running `reeve up`, its printed addresses and everything it wrote.
struct Up {
    child: Child,
    dir: PathBuf,
    env: Vec<(String, String)>,
    http: String,
    credits: String,
    quota: String,
    stripe: String,
    output: Arc<Mutex<String>>,
}

fn collect(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<String>>,
    ready: Option<std::sync::mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let (Some(ready), true) = (&ready, line.starts_with("listening ")) {
                let _ = ready.send(line.clone());
            }
            let mut output = output.lock().unwrap();
            output.push_str(&line);
            output.push('\n');
        }
    });
}

impl Up {
    fn start(dir: &Path, env: &[(&str, &str)]) -> Up {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for (key, value) in [
            ("REEVE_HTTP_ADDR", "127.0.0.1:0"),
            ("REEVE_CREDITS_ADDR", "127.0.0.1:0"),
            ("REEVE_QUOTA_ADDR", "127.0.0.1:0"),
            ("REEVE_FAKE_STRIPE_ADDR", "127.0.0.1:0"),
        ] {
            if !env.iter().any(|(k, _)| k == key) {
                env.push((key.to_owned(), value.to_owned()));
            }
        }
        let mut child = Command::new(REEVE)
            .arg("up")
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        collect(child.stdout.take().unwrap(), output.clone(), Some(ready_tx));
        collect(child.stderr.take().unwrap(), output.clone(), None);
        let line = match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("reeve up did not start:\n{}", output.lock().unwrap());
            }
        };
        let fields: HashMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .collect();
        Up {
            http: format!("http://{}", fields["http"]),
            credits: fields["credits"].to_owned(),
            quota: fields["quota"].to_owned(),
            stripe: format!("http://{}", fields["stripe"]),
            child,
            dir: dir.to_owned(),
            env,
            output,
        }
    }

    /// Runs a CLI command against this system (same folder, same variables).
    fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(REEVE)
            .args(args)
            .current_dir(&self.dir)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("REEVE_CREDITS_ADDR", &self.credits)
            .env("REEVE_QUOTA_ADDR", &self.quota)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "reeve {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn secret(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join("reeve-data/dev-secrets.toml")).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        table[name].as_str().unwrap().to_owned()
    }

    /// SIGTERM, then the exit status (within 60 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "reeve up did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
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

/// purchase → pay → webhook → balance; CLI grant; REST deduct; history through REST and
/// the CLI; SIGTERM; nothing secret in the output.
async fn full_flow(env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path(), env);
    let http = reqwest::Client::new();
    wait_ready(&http, &up.http).await;

    let token = up.cli(&["dev-token", "alice"]).trim().to_owned();
    let auth = format!("Bearer {token}");
    let purchase: Value = http
        .post(format!("{}/api/credits/purchase", up.http))
        .header("authorization", &auth)
        .json(&json!({"amount": 25}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let checkout_url = purchase["checkout_url"]
        .as_str()
        .unwrap_or_else(|| panic!("{purchase}"));
    assert!(
        checkout_url.starts_with(&up.stripe),
        "{checkout_url} is the local fake"
    );
    let paid: Value = http
        .get(checkout_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(paid["deliveries"][1]["status"], 200, "{paid}");

    up.cli(&["grant", "alice", "5", "--key", "welcome-alice"]);
    up.cli(&["grant", "alice", "5", "--key", "welcome-alice"]);
    let service = format!("Bearer {}", up.secret("REEVE_SERVICE_TOKEN"));
    let deducted = http
        .post(format!("{}/api/credits/deduct", up.http))
        .header("authorization", &service)
        .json(&json!({"user_id": "alice", "amount": "1.5", "idempotency_key": "llm-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(deducted.status(), 200);

    let balance: Value = http
        .get(format!("{}/api/credits/balance", up.http))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(balance["balance"], "28.500000", "{balance}");
    let history: Value = serde_json::from_str(&up.cli(&["--json", "history", "alice"])).unwrap();
    let kinds: Vec<&str> = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["deduction", "grant", "purchase"]);
    let cli_balance: Value =
        serde_json::from_str(&up.cli(&["--json", "balance", "alice"])).unwrap();
    assert_eq!(cli_balance["balance_micros"], 28_500_000);
    assert!(
        up.cli(&["history", "alice"]).contains("welcome-alice"),
        "the table shows the grant's key"
    );
    up.cli(&["set-tier", "alice", "pro"]);
    let usage: Value = serde_json::from_str(&up.cli(&["--json", "usage", "alice"])).unwrap();
    assert_eq!(usage["tier"], "pro");
    let metrics = http
        .get(format!("{}/metrics", up.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("reeve_webhook_events_total"), "{metrics}");
    assert!(metrics.contains("reeve_rpc_requests_total"));

    let status = up.terminate();
    assert!(status.success(), "exit status {status:?}\n{}", up.output());
    let output = up.output();
    assert!(output.contains("Reeve stopped."), "{output}");
    eprintln!("reeve up wrote {} lines of output", output.lines().count());
    for (name, secret) in [
        ("user JWT", token.as_str()),
        ("service token", &up.secret("REEVE_SERVICE_TOKEN")),
        ("JWT secret", &up.secret("REEVE_JWT_HS256_SECRET")),
        ("webhook secret", &up.secret("STRIPE_WEBHOOK_SECRET")),
        ("Stripe key", "sk_test_reeve_fake_stripe"),
    ] {
        assert!(
            !output.contains(secret),
            "the {name} appears in the output of reeve up:\n{output}"
        );
    }
    // The JWT's signature part alone must not leak either.
    let signature = token.rsplit('.').next().unwrap();
    assert!(!output.contains(signature));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reeve_up_on_sqlite_from_an_empty_folder() {
    // Debug logs from every crate: secrets must stay out of those too.
    full_flow(&[("RUST_LOG", "debug")]).await;
}

fn postgres_base_url() -> String {
    std::env::var("REEVE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A PostgreSQL schema of its own, dropped at the end.
async fn with_schema<F: std::future::Future<Output = ()>>(test: impl FnOnce(String) -> F) {
    let schema = format!(
        "reeve_up_test_{}_{}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_base_url())
        .await
        .unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    test(format!(
        "{}?options[search_path]={schema}",
        postgres_base_url()
    ))
    .await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reeve_up_on_postgres() {
    with_schema(|url| async move {
        full_flow(&[("REEVE_DATABASE_URL", &url), ("RUST_LOG", "info")]).await
    })
    .await;
}

#[test]
fn bad_configuration_exits_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[(&str, &str)], &str); 7] = [
        (&[("REEVE_LOG_FORMAT", "xml")], "REEVE_LOG_FORMAT"),
        (
            &[("REEVE_JWT_RS256_PUBLIC_KEY_FILE", "/nonexistent/key.pem")],
            "REEVE_JWT_RS256_PUBLIC_KEY_FILE",
        ),
        (
            &[("REEVE_DATABASE_URL", "mysql://localhost/reeve")],
            "REEVE_DATABASE_URL",
        ),
        (&[("REEVE_HTTP_ADDR", "not-an-address")], "REEVE_HTTP_ADDR"),
        (&[("REEVE_PURCHASE_MAX", "lots")], "REEVE_PURCHASE_MAX"),
        (
            &[
                ("STRIPE_SECRET_KEY", "sk_test_x"),
                ("STRIPE_API_BASE", "ftp://stripe.example"),
            ],
            "STRIPE_API_BASE",
        ),
        (
            &[("REEVE_QUOTA_CONFIG", "/nonexistent/quotas.toml")],
            "REEVE_QUOTA_CONFIG",
        ),
    ];
    for (env, variable) in cases {
        let output = Command::new(REEVE)
            .arg("up")
            .current_dir(dir.path())
            .env_clear()
            .envs(env.iter().copied())
            .env(
                "REEVE_HTTP_ADDR",
                env.iter()
                    .find(|(k, _)| *k == "REEVE_HTTP_ADDR")
                    .map_or("127.0.0.1:0", |(_, v)| v),
            )
            .env("REEVE_CREDITS_ADDR", "127.0.0.1:0")
            .env("REEVE_QUOTA_ADDR", "127.0.0.1:0")
            .env("REEVE_FAKE_STRIPE_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{variable}: {stderr}");
        assert!(stderr.contains(variable), "{variable} not named: {stderr}");
    }
    let file = dir.path().join("reeve.toml");
    std::fs::write(&file, "REEVE_NOT_A_VARIABLE = 1\n").unwrap();
    let output = Command::new(REEVE)
        .args(["balance", "x"])
        .current_dir(dir.path())
        .env_clear()
        .env("REEVE_CONFIG_FILE", &file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("REEVE_NOT_A_VARIABLE"));
}

/// Gateway-style DeductBatch load over gRPC while `reeve up` gets SIGTERM: every
/// acknowledged item is in the ledger; after a restart, the client retries every batch
/// and no item is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_deduct_batch_load_loses_and_doubles_nothing() {
    const USERS: usize = 20;
    const BATCH: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path(), &[]);
    for user in 0..USERS {
        up.cli(&[
            "grant",
            &format!("user-{user}"),
            "1000",
            "--key",
            &format!("seed-{user}"),
        ]);
    }
    let token = up.secret("REEVE_SERVICE_TOKEN");
    let connect = |addr: String, token: String| async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        CreditServiceClient::with_interceptor(channel, BearerToken::new(&token).unwrap())
    };
    let batch = |n: usize| pb::DeductBatchRequest {
        items: (0..BATCH)
            .map(|i| pb::DeductRequest {
                user_id: format!("user-{}", (n * BATCH + i) % USERS),
                amount_micros: 1_000 + i as i64,
                idempotency_key: format!("b{n}-i{i}"),
                description: String::new(),
            })
            .collect(),
    };

    // Four gateway replicas flush batches until the server goes away.
    let acknowledged = Arc::new(Mutex::new(Vec::<usize>::new()));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let client = connect(up.credits.clone(), token.clone()).await;
        let (acknowledged, sent) = (acknowledged.clone(), sent.clone());
        workers.push(tokio::spawn(async move {
            let mut client = client;
            loop {
                let n = sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match client.deduct_batch(batch(n)).await {
                    Ok(reply) => {
                        assert!(reply.get_ref().outcomes.iter().all(|o| matches!(
                            o.result,
                            Some(pb::deduct_outcome::Result::Applied(_))
                        )));
                        acknowledged.lock().unwrap().push(n);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let status = up.terminate();
    assert!(status.success(), "{}", up.output());
    for worker in workers {
        worker.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let attempted = sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        acknowledged.len() > 5,
        "the load ran ({} batches acknowledged)",
        acknowledged.len()
    );
    eprintln!(
        "SIGTERM under load: {} batches acknowledged of {attempted} attempted",
        acknowledged.len()
    );

    // Restart on the same data; the client retries every batch it attempted.
    let up = Up::start(dir.path(), &[]);
    let mut client = connect(up.credits.clone(), token.clone()).await;
    for n in 0..attempted {
        let reply = client.deduct_batch(batch(n)).await.unwrap().into_inner();
        for outcome in reply.outcomes {
            match outcome.result {
                Some(pb::deduct_outcome::Result::Duplicate(_)) => {}
                Some(pb::deduct_outcome::Result::Applied(_)) => {
                    assert!(
                        !acknowledged.contains(&n),
                        "acknowledged batch {n} was not in the ledger"
                    );
                }
                other => panic!("batch {n}: {other:?}"),
            }
        }
    }
    // Every item is in the ledger exactly once: the balances say so to the micro.
    let per_item_total: i64 = (0..attempted)
        .flat_map(|n| batch(n).items)
        .map(|i| i.amount_micros)
        .sum();
    let mut balances = 0i64;
    let mut entries = 0usize;
    for user in 0..USERS {
        let user_id = format!("user-{user}");
        balances += client
            .get_balance(pb::GetBalanceRequest {
                user_id: user_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .balance_micros;
        let mut page_token = String::new();
        loop {
            let page = client
                .history(pb::HistoryRequest {
                    user_id: user_id.clone(),
                    page_size: 500,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner();
            entries += page
                .entries
                .iter()
                .filter(|e| e.kind == pb::EntryKind::Deduction as i32)
                .count();
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
    }
    assert_eq!(entries, attempted * BATCH, "one ledger entry per item");
    assert_eq!(balances, USERS as i64 * 1_000_000_000 - per_item_total);
}
