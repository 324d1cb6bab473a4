//! The billing page in a real browser: headless Chromium driven over WebDriver
//! (chromedriver + fantoccini) against the whole system on loopback — credits-svc,
//! quota-svc, the fake Stripe and the bridge — over a scratch SQLite file.
//!
//! Stripe's webhooks pass through a relay the test can hold, so the page is seen in the
//! state a real user meets: back from Checkout before the webhook has landed, waiting,
//! then showing the new balance without a reload.
//!
//! Chromium and chromedriver are Debian's `chromium` and `chromium-driver` (`.ci/run`
//! installs them). Where they cannot be found the browser test says so and passes,
//! except in CI (`CI` set), where it fails. Screenshots at desktop and phone widths are
//! written to `target/tmp/billing-page/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use reeve_runtime::auth::ServiceTokens;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const SERVICE_TOKEN: &str = "billing-page-service-token";
const JWT_SECRET: &str = "billing-page-jwt-secret-long-enough";
const WEBHOOK_SECRET: &str = "whsec_billing_page_test";
const ALICE_NOTE: &str = "gpt-4o call, \"summarise\" =alice-only";
const BOB_NOTE: &str = "welcome grant for bob-only-marker";

// ---- the browser --------------------------------------------------------------------

/// Debian's names first; `REEVE_CHROMIUM` / `REEVE_CHROMEDRIVER` override.
fn find_program(variable: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(path) = std::env::var(variable) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

struct Browser {
    driver: Child,
    client: Client,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts chromedriver and a headless Chromium session, or explains why it cannot.
async fn browser(downloads: &Path) -> Option<Browser> {
    let chromium = find_program(
        "REEVE_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let driver = find_program("REEVE_CHROMEDRIVER", &["chromedriver"]);
    let (Some(chromium), Some(driver)) = (chromium, driver) else {
        let message = "chromium and chromedriver were not found \
             (apt-get install chromium chromium-driver, or set REEVE_CHROMIUM / REEVE_CHROMEDRIVER)";
        assert!(
            std::env::var_os("CI").is_none(),
            "{message}; CI installs them, so it must run there"
        );
        eprintln!("billing page browser test SKIPPED: {message}");
        return None;
    };
    let port = free_port();
    let driver = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1400", "--lang=en-US", "--force-device-scale-factor=1",
                     "--hide-scrollbars"],
            "prefs": {
                "download.default_directory": downloads,
                "download.prompt_for_download": false,
            },
        }),
    );
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let guard = Browser {
        driver,
        client: loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(error) if started.elapsed() < Duration::from_secs(15) => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("no WebDriver session from chromedriver: {error}"),
            }
        },
    };
    guard.client.set_window_size(1280, 1400).await.unwrap();
    Some(guard)
}

async fn js(client: &Client, script: &str) -> Value {
    client.execute(script, Vec::new()).await.unwrap()
}

/// Waits until `script` (a JS expression) is truthy in the page.
async fn wait_for(client: &Client, expression: &str, what: &str) {
    let started = Instant::now();
    loop {
        let value = client
            .execute(&format!("return !!({expression});"), Vec::new())
            .await
            .unwrap_or(Value::Bool(false));
        if value == Value::Bool(true) {
            return;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let text = js(
                client,
                "return document.body ? document.body.innerText : ''",
            )
            .await;
            panic!("timed out waiting for {what}; the page says:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text_of(client: &Client, id: &str) -> String {
    js(
        client,
        &format!("return document.getElementById('{id}').textContent.trim();"),
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

// ---- the system ---------------------------------------------------------------------

/// Holds Stripe's webhooks while `held`, then hands them to the bridge: the fake Stripe
/// has "delivered" (its checkout page answers) but the credit has not landed yet.
#[derive(Default)]
struct Relay {
    held: Mutex<bool>,
    queue: Mutex<Vec<(String, String)>>,
    bridge: Mutex<String>,
}

impl Relay {
    async fn forward(&self, signature: String, body: String) -> u16 {
        let url = format!("{}/api/credits/webhook", self.bridge.lock().unwrap());
        reqwest::Client::new()
            .post(url)
            .header("stripe-signature", signature)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    async fn release(&self) {
        *self.held.lock().unwrap() = false;
        let queued = std::mem::take(&mut *self.queue.lock().unwrap());
        assert!(!queued.is_empty(), "the fake Stripe sent no webhook");
        for (signature, body) in queued {
            assert_eq!(self.forward(signature, body).await, 200);
        }
    }
}

async fn relay_hook(
    axum::extract::State(relay): axum::extract::State<Arc<Relay>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::http::StatusCode {
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if *relay.held.lock().unwrap() {
        relay.queue.lock().unwrap().push((signature, body));
        return axum::http::StatusCode::OK;
    }
    axum::http::StatusCode::from_u16(relay.forward(signature, body).await)
        .unwrap_or(axum::http::StatusCode::BAD_GATEWAY)
}

struct System {
    base: String,
    credits_addr: SocketAddr,
    quota_addr: SocketAddr,
    relay: Arc<Relay>,
    credits_shutdown: CancellationToken,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for System {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.credits_shutdown.cancel();
    }
}

impl System {
    async fn start() -> System {
        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}/reeve.db", dir.path().display());
        let shutdown = CancellationToken::new();
        let credits_shutdown = CancellationToken::new();
        // Checkout returns to the bridge's page, so its port is chosen first.
        let http_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let base = format!("http://{http_addr}");

        let relay = Arc::new(Relay::default());
        *relay.bridge.lock().unwrap() = base.clone();
        let relay_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_url = format!("http://{}/", relay_listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/", axum::routing::post(relay_hook))
            .with_state(Arc::clone(&relay));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(relay_listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });

        let fake = fake_stripe::start(
            fake_stripe::Config {
                listen_addr: "127.0.0.1:0".parse().unwrap(),
                webhook_url: relay_url,
                webhook_secret: WEBHOOK_SECRET.to_owned(),
            },
            shutdown.clone(),
        )
        .await
        .unwrap();
        let credits = credits_svc::start(
            credits_svc::Config {
                database_url: database_url.clone(),
                listen_addr: "127.0.0.1:0".parse().unwrap(),
                service_tokens: ServiceTokens::new([SERVICE_TOKEN]),
                deduct_workers: None,
                lot_sweep_interval: Duration::from_secs(60),
                clock: reeve_runtime::clock::Clock::system(),
                checkout: Some(credits_svc::checkout::CheckoutConfig {
                    secret_key: "sk_test_billing_page".to_owned().into(),
                    api_base: fake.api_base(),
                    min_credits: 5,
                    max_credits: 1_000,
                    success_url: format!("{base}/billing?checkout=success"),
                    cancel_url: format!("{base}/billing?checkout=cancel"),
                    currency: "usd".to_owned(),
                }),
            },
            credits_shutdown.clone(),
        )
        .await
        .unwrap();
        let quota = quota_svc::start(
            quota_svc::Config {
                database_url: database_url.clone(),
                listen_addr: "127.0.0.1:0".parse().unwrap(),
                service_tokens: ServiceTokens::new([SERVICE_TOKEN]),
                registry_path: None,
                batch_workers: quota_svc::store::DEFAULT_BATCH_WORKERS,
            },
            shutdown.clone(),
        )
        .await
        .unwrap();
        let bridge = webhook_bridge::start(
            webhook_bridge::Config {
                http_addr,
                credits_url: format!("http://{}", credits.local_addr),
                quota_url: format!("http://{}", quota.local_addr),
                service_tokens: ServiceTokens::new([SERVICE_TOKEN]),
                service_token: SERVICE_TOKEN.into(),
                jwt: webhook_bridge::auth::JwtKey::Hs256(JWT_SECRET.into()),
                jwt_audience: None,
                jwt_issuer: None,
                webhook_secret: WEBHOOK_SECRET.into(),
                database_url,
                currency: "usd".to_owned(),
            },
            shutdown.clone(),
        )
        .await
        .unwrap();
        let system = System {
            base,
            credits_addr: credits.local_addr,
            quota_addr: quota.local_addr,
            relay,
            credits_shutdown,
            shutdown,
            _dir: dir,
        };
        drop((credits, quota, bridge, fake));
        system
    }

    fn link(&self, user_id: &str, ttl_secs: i64) -> String {
        format!("{}/billing#token={}", self.base, token(user_id, ttl_secs))
    }

    async fn service_post(&self, path: &str, body: Value) -> Value {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .bearer_auth(SERVICE_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    /// Alice: a promotional grant that expires, a deduction with a awkward description,
    /// one feature at its limit and one part used. Bob: a grant of his own.
    async fn seed(&self) {
        let in_ten_days = webhook_bridge::routes::timestamp(prost_types::Timestamp {
            seconds: reeve_runtime::clock::now_us() / 1_000_000 + 10 * 86_400,
            nanos: 0,
        });
        self.service_post(
            "/api/credits/grants",
            json!({"user_id": "alice", "amount": "10", "idempotency_key": "welcome-alice",
                   "description": "Welcome credits", "expires_at": in_ten_days}),
        )
        .await;
        self.service_post(
            "/api/credits/deduct",
            json!({"user_id": "alice", "amount": "1.25", "idempotency_key": "call-1",
                   "description": ALICE_NOTE}),
        )
        .await;
        self.service_post(
            "/api/credits/grants",
            json!({"user_id": "bob", "amount": "777", "idempotency_key": "welcome-bob",
                   "category": "paid", "description": BOB_NOTE}),
        )
        .await;
        let mut quota = reeve_client::ClientBuilder::new(format!("http://{}", self.quota_addr))
            .service_token(SERVICE_TOKEN.to_owned().into())
            .connect_lazy()
            .unwrap()
            .raw_quota();
        for (feature, units) in [("video_generations", 2), ("ad_generations", 4)] {
            let reply = quota
                .check_quota(reeve_proto::quota::v1::CheckQuotaRequest {
                    user_id: "alice".to_owned(),
                    feature: feature.to_owned(),
                    consume: units,
                    idempotency_key: format!("seed-{feature}"),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(reply.allowed);
        }
    }
}

fn token(user_id: &str, ttl_secs: i64) -> String {
    let now = reeve_runtime::clock::now_us() / 1_000_000;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user_id, "iat": now, "exp": now + ttl_secs}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("billing-page");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn wait_for_file(dir: &Path) -> PathBuf {
    let started = Instant::now();
    loop {
        let done = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.ends_with(".csv") && e.metadata().is_ok_and(|m| m.len() > 0)
            });
        if let Some(entry) = done {
            return entry.path();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no CSV was downloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- the test -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sees_buys_and_downloads_in_a_real_browser() {
    let downloads = tempfile::tempdir().unwrap();
    let Some(browser) = browser(downloads.path()).await else {
        return;
    };
    let page = &browser.client;
    let system = System::start().await;
    system.seed().await;
    let shots = screenshot_dir();

    // Signed in through the fragment; the token leaves the address bar at once.
    page.goto(&system.link("alice", 3600)).await.unwrap();
    wait_for(
        page,
        "!document.getElementById('app').hidden",
        "alice's page",
    )
    .await;
    let url = page.current_url().await.unwrap();
    assert!(!url.as_str().contains("token"), "token left in {url}");
    assert_eq!(text_of(page, "who").await, "Signed in as alice");
    assert_eq!(text_of(page, "balance-main").await, "8.75");
    let parts = text_of(page, "balance-parts").await;
    assert!(parts.contains("Promotional"), "{parts}");
    let expiry = text_of(page, "expiry").await;
    assert!(expiry.contains("8.75 credits expire on"), "{expiry}");

    // Usage: a bar for every feature of the tier; the one at its limit says when a unit frees.
    let bars = js(
        page,
        "return document.querySelectorAll('#usage [role=progressbar]').length",
    )
    .await;
    assert_eq!(bars, json!(23));
    let video = js(
        page,
        "return document.querySelector('[data-feature=video_generations]').innerText",
    )
    .await;
    let video = video.as_str().unwrap();
    assert!(
        video.contains("2 of 2 used") && video.contains("Next unit frees at"),
        "{video}"
    );
    let ads = js(page, "return document.querySelector('[data-feature=ad_generations] [role=progressbar]').getAttribute('aria-valuenow')").await;
    assert_eq!(ads, json!("4"));

    // History, and nothing of bob's.
    let history = text_of(page, "history-rows").await;
    assert!(
        history.contains(ALICE_NOTE) && history.contains("Welcome credits"),
        "{history}"
    );
    let source = page.source().await.unwrap();
    assert!(!source.contains("bob") && !history.contains(BOB_NOTE));

    // Outside the bounds: explained next to the field, nothing leaves the page.
    let amount = page.find(Locator::Id("amount")).await.unwrap();
    amount.clear().await.unwrap();
    amount.send_keys("3").await.unwrap();
    page.find(Locator::Id("buy-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        page,
        "!document.getElementById('amount-error').hidden",
        "the bounds message",
    )
    .await;
    assert_eq!(
        text_of(page, "amount-error").await,
        "Purchases must be between 5 and 1000 whole credits; you entered 3."
    );
    assert_eq!(
        js(
            page,
            "return document.getElementById('amount').getAttribute('aria-invalid')"
        )
        .await,
        json!("true")
    );

    // Buy 25 through the fake Stripe Checkout; its webhook is held back for now.
    *system.relay.held.lock().unwrap() = true;
    amount.clear().await.unwrap();
    amount.send_keys("25").await.unwrap();
    page.find(Locator::Id("buy-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    pay_on_the_fake_checkout(page).await;
    wait_for(
        page,
        "document.querySelector('#purchase-status.pending')",
        "the pending state",
    )
    .await;
    let pending = text_of(page, "purchase-status").await;
    assert!(
        pending.contains("Waiting for Stripe to confirm your 25.00 credits"),
        "{pending}"
    );
    assert_eq!(
        js(
            page,
            "return document.getElementById('purchase-status').getAttribute('aria-live')"
        )
        .await,
        json!("polite")
    );
    assert_eq!(text_of(page, "balance-main").await, "8.75");
    assert!(
        !page
            .current_url()
            .await
            .unwrap()
            .as_str()
            .contains("checkout=")
    );

    // The webhook lands; the page shows it without a reload.
    js(page, "window.__notReloaded = true; return null;").await;
    system.relay.release().await;
    wait_for(
        page,
        "document.querySelector('#purchase-status.done')",
        "the credited state",
    )
    .await;
    assert_eq!(text_of(page, "balance-main").await, "33.75");
    assert_eq!(
        text_of(page, "purchase-status").await,
        "25.00 credits added. Your balance is now 33.75 credits."
    );
    assert_eq!(
        js(page, "return window.__notReloaded === true").await,
        json!(true)
    );
    wait_for(
        page,
        "document.getElementById('history-rows').innerText.includes('+25.00')",
        "the purchase in the history",
    )
    .await;

    page.set_window_size(1280, 1400).await.unwrap();
    js(
        page,
        "window.scrollTo(0, 0); document.activeElement.blur(); return null;",
    )
    .await;
    std::fs::write(shots.join("desktop.png"), page.screenshot().await.unwrap()).unwrap();

    // CSV: fetched with the Authorization header and handed over as a Blob download.
    page.find(Locator::Id("csv"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let csv = std::fs::read_to_string(wait_for_file(downloads.path()).await).unwrap();
    let lines: Vec<&str> = csv.split("\r\n").collect();
    assert_eq!(
        lines[0],
        "id,created_at,kind,amount,balance_after,description,idempotency_key"
    );
    assert!(lines[1].contains(",purchase,25.000000,33.750000,"), "{csv}");
    assert!(
        csv.contains(
            ",deduction,-1.250000,8.750000,\"gpt-4o call, \"\"summarise\"\" =alice-only\",call-1"
        ),
        "{csv}"
    );
    assert!(!csv.contains("bob"));

    // Phone width: one column, nothing wider than the screen.
    page.set_window_size(390, 1600).await.unwrap();
    wait_for(
        page,
        "document.documentElement.scrollWidth <= window.innerWidth",
        "no sideways scrolling",
    )
    .await;
    std::fs::write(shots.join("phone.png"), page.screenshot().await.unwrap()).unwrap();
    page.set_window_size(1280, 1400).await.unwrap();

    // Another user in the same tab: only bob's data.
    page.goto(&system.link("bob", 3600)).await.unwrap();
    wait_for(
        page,
        "document.getElementById('who').textContent === 'Signed in as bob'",
        "bob's page",
    )
    .await;
    wait_for(
        page,
        "document.getElementById('history-rows').children.length === 1",
        "bob's history",
    )
    .await;
    assert_eq!(text_of(page, "balance-main").await, "777.00");
    let source = page.source().await.unwrap();
    assert!(source.contains(BOB_NOTE));
    assert!(
        !source.contains("Signed in as alice")
            && !source.contains("summarise")
            && !source.contains("33.75")
            && !source.contains("Welcome credits")
    );

    // An expired link, caught before any call, and a token that expires while the page is open.
    page.goto(&system.link("alice", -10)).await.unwrap();
    wait_for(
        page,
        "!document.getElementById('alert').hidden",
        "the expired message",
    )
    .await;
    assert_eq!(
        text_of(page, "alert-title").await,
        "Your sign-in link has expired"
    );
    assert!(js(page, "return document.getElementById('app').hidden").await == json!(true));
    page.goto(&system.link("alice", 2)).await.unwrap();
    wait_for(
        page,
        "!document.getElementById('app').hidden",
        "a short-lived page",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    page.find(Locator::Id("csv"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        page,
        "!document.getElementById('alert').hidden",
        "the server's token_expired",
    )
    .await;
    assert_eq!(
        text_of(page, "alert-title").await,
        "Your sign-in link has expired"
    );

    // The service down: said in words, with a way to try again.
    system.credits_shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    page.goto(&system.link("bob", 3600)).await.unwrap();
    wait_for(
        page,
        "!document.getElementById('alert').hidden",
        "the unavailable message",
    )
    .await;
    assert_eq!(
        text_of(page, "alert-title").await,
        "Billing is temporarily unavailable"
    );
    assert!(page.find(Locator::Id("retry")).await.is_ok());
    let _ = system.credits_addr;

    browser.client.clone().close().await.unwrap();
}

/// Waits for the fake Stripe Checkout page the buy button led to, and pays.
async fn pay_on_the_fake_checkout(page: &Client) {
    let started = Instant::now();
    let cont = loop {
        match page.find(Locator::LinkText("Continue")).await {
            Ok(link) => break link,
            Err(_) if started.elapsed() < Duration::from_secs(15) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("no fake checkout page: {error}"),
        }
    };
    cont.click().await.unwrap();
}

async fn fill(page: &Client, id: &str, text: &str) {
    let input = page.find(Locator::Id(id)).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(text).await.unwrap();
}

async fn click(page: &Client, id: &str) {
    page.find(Locator::Id(id))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Auto top-up from the page: settings refused in words and nothing written, then
/// saved; a purchase with "Save my card" saves the card; a deduction below the
/// threshold tops up through the fake Stripe, and the page shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_top_up_is_set_and_a_card_saved_from_the_page() {
    let downloads = tempfile::tempdir().unwrap();
    let Some(browser) = browser(downloads.path()).await else {
        return;
    };
    let page = &browser.client;
    let system = System::start().await;
    system.seed().await;
    let rest = |path: &'static str| {
        let url = format!("{}{path}", system.base);
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token("alice", 600))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let topup_part =
        |part: &str| format!("document.querySelector('[data-topup={part}]').textContent");

    page.goto(&system.link("alice", 3600)).await.unwrap();
    wait_for(
        page,
        "!document.getElementById('autotopup').hidden",
        "the auto top-up card",
    )
    .await;
    assert_eq!(
        js(page, &format!("return {}", topup_part("card"))).await,
        json!("No")
    );
    assert_eq!(
        js(page, &format!("return {}", topup_part("status"))).await,
        json!("Off")
    );
    assert!(
        text_of(page, "topup-status")
            .await
            .contains("No card is saved yet")
    );

    // Out of bounds: said next to the field, nothing written.
    click(page, "topup-enabled").await;
    fill(page, "topup-threshold", "0").await;
    fill(page, "topup-amount", "25").await;
    fill(page, "topup-cap", "100").await;
    click(page, "topup-save").await;
    wait_for(
        page,
        "!document.getElementById('topup-error').hidden",
        "the threshold message",
    )
    .await;
    assert_eq!(
        text_of(page, "topup-error").await,
        "The threshold must be a whole number of credits from 1 to 1,000,000,000."
    );
    assert_eq!(
        js(
            page,
            "return document.getElementById('topup-threshold').getAttribute('aria-invalid')"
        )
        .await,
        json!("true")
    );
    assert_eq!(rest("/api/credits/auto-topup").await["configured"], false);

    fill(page, "topup-threshold", "5").await;
    click(page, "topup-save").await;
    wait_for(
        page,
        "document.querySelector('#topup-status.done')",
        "the saved state",
    )
    .await;
    assert_eq!(
        text_of(page, "topup-status").await,
        "Auto top-up saved: on, buying 25 credits below 5, at most 100 a month."
    );
    let saved = rest("/api/credits/auto-topup").await;
    assert_eq!(
        (
            &saved["enabled"],
            &saved["threshold"],
            &saved["amount"],
            &saved["monthly_cap"]
        ),
        (&json!(true), &json!(5), &json!(25), &json!(100)),
        "{saved}"
    );

    // Buy 5 credits with the card saved for auto top-up.
    click(page, "save-card").await;
    fill(page, "amount", "5").await;
    click(page, "buy-button").await;
    pay_on_the_fake_checkout(page).await;
    wait_for(
        page,
        "document.querySelector('#purchase-status.done')",
        "the credited state",
    )
    .await;
    wait_for(
        page,
        &format!("{} === 'Yes'", topup_part("card")),
        "the saved card",
    )
    .await;
    assert_eq!(text_of(page, "balance-main").await, "13.75");
    assert_eq!(
        rest("/api/credits/auto-topup").await["payment_method_saved"],
        true
    );

    // Below the threshold: the saved card is charged, the credits land, the page says so.
    system
        .service_post(
            "/api/credits/deduct",
            json!({"user_id": "alice", "amount": "9", "idempotency_key": "call-2"}),
        )
        .await;
    let started = Instant::now();
    while rest("/api/credits/balance").await["balance"] != "29.750000" {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no top-up: {}",
            rest("/api/credits/auto-topup").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    page.refresh().await.unwrap();
    wait_for(
        page,
        &format!(
            "document.querySelector('[data-topup=last]') && {}.includes('succeeded')",
            topup_part("last")
        ),
        "the last top-up",
    )
    .await;
    assert_eq!(
        js(page, &format!("return {}", topup_part("last"))).await,
        json!("25.00 credits, succeeded")
    );
    assert_eq!(text_of(page, "balance-main").await, "29.75");
    std::fs::write(
        screenshot_dir().join("auto-topup.png"),
        page.screenshot().await.unwrap(),
    )
    .unwrap();

    browser.client.clone().close().await.unwrap();
}

/// The CSV route on its own: the user's entries only, exact decimals, and a JSON 401
/// without a token (what the page explains).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_csv_is_the_callers_only_and_needs_a_token() {
    let system = System::start().await;
    system.seed().await;
    let http = reqwest::Client::new();
    let csv_url = format!("{}/api/credits/history.csv", system.base);
    let response = http
        .get(&csv_url)
        .bearer_auth(token("bob", 60))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    let csv = response.text().await.unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.contains(
        ",grant,777.000000,777.000000,welcome grant for bob-only-marker,welcome-bob\r\n"
    ));
    let refused = http.get(&csv_url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_token");
    let expired = http
        .get(&csv_url)
        .bearer_auth(token("bob", -5))
        .send()
        .await
        .unwrap();
    let body: Value = expired.json().await.unwrap();
    assert_eq!(body["error"]["code"], "token_expired");

    // The page itself: embedded, locked down, the same for everyone.
    let page = http
        .get(format!("{}/billing", system.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("min=\"5\" max=\"1000\"")
    );
}

/// `reeve up` prints a signed-in link for a demo user and sends Checkout back to the
/// page; `reeve dev-token USER --link` prints one for anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reeve_up_and_dev_token_print_signed_in_links() {
    use std::io::{BufRead, BufReader};
    let reeve = env!("CARGO_BIN_EXE_reeve");
    let dir = tempfile::tempdir().unwrap();
    let mut up = Command::new(reeve)
        .arg("up")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs([
            ("REEVE_HTTP_ADDR", "127.0.0.1:0"),
            ("REEVE_CREDITS_ADDR", "127.0.0.1:0"),
            ("REEVE_QUOTA_ADDR", "127.0.0.1:0"),
            ("REEVE_FAKE_STRIPE_ADDR", "127.0.0.1:0"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut link = None;
    let mut http = None;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        if let Some(rest) = line.trim().strip_prefix("billing page ") {
            link = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.strip_prefix("listening http=") {
            http = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    let (link, http) = match (link, http) {
        (Some(link), Some(http)) => (link, http),
        other => {
            let _ = up.kill();
            panic!("reeve up printed no billing link: {other:?}");
        }
    };
    let data_dir = dir.path().to_owned();
    let result = async move {
        let (page, token) = link.split_once("#token=").unwrap();
        assert_eq!(page, format!("http://{http}/billing"));
        let client = reqwest::Client::new();
        let balance: Value = client
            .get(format!("http://{http}/api/credits/balance"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(balance["user_id"], "demo");
        let purchase: Value = client
            .post(format!("http://{http}/api/credits/purchase"))
            .bearer_auth(token)
            .json(&json!({"amount": 5}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let paid: Value = client
            .post(purchase["checkout_url"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            paid["success_url"],
            format!("http://{http}/billing?checkout=success")
        );

        let output = Command::new(reeve)
            .args(["dev-token", "alice", "--link"])
            .current_dir(&data_dir)
            .env_clear()
            .env("REEVE_HTTP_ADDR", "0.0.0.0:9999")
            .output()
            .unwrap();
        assert!(output.status.success());
        let alice = String::from_utf8(output.stdout).unwrap();
        let (page, token) = alice.trim().split_once("#token=").unwrap();
        assert_eq!(page, "http://127.0.0.1:9999/billing");
        let balance: Value = client
            .get(format!("http://{http}/api/credits/balance"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(balance["user_id"], "alice");
    };
    // Stop `reeve up` (by its own pid) whatever the checks said.
    let outcome = tokio::spawn(result).await;
    let _ = up.kill();
    let _ = up.wait();
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}
