//! Auto top-up end to end (issue 12), on PostgreSQL and SQLite: the user saves a card
//! through a purchase, sets auto top-up on REST, a deduction takes the balance below
//! the threshold, credits-svc's worker charges the card off-session at the fake Stripe
//! (a real server on loopback), and the credits arrive only through the
//! payment_intent.succeeded webhook, once. Declines back off an hour (the services run
//! on a manual clock) and three in a row suspend until a new card is saved;
//! requires_action waits for the user, and a failed authentication fails it (a
//! decline) instead of blocking auto top-up for good; a worker killed between Stripe's answer and
//! recording it charges nothing twice; the REST routes refuse hostile bodies whole.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Backend, JWT_SECRET, SERVICE_TOKEN, WEBHOOK_SECRET, credits_config, hs256_token};
use futures::future::join_all;
use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_runtime::auth::{BearerToken, ServiceTokens};
use reeve_runtime::clock::ManualClock;
use reeve_testkit::{ScratchDb, on_both_stores};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use webhook_bridge::auth::JwtKey;

on_both_stores!(
    a_top_up_charges_the_saved_card_and_credits_once_however_often_its_webhook_comes,
    a_declined_card_backs_off_an_hour_and_three_declines_suspend_until_a_new_card_is_saved,
    requires_action_waits_for_the_user_and_completes_with_the_payment,
    a_failed_authentication_fails_the_waiting_attempt_and_unblocks_auto_top_up,
    a_worker_killed_between_stripe_and_recording_charges_nothing_twice,
    hostile_bodies_on_the_auto_topup_routes_are_refused_and_nothing_is_written,
);

const CREDIT: i64 = 1_000_000;
const HOUR_US: i64 = 3_600 * 1_000_000;

/// The system on a manual clock, with credits-svc restartable on the same address.
struct TopUpStack {
    db: ScratchDb,
    base: String,
    http: reqwest::Client,
    fake: fake_stripe::FakeStripe,
    clock: ManualClock,
    credits_addr: SocketAddr,
    credits: Option<(credits_svc::RunningServer, CancellationToken)>,
    shutdown: CancellationToken,
}

impl Drop for TopUpStack {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some((_, token)) = &self.credits {
            token.cancel();
        }
    }
}

impl TopUpStack {
    async fn start(backend: Backend) -> TopUpStack {
        let db = ScratchDb::new(backend, "topup").await;
        let shutdown = CancellationToken::new();
        let clock = ManualClock::at(reeve_runtime::clock::now_us());
        let fake = fake_stripe::start(
            fake_stripe::Config {
                listen_addr: "127.0.0.1:0".parse().unwrap(),
                webhook_url: String::new(),
                webhook_secret: WEBHOOK_SECRET.to_owned(),
            },
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut stack = TopUpStack {
            db,
            base: String::new(),
            http: reqwest::Client::new(),
            fake,
            clock,
            credits_addr: "127.0.0.1:0".parse().unwrap(),
            credits: None,
            shutdown,
        };
        stack.start_credits().await;
        let quota = quota_svc::start(
            quota_svc::Config {
                database_url: stack.db.url.clone(),
                listen_addr: "127.0.0.1:0".parse().unwrap(),
                service_tokens: ServiceTokens::new([SERVICE_TOKEN]),
                registry_path: None,
                batch_workers: quota_svc::store::DEFAULT_BATCH_WORKERS,
            },
            stack.shutdown.clone(),
        )
        .await
        .unwrap();
        let bridge = webhook_bridge::start(
            webhook_bridge::Config {
                http_addr: "127.0.0.1:0".parse().unwrap(),
                credits_url: format!("http://{}", stack.credits_addr),
                quota_url: format!("http://{}", quota.local_addr),
                service_tokens: ServiceTokens::new([SERVICE_TOKEN]),
                service_token: SERVICE_TOKEN.into(),
                jwt: JwtKey::Hs256(JWT_SECRET.into()),
                jwt_audience: None,
                jwt_issuer: None,
                webhook_secret: WEBHOOK_SECRET.into(),
                database_url: stack.db.url.clone(),
                currency: "usd".to_owned(),
            },
            stack.shutdown.clone(),
        )
        .await
        .unwrap();
        stack.base = format!("http://{}", bridge.local_addr);
        stack
            .fake
            .set_webhook_url(format!("{}/api/credits/webhook", stack.base));
        drop((quota, bridge));
        stack
    }

    /// Starts credits-svc (again: on the address it had, so the bridge reaches it).
    async fn start_credits(&mut self) {
        let token = CancellationToken::new();
        let config = credits_svc::Config {
            clock: self.clock.clock(),
            ..credits_config(&self.db.url, self.credits_addr, self.fake.api_base())
        };
        let server = credits_svc::start(config, token.clone()).await.unwrap();
        self.credits_addr = server.local_addr;
        self.credits = Some((server, token));
    }

    /// Stops credits-svc at once: its worker's round in flight is abandoned.
    async fn kill_credits(&mut self) {
        if let Some((server, token)) = self.credits.take() {
            token.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), server.wait()).await;
        }
    }

    fn token(&self, user: &str) -> String {
        hs256_token(
            json!({"sub": user, "exp": common::now() + 3600}),
            JWT_SECRET,
        )
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        user: Option<&str>,
        body: Option<String>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(user) = user {
            request = request.bearer_auth(self.token(user));
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn topup(&self, user: &str) -> Value {
        let (status, body) = self
            .send(
                reqwest::Method::GET,
                "/api/credits/auto-topup",
                Some(user),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn set_topup(&self, user: &str, threshold: i64, amount: i64, cap: i64) -> Value {
        let body =
            json!({"enabled": true, "threshold": threshold, "amount": amount, "monthly_cap": cap});
        let (status, body) = self
            .send(
                reqwest::Method::PUT,
                "/api/credits/auto-topup",
                Some(user),
                Some(body.to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Buys 5 credits saving `card` (a fake Stripe test card) for auto top-up.
    async fn save_card(&self, user: &str, card: &str) {
        let body = json!({"amount": 5, "save_payment_method": true}).to_string();
        let (status, purchase) = self
            .send(
                reqwest::Method::POST,
                "/api/credits/purchase",
                Some(user),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{purchase}");
        let url = format!(
            "{}/pay?payment_method={card}",
            purchase["checkout_url"].as_str().unwrap()
        );
        let paid = self.visit(&url).await;
        for delivery in paid["deliveries"].as_array().unwrap() {
            assert_eq!(delivery["status"], 200, "{paid}");
        }
    }

    async fn client(
        &self,
    ) -> CreditServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
    > {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", self.credits_addr))
                .unwrap()
                .connect()
                .await
                .unwrap();
        CreditServiceClient::with_interceptor(channel, BearerToken::new(SERVICE_TOKEN).unwrap())
    }

    async fn grant(&self, user: &str, credits: i64) {
        self.client()
            .await
            .add_credits(pb::AddCreditsRequest {
                user_id: user.into(),
                amount_micros: credits * CREDIT,
                idempotency_key: format!("grant-{}", rand::random::<u64>()),
                kind: pb::CreditKind::Grant.into(),
                description: "test grant".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn deduct(&self, user: &str, micros: i64) {
        self.client()
            .await
            .deduct(pb::DeductRequest {
                user_id: user.into(),
                amount_micros: micros,
                idempotency_key: format!("d-{}", rand::random::<u64>()),
                description: String::new(),
            })
            .await
            .unwrap();
    }

    async fn balance(&self, user: &str) -> i64 {
        self.client()
            .await
            .get_balance(pb::GetBalanceRequest {
                user_id: user.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .balance_micros
    }

    async fn event_types(&self) -> Vec<String> {
        reeve_events::EventStore::open(&self.db.url)
            .await
            .unwrap()
            .outbox(0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_type)
            .collect()
    }

    async fn count(&self, event_type: &str) -> usize {
        self.event_types()
            .await
            .iter()
            .filter(|t| *t == event_type)
            .count()
    }

    /// Waits (up to 20 s) until the user's latest attempt is in `state`.
    async fn attempt_in(&self, user: &str, state: &str) -> Value {
        for _ in 0..200 {
            let topup = self.topup(user).await;
            if topup["last_attempt"]["state"] == state {
                return topup;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{user}'s attempt never reached {state}: {}",
            self.topup(user).await
        );
    }

    async fn balance_becomes(&self, user: &str, micros: i64) {
        for _ in 0..200 {
            if self.balance(user).await == micros {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{user}'s balance is {}, not {micros}",
            self.balance(user).await
        );
    }
}

async fn a_top_up_charges_the_saved_card_and_credits_once_however_often_its_webhook_comes(
    backend: Backend,
) {
    let stack = TopUpStack::start(backend).await;
    let before = stack.topup("ann").await;
    assert_eq!(before["configured"], false);
    assert_eq!(before["payment_method_saved"], false);
    stack.set_topup("ann", 10, 25, 100).await;
    stack.save_card("ann", "pm_card_visa").await;
    let saved = stack.topup("ann").await;
    assert_eq!(saved["payment_method_saved"], true, "{saved}");
    assert_eq!(stack.balance("ann").await, 5 * CREDIT);
    // 5 + 10 − 6 = 9 < 10: one top-up of 25.
    stack.grant("ann", 10).await;
    stack.deduct("ann", 6 * CREDIT).await;
    stack.balance_becomes("ann", 34 * CREDIT).await;
    let done = stack.attempt_in("ann", "succeeded").await;
    assert_eq!(done["last_attempt"]["amount_micros"], 25 * CREDIT);
    assert_eq!(done["month_used_micros"], 25 * CREDIT);
    let charges = stack.fake.off_session_payment_intents();
    assert_eq!(charges.len(), 1);
    let intent = charges[0].clone();
    assert_eq!(intent["metadata"]["user_id"], "ann");
    assert_eq!(
        intent["metadata"]["reeve_topup_attempt_id"],
        done["last_attempt"]["attempt_id"]
    );
    assert_eq!(done["last_attempt"]["payment_intent_id"], intent["id"]);
    // Stripe redelivers the payment's webhook, five times at once: credited once.
    let sends = (0..5).map(|i| {
        let event = common::event(
            &format!("evt_again_{i}"),
            "payment_intent.succeeded",
            intent.clone(),
            None,
        );
        let payload = event.to_string();
        let signature = fake_stripe::sign(&payload, WEBHOOK_SECRET, fake_stripe::now_secs());
        let http = stack.http.clone();
        let url = format!("{}/api/credits/webhook", stack.base);
        async move {
            http.post(url)
                .header("stripe-signature", signature)
                .header("content-type", "application/json")
                .body(payload)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    for status in join_all(sends).await {
        assert!(status.is_success(), "{status}");
    }
    assert_eq!(stack.balance("ann").await, 34 * CREDIT);
    assert_eq!(stack.count(credits_svc::topup::TOPUP_SUCCEEDED).await, 1);
    assert_eq!(stack.fake.off_session_payment_intents().len(), 1);
    // Still above the threshold (34): nothing more.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(stack.fake.off_session_payment_intents().len(), 1);
}

async fn a_declined_card_backs_off_an_hour_and_three_declines_suspend_until_a_new_card_is_saved(
    backend: Backend,
) {
    let stack = TopUpStack::start(backend).await;
    stack.set_topup("bea", 10, 5, 1_000).await;
    stack.save_card("bea", "pm_card_chargeDeclined").await;
    stack.grant("bea", 10).await;
    // 15 − 6 = 9 < 10: declined.
    stack.deduct("bea", 6 * CREDIT).await;
    let first = stack.attempt_in("bea", "failed").await;
    assert_eq!(first["last_attempt"]["failure_code"], "card_declined");
    assert_eq!(first["consecutive_failures"], 1);
    assert!(first["retry_after"].is_string(), "{first}");
    assert_eq!(first["suspended"], false);
    // Within the hour: no new attempt, however many deductions.
    stack.deduct("bea", CREDIT).await;
    stack.clock.advance(HOUR_US - 1_000_000);
    stack.deduct("bea", CREDIT).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(stack.fake.off_session_payment_intents().len(), 1);
    assert_eq!(
        stack.topup("bea").await["last_attempt"]["attempt_id"],
        first["last_attempt"]["attempt_id"]
    );
    // Second and third declines, an hour apart: suspended.
    for failures in 2..=3 {
        stack.clock.advance(HOUR_US);
        stack.deduct("bea", 100_000).await;
        for _ in 0..200 {
            if stack.topup("bea").await["consecutive_failures"] == failures {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let suspended = stack.topup("bea").await;
    assert_eq!(suspended["consecutive_failures"], 3, "{suspended}");
    assert_eq!(suspended["suspended"], true);
    assert_eq!(suspended["suspended_reason"], "card_declined");
    assert_eq!(stack.count(credits_svc::topup::TOPUP_FAILED).await, 3);
    assert_eq!(stack.count(credits_svc::topup::TOPUP_SUSPENDED).await, 1);
    // Suspended: hours later, still nothing.
    stack.clock.advance(3 * HOUR_US);
    stack.deduct("bea", 100_000).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(stack.fake.off_session_payment_intents().len(), 3);
    // A new card (for the same Stripe customer) lifts it; the next write tops up.
    let balance = stack.balance("bea").await;
    stack.save_card("bea", "pm_card_visa").await;
    let lifted = stack.topup("bea").await;
    assert_eq!(lifted["suspended"], false, "{lifted}");
    assert_eq!(lifted["consecutive_failures"], 0);
    let charges = stack.fake.off_session_payment_intents();
    // 6.7 + 5 (the purchase saving it) − 2 = 9.7 < 10: a top-up of 5.
    stack.deduct("bea", 2 * CREDIT).await;
    stack.attempt_in("bea", "succeeded").await;
    stack
        .balance_becomes("bea", balance + 5 * CREDIT - 2 * CREDIT + 5 * CREDIT)
        .await;
    let after = stack.fake.off_session_payment_intents();
    assert_eq!(after.len(), charges.len() + 1);
    assert_eq!(after.last().unwrap()["customer"], charges[0]["customer"]);
}

async fn requires_action_waits_for_the_user_and_completes_with_the_payment(backend: Backend) {
    let stack = TopUpStack::start(backend).await;
    let (_, url) = stack.waiting_for_action("cid").await;
    assert_eq!(
        stack.count(credits_svc::topup::TOPUP_REQUIRES_ACTION).await,
        1
    );
    // Waiting is in flight: further deductions make no second attempt.
    stack.deduct("cid", CREDIT).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(stack.fake.off_session_payment_intents().len(), 1);
    assert_eq!(stack.balance("cid").await, 8 * CREDIT);
    // The user authenticates: the payment succeeds and its webhook credits it.
    let answer = stack.visit(&url).await;
    assert_eq!(answer["delivery"]["status"], 200, "{answer}");
    stack.balance_becomes("cid", 28 * CREDIT).await;
    stack.attempt_in("cid", "succeeded").await;
    assert_eq!(stack.count(credits_svc::topup::TOPUP_SUCCEEDED).await, 1);
}

async fn a_failed_authentication_fails_the_waiting_attempt_and_unblocks_auto_top_up(
    backend: Backend,
) {
    let stack = TopUpStack::start(backend).await;
    let (waiting, url) = stack.waiting_for_action("eve").await;
    let first = waiting["last_attempt"]["attempt_id"].clone();
    // The user fails the authentication: Stripe sends payment_intent.payment_failed.
    let answer = stack.visit(&format!("{url}/fail")).await;
    assert_eq!(answer["delivery"]["status"], 200, "{answer}");
    let failed = stack.attempt_in("eve", "failed").await;
    assert_eq!(failed["last_attempt"]["attempt_id"], first);
    assert_eq!(
        failed["last_attempt"]["failure_code"],
        "payment_intent_authentication_failure"
    );
    assert!(failed["last_attempt"]["action_url"].is_null(), "{failed}");
    assert_eq!(failed["consecutive_failures"], 1, "{failed}");
    assert!(failed["retry_after"].is_string(), "{failed}");
    assert_eq!(stack.count(credits_svc::topup::TOPUP_FAILED).await, 1);
    assert_eq!(stack.balance("eve").await, 9 * CREDIT);
    // The same failure again, in an event of its own: nothing more.
    let intent = answer["payment_intent"].clone();
    let again = common::event(
        "evt_failed_again",
        "payment_intent.payment_failed",
        intent.clone(),
        None,
    );
    let (status, body) = stack.send_event(&again).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(stack.count(credits_svc::topup::TOPUP_FAILED).await, 1);
    assert_eq!(stack.topup("eve").await["consecutive_failures"], 1);
    // It counts as a decline: nothing within the hour, a new attempt after it (the
    // failed one no longer blocks auto top-up).
    stack.deduct("eve", CREDIT).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(stack.fake.off_session_payment_intents().len(), 1);
    stack.clock.advance(HOUR_US);
    stack.deduct("eve", CREDIT).await;
    let second = stack.attempt_in("eve", "requires_action").await;
    assert_ne!(second["last_attempt"]["attempt_id"], first);
    assert_eq!(stack.fake.off_session_payment_intents().len(), 2);
    // The user pays the first payment after all (confirmed again on-session): it is
    // credited once and completes its attempt, so this month's use counts it.
    let mut paid = intent;
    paid["status"] = json!("succeeded");
    paid["amount_received"] = paid["amount"].clone();
    paid["last_payment_error"] = Value::Null;
    let (status, body) = stack
        .send_event(&common::event(
            "evt_paid_late",
            "payment_intent.succeeded",
            paid,
            None,
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    stack.balance_becomes("eve", (7 + 20) * CREDIT).await;
    let attempts = stack.attempts_via_store("eve").await;
    assert_eq!(attempts, ["succeeded", "requires_action"]);
    assert_eq!(stack.count(credits_svc::topup::TOPUP_SUCCEEDED).await, 1);
    // The paid attempt and the one in flight.
    assert_eq!(stack.topup("eve").await["month_used_micros"], 40 * CREDIT);
}

async fn a_worker_killed_between_stripe_and_recording_charges_nothing_twice(backend: Backend) {
    let mut stack = TopUpStack::start(backend).await;
    stack.set_topup("dan", 10, 30, 100).await;
    stack.save_card("dan", "pm_card_visa").await;
    stack.grant("dan", 10).await;
    // Stripe charges, then answers only after the worker is gone; its webhook is late.
    stack.fake.set_webhooks(false);
    stack.fake.set_answer_delay(Duration::from_secs(5));
    stack.deduct("dan", 6 * CREDIT).await;
    for _ in 0..200 {
        if !stack.fake.off_session_payment_intents().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stack.fake.off_session_payment_intents().len(), 1);
    stack.kill_credits().await;
    assert_eq!(stack.topup_via_store("dan").await, "processing");
    // A new credits-svc: before the lease runs out, nothing is sent again.
    stack.fake.set_answer_delay(Duration::ZERO);
    stack.start_credits().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(stack.fake.idempotent_replays(), 0);
    // After it: the same request with the same key, answered from Stripe's record.
    stack.clock.advance(credits_svc::topup_worker::LEASE_US + 1);
    stack.attempt_in("dan", "succeeded").await;
    assert_eq!(stack.fake.idempotent_replays(), 1);
    assert_eq!(stack.fake.off_session_payment_intents().len(), 1);
    // The late webhook credits the one payment once.
    stack.fake.set_webhooks(true);
    let deliveries = stack.fake.deliver_dropped().await;
    assert!(
        deliveries.iter().all(|d| d["status"] == 200),
        "{deliveries:?}"
    );
    stack
        .balance_becomes("dan", (5 + 10 - 6 + 30) * CREDIT)
        .await;
    assert_eq!(stack.count(credits_svc::topup::TOPUP_SUCCEEDED).await, 1);
}

impl TopUpStack {
    /// A user whose auto top-up (below 10 credits, buy 20) charges a card that needs
    /// their authentication, after the deduction that makes the attempt (5 + 10 − 6 =
    /// 9 < 10): their auto top-up once the attempt waits, and the action URL.
    async fn waiting_for_action(&self, user: &str) -> (Value, String) {
        self.set_topup(user, 10, 20, 100).await;
        self.save_card(user, "pm_card_authenticationRequired").await;
        self.grant(user, 10).await;
        self.deduct(user, 6 * CREDIT).await;
        let waiting = self.attempt_in(user, "requires_action").await;
        let url = waiting["last_attempt"]["action_url"]
            .as_str()
            .unwrap()
            .to_owned();
        (waiting, url)
    }

    /// What the fake Stripe answers the customer visiting `url`.
    async fn visit(&self, url: &str) -> Value {
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Sends `event`, correctly signed now, to the bridge's webhook.
    async fn send_event(&self, event: &Value) -> (StatusCode, Value) {
        let payload = event.to_string();
        let signature = fake_stripe::sign(&payload, WEBHOOK_SECRET, fake_stripe::now_secs());
        let response = self
            .http
            .post(format!("{}/api/credits/webhook", self.base))
            .header("content-type", "application/json")
            .header("stripe-signature", signature)
            .body(payload)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The states of the user's attempts, oldest first, read from the store.
    async fn attempts_via_store(&self, user: &str) -> Vec<String> {
        let store = credits_svc::store::open(&self.db.url).await.unwrap();
        let attempts = store.topups().attempts(user).await.unwrap();
        attempts
            .iter()
            .map(|a| a.state.as_str().to_owned())
            .collect()
    }

    /// The latest attempt's state, read from the store (while credits-svc is down).
    async fn topup_via_store(&self, user: &str) -> String {
        let store = credits_svc::store::open(&self.db.url).await.unwrap();
        let attempts = store.topups().attempts(user).await.unwrap();
        attempts.last().unwrap().state.as_str().to_owned()
    }
}

async fn hostile_bodies_on_the_auto_topup_routes_are_refused_and_nothing_is_written(
    backend: Backend,
) {
    let stack = TopUpStack::start(backend).await;
    let good = r#"{"enabled": true, "threshold": 10, "amount": 25, "monthly_cap": 100}"#;
    let cases: &[(&str, &str)] = &[
        (
            r#"{"enabled": true, "threshold": -1, "amount": 25, "monthly_cap": 100}"#,
            "invalid_threshold",
        ),
        (
            r#"{"enabled": true, "threshold": 0, "amount": 25, "monthly_cap": 100}"#,
            "invalid_threshold",
        ),
        (
            r#"{"enabled": true, "threshold": 10.5, "amount": 25, "monthly_cap": 100}"#,
            "invalid_threshold",
        ),
        (
            r#"{"enabled": true, "threshold": "10", "amount": 25, "monthly_cap": 100}"#,
            "invalid_threshold",
        ),
        (
            r#"{"enabled": true, "threshold": 1e3, "amount": 25, "monthly_cap": 100}"#,
            "invalid_threshold",
        ),
        (
            r#"{"enabled": true, "threshold": null, "amount": 25, "monthly_cap": 100}"#,
            "invalid_threshold",
        ),
        (
            r#"{"enabled": true, "threshold": 10, "amount": 1000000, "monthly_cap": 100}"#,
            "invalid_topup_amount",
        ),
        (
            r#"{"enabled": true, "threshold": 10, "amount": 99999999999999999999999, "monthly_cap": 100}"#,
            "invalid_topup_amount",
        ),
        (
            r#"{"enabled": true, "threshold": 10, "amount": 0.000001, "monthly_cap": 100}"#,
            "invalid_topup_amount",
        ),
        (
            r#"{"enabled": true, "threshold": 10, "amount": "\u0000", "monthly_cap": 100}"#,
            "invalid_topup_amount",
        ),
        (
            r#"{"enabled": true, "threshold": 10, "amount": 25, "monthly_cap": 1000000001}"#,
            "invalid_monthly_cap",
        ),
        (
            r#"{"enabled": true, "threshold": 10, "amount": 25, "monthly_cap": -9223372036854775808}"#,
            "invalid_monthly_cap",
        ),
        (
            r#"{"enabled": true, "threshold": 10, "amount": 25}"#,
            "invalid_json",
        ),
        (
            r#"{"threshold": 10, "amount": 25, "monthly_cap": 100}"#,
            "invalid_json",
        ),
        (
            r#"{"enabled": "yes", "threshold": 10, "amount": 25, "monthly_cap": 100}"#,
            "invalid_json",
        ),
        (
            r#"{"enabled": true, "threshold": 10, "amount": 25, "monthly_cap": 100, "extra": 1}"#,
            "invalid_json",
        ),
        (
            r#"{"enabled": true, "threshold": 10, "amount": 25, "monthly_cap": 100, "\u0000": 1}"#,
            "invalid_json",
        ),
        (
            "{\"enabled\": true, \"threshold\": 10\u{0}}",
            "invalid_json",
        ),
        ("[]", "invalid_json"),
        ("", "invalid_json"),
    ];
    for (body, code) in cases {
        let (status, answer) = stack
            .send(
                reqwest::Method::PUT,
                "/api/credits/auto-topup",
                Some("eve"),
                Some((*body).to_owned()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], *code, "{body}: {answer}");
    }
    let untouched = stack.topup("eve").await;
    assert_eq!(untouched["configured"], false, "{untouched}");
    assert_eq!(untouched["threshold"], Value::Null);
    // Without a token: 401; a service token is not a user.
    let (status, _) = stack
        .send(
            reqwest::Method::PUT,
            "/api/credits/auto-topup",
            None,
            Some(good.to_owned()),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A good body, 25.0 read as 25: accepted and answered.
    let (status, set) = stack
        .send(
            reqwest::Method::PUT,
            "/api/credits/auto-topup",
            Some("eve"),
            Some(
                r#"{"enabled": false, "threshold": 10, "amount": 25.0, "monthly_cap": 100}"#
                    .to_owned(),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["configured"], true);
    assert_eq!(set["enabled"], false);
    assert_eq!(set["amount"], 25);
    assert_eq!(set["monthly_cap"], 100);
    assert_eq!(set["suspended_reason"], Value::Null);
    // A purchase's save flag must be a boolean.
    let (status, answer) = stack
        .send(
            reqwest::Method::POST,
            "/api/credits/purchase",
            Some("eve"),
            Some(r#"{"amount": 5, "save_payment_method": "yes"}"#.to_owned()),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
}
