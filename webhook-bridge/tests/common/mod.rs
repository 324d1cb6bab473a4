//! Test harness: the whole system on loopback — credits-svc, quota-svc, the fake
//! Stripe and the bridge, each on port 0, over a fresh database (a PostgreSQL schema or
//! a SQLite file) — and an HTTP client with helpers for tokens and signed events.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use reeve_proto::credits::v1 as credits_pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_runtime::auth::{BearerToken, ServiceTokens};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use webhook_bridge::auth::JwtKey;

pub const SERVICE_TOKEN: &str = "test-service-token";
pub const JWT_SECRET: &str = "test-jwt-secret-of-enough-bytes";
pub const WEBHOOK_SECRET: &str = "whsec_test_bridge_secret";
pub const STRIPE_KEY: &str = "sk_test_fake_key";

pub use reeve_testkit::Backend;
use reeve_testkit::ScratchDb;

/// The whole system, started for one test.
pub struct Stack {
    pub db: ScratchDb,
    pub base: String,
    pub http: reqwest::Client,
    pub fake: fake_stripe::FakeStripe,
    pub bridge: webhook_bridge::RunningBridge,
    /// What the bridge was started with (to start another on the same database).
    pub bridge_config: webhook_bridge::Config,
    pub credits_addr: SocketAddr,
    pub credits_shutdown: CancellationToken,
    shutdown: CancellationToken,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.credits_shutdown.cancel();
    }
}

pub fn credits_config(
    db_url: &str,
    addr: SocketAddr,
    stripe_api_base: String,
) -> credits_svc::Config {
    credits_svc::Config {
        database_url: db_url.to_owned(),
        listen_addr: addr,
        service_tokens: ServiceTokens::new([SERVICE_TOKEN]),
        deduct_workers: None,
        lot_sweep_interval: std::time::Duration::from_secs(60),
        clock: reeve_runtime::clock::Clock::system(),
        checkout: Some(credits_svc::checkout::CheckoutConfig {
            secret_key: STRIPE_KEY.into(),
            api_base: stripe_api_base,
            min_credits: 5,
            max_credits: 1_000,
            success_url: "http://localhost:3000/credits?checkout=success".to_owned(),
            cancel_url: "http://localhost:3000/credits?checkout=cancel".to_owned(),
            currency: "usd".to_owned(),
        }),
    }
}

impl Stack {
    pub async fn start(backend: Backend) -> Stack {
        Stack::start_with_jwt(backend, JwtKey::Hs256(JWT_SECRET.into())).await
    }

    pub async fn start_with_jwt(backend: Backend, jwt: JwtKey) -> Stack {
        Stack::start_with_jwt_audience(backend, jwt, None).await
    }

    pub async fn start_with_jwt_audience(
        backend: Backend,
        jwt: JwtKey,
        audience: Option<&str>,
    ) -> Stack {
        let db = ScratchDb::new(backend, "bridge").await;
        let shutdown = CancellationToken::new();
        let credits_shutdown = CancellationToken::new();
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
        let credits = credits_svc::start(
            credits_config(&db.url, "127.0.0.1:0".parse().unwrap(), fake.api_base()),
            credits_shutdown.clone(),
        )
        .await
        .unwrap();
        let quota = quota_svc::start(
            quota_svc::Config {
                database_url: db.url.clone(),
                listen_addr: "127.0.0.1:0".parse().unwrap(),
                service_tokens: ServiceTokens::new([SERVICE_TOKEN]),
                registry_path: None,
                batch_workers: quota_svc::store::DEFAULT_BATCH_WORKERS,
            },
            shutdown.clone(),
        )
        .await
        .unwrap();
        let credits_addr = credits.local_addr;
        let bridge_config = webhook_bridge::Config {
            http_addr: "127.0.0.1:0".parse().unwrap(),
            credits_url: format!("http://{}", credits.local_addr),
            quota_url: format!("http://{}", quota.local_addr),
            service_tokens: ServiceTokens::new([SERVICE_TOKEN]),
            service_token: SERVICE_TOKEN.into(),
            jwt,
            jwt_audience: audience.map(str::to_owned),
            jwt_issuer: None,
            webhook_secret: WEBHOOK_SECRET.into(),
            database_url: db.url.clone(),
            currency: "usd".to_owned(),
        };
        let bridge = webhook_bridge::start(bridge_config.clone(), shutdown.clone())
            .await
            .unwrap();
        let base = format!("http://{}", bridge.local_addr);
        fake.set_webhook_url(format!("{base}/api/credits/webhook"));
        // The servers live until the tokens are cancelled; their handles are not needed.
        drop((credits, quota));
        Stack {
            db,
            base,
            http: reqwest::Client::new(),
            fake,
            bridge,
            bridge_config,
            credits_addr,
            credits_shutdown,
            shutdown,
        }
    }

    pub fn token(&self, user_id: &str) -> String {
        hs256_token(json!({"sub": user_id, "exp": now() + 3600}), JWT_SECRET)
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str, bearer: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, path, Some(bearer), None)
            .await
    }

    pub async fn post(&self, path: &str, bearer: &str, body: Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, path, Some(bearer), Some(body))
            .await
    }

    /// The user's balance in micros, read through the REST API.
    pub async fn balance(&self, user_id: &str) -> i64 {
        let (status, body) = self.get("/api/credits/balance", &self.token(user_id)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["balance_micros"].as_i64().unwrap()
    }

    /// Sends a raw webhook body with the given signature header.
    pub async fn send_raw(&self, payload: &str, signature: Option<&str>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(format!("{}/api/credits/webhook", self.base))
            .header("content-type", "application/json")
            .body(payload.to_owned());
        if let Some(signature) = signature {
            request = request.header("stripe-signature", signature);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Sends `event`, correctly signed now.
    pub async fn send_event(&self, event: &Value) -> (StatusCode, Value) {
        let payload = event.to_string();
        let signature = fake_stripe::sign(&payload, WEBHOOK_SECRET, fake_stripe::now_secs());
        self.send_raw(&payload, Some(&signature)).await
    }

    pub async fn credits_client(
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

    /// Grants `credits` whole credits to a user through gRPC.
    pub async fn grant(&self, user_id: &str, credits: i64) {
        self.credits_client()
            .await
            .add_credits(credits_pb::AddCreditsRequest {
                user_id: user_id.to_owned(),
                amount_micros: credits * 1_000_000,
                idempotency_key: format!("grant-{user_id}-{}", rand::random::<u64>()),
                kind: credits_pb::CreditKind::Grant.into(),
                description: "test grant".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// The user's history as the REST API returns it (first page).
    pub async fn history(&self, user_id: &str) -> Vec<Value> {
        let (status, body) = self.get("/api/credits/history", &self.token(user_id)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["entries"].as_array().unwrap().clone()
    }
}

/// Sends `request` and reads its JSON answer (the fake Stripe's, the bridge's).
pub async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

pub fn now() -> i64 {
    fake_stripe::now_secs()
}

pub fn hs256_token(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Stripe's own fixture objects, from `shared/stripe-fixtures` beside the checkout.
pub fn fixture(name: &str) -> Value {
    let dir = std::env::var("REEVE_STRIPE_FIXTURES").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/stripe-fixtures").to_owned()
    });
    let path = format!("{dir}/{name}.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("Stripe fixture {path}: {e} (set REEVE_STRIPE_FIXTURES)"));
    serde_json::from_str(&text).unwrap()
}

/// Stripe's event fixture around `object`, as `event_type`.
pub fn event(id: &str, event_type: &str, object: Value, previous: Option<Value>) -> Value {
    let mut event = fixture("event");
    event["id"] = json!(id);
    event["type"] = json!(event_type);
    event["created"] = json!(now());
    event["data"] = json!({ "object": object });
    if let Some(previous) = previous {
        event["data"]["previous_attributes"] = previous;
    }
    event
}

/// A succeeded payment intent from Stripe's fixture.
pub fn payment_intent(id: &str, user_id: Option<&str>, amount_cents: i64, currency: &str) -> Value {
    let mut pi = fixture("payment_intent");
    pi["id"] = json!(id);
    pi["amount"] = json!(amount_cents);
    pi["amount_received"] = json!(amount_cents);
    pi["currency"] = json!(currency);
    pi["status"] = json!("succeeded");
    pi["latest_charge"] = json!(format!("ch_for_{id}"));
    pi["metadata"] = match user_id {
        Some(user) => json!({ "user_id": user }),
        None => json!({}),
    };
    pi
}
