//! Who may do what: scoped service tokens over real gRPC (credits-svc, quota-svc) and
//! REST (the bridge's service routes), and the user JWT's edges (expiry at `exp`
//! exactly, a `sub` the ledger could not credit), on the whole system started on
//! loopback over PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use reeve_proto::credits::v1 as credits_pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_proto::quota::v1 as quota_pb;
use reeve_proto::quota::v1::quota_service_client::QuotaServiceClient;
use reeve_runtime::auth::{BearerToken, INSUFFICIENT_SCOPE, Scope, ServiceTokens};
use reeve_testkit::{Backend, ScratchDb};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use common::{JWT_SECRET, WEBHOOK_SECRET, hs256_token};

/// A plain `REEVE_SERVICE_TOKENS` token: every scope.
const PLAIN: &str = "plain-token-every-scope";
const GATEWAY: &str = "gateway-token-deduct-only";
const QUOTA: &str = "quota-token-quota-only";
const ADMIN: &str = "admin-token-admin-only";
/// What the bridge presents to the services: what it calls on its own behalf.
const BRIDGE: &str = "bridge-token";

fn tokens() -> ServiceTokens {
    ServiceTokens::new([PLAIN])
        .with_token("gateway", GATEWAY, &[Scope::Deduct])
        .with_token("quota", QUOTA, &[Scope::Quota])
        .with_token("ops", ADMIN, &[Scope::Admin])
        .with_token(
            "bridge",
            BRIDGE,
            &[Scope::Deduct, Scope::Quota, Scope::Stripe, Scope::Admin],
        )
}

struct System {
    base: String,
    http: reqwest::Client,
    credits_addr: SocketAddr,
    quota_addr: SocketAddr,
    shutdown: CancellationToken,
    _db: ScratchDb,
}

impl Drop for System {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> System {
    let db = ScratchDb::new(Backend::Postgres, "scopes").await;
    let shutdown = CancellationToken::new();
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
    let mut credits_config =
        common::credits_config(&db.url, "127.0.0.1:0".parse().unwrap(), fake.api_base());
    credits_config.service_tokens = tokens();
    let credits = credits_svc::start(credits_config, shutdown.clone())
        .await
        .unwrap();
    let quota = quota_svc::start(
        quota_svc::Config {
            database_url: db.url.clone(),
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            service_tokens: tokens(),
            registry_path: None,
            batch_workers: quota_svc::store::DEFAULT_BATCH_WORKERS,
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let bridge = webhook_bridge::start(
        webhook_bridge::Config {
            http_addr: "127.0.0.1:0".parse().unwrap(),
            credits_url: format!("http://{}", credits.local_addr),
            quota_url: format!("http://{}", quota.local_addr),
            service_tokens: tokens(),
            service_token: BRIDGE.into(),
            jwt: webhook_bridge::auth::JwtKey::Hs256(JWT_SECRET.into()),
            jwt_audience: None,
            jwt_issuer: None,
            webhook_secret: WEBHOOK_SECRET.into(),
            database_url: db.url.clone(),
            currency: "usd".to_owned(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let system = System {
        base: format!("http://{}", bridge.local_addr),
        http: reqwest::Client::new(),
        credits_addr: credits.local_addr,
        quota_addr: quota.local_addr,
        shutdown,
        _db: db,
    };
    drop((credits, quota, bridge, fake));
    system
}

type Credits = CreditServiceClient<InterceptedService<Channel, BearerToken>>;
type Quota = QuotaServiceClient<InterceptedService<Channel, BearerToken>>;

impl System {
    async fn credits(&self, token: &str) -> Credits {
        let channel = Channel::from_shared(format!("http://{}", self.credits_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        CreditServiceClient::with_interceptor(channel, BearerToken::new(token).unwrap())
    }

    async fn quota(&self, token: &str) -> Quota {
        let channel = Channel::from_shared(format!("http://{}", self.quota_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        QuotaServiceClient::with_interceptor(channel, BearerToken::new(token).unwrap())
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(bearer);
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

    async fn post(&self, path: &str, bearer: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, bearer, Some(body))
            .await
    }

    async fn get(&self, path: &str, bearer: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, bearer, None).await
    }
}

fn grant(user: &str, key: &str) -> credits_pb::AddCreditsRequest {
    credits_pb::AddCreditsRequest {
        user_id: user.to_owned(),
        amount_micros: 10_000_000,
        idempotency_key: key.to_owned(),
        kind: credits_pb::CreditKind::Grant as i32,
        description: "scope test".to_owned(),
        ..Default::default()
    }
}

fn adjust(user: &str, key: &str) -> credits_pb::AdjustRequest {
    credits_pb::AdjustRequest {
        user_id: user.to_owned(),
        amount_micros: -1_000_000,
        idempotency_key: key.to_owned(),
        reason: "scope test".to_owned(),
    }
}

fn deduct(user: &str, key: &str) -> credits_pb::DeductRequest {
    credits_pb::DeductRequest {
        user_id: user.to_owned(),
        amount_micros: 1_000,
        idempotency_key: key.to_owned(),
        description: String::new(),
    }
}

fn set_tier(user: &str) -> quota_pb::SetTierRequest {
    quota_pb::SetTierRequest {
        user_id: user.to_owned(),
        tier: "pro".to_owned(),
    }
}

fn check(user: &str) -> quota_pb::CheckQuotaRequest {
    quota_pb::CheckQuotaRequest {
        user_id: user.to_owned(),
        feature: "ad_generations".to_owned(),
        consume: 0,
        idempotency_key: String::new(),
    }
}

/// The call was refused for lacking `scope`: PERMISSION_DENIED with the ErrorInfo.
fn assert_lacks<T: std::fmt::Debug>(result: Result<T, tonic::Status>, scope: &str) {
    let status = result.expect_err("a call without its scope must be refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let info = status.get_details_error_info().expect("an ErrorInfo");
    assert_eq!(info.reason, INSUFFICIENT_SCOPE);
    assert_eq!(info.metadata["scope"], scope);
}

fn assert_allowed<T>(result: Result<T, tonic::Status>) {
    if let Err(status) = result {
        panic!("refused: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deduct_token_cannot_grant_adjust_or_set_tiers_over_grpc() {
    let system = start().await;
    let mut credits = system.credits(GATEWAY).await;
    let mut quota = system.quota(GATEWAY).await;
    assert_lacks(credits.add_credits(grant("alice", "g1")).await, "admin");
    assert_lacks(credits.adjust(adjust("alice", "a1")).await, "admin");
    assert_lacks(quota.set_tier(set_tier("alice")).await, "admin");
    assert_lacks(quota.check_quota(check("alice")).await, "quota");
    assert_lacks(
        credits
            .purchase(credits_pb::PurchaseRequest {
                user_id: "alice".to_owned(),
                amount_credits: 25,
                ..Default::default()
            })
            .await,
        "stripe",
    );
    // Nothing was granted, so its own calls find an empty account.
    let balance = credits
        .get_balance(credits_pb::GetBalanceRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance_micros, 0);
    let refused = credits.deduct(deduct("alice", "d1")).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // The admin token grants; then the gateway deducts.
    let mut admin = system.credits(ADMIN).await;
    assert_allowed(admin.add_credits(grant("alice", "g1")).await);
    assert_allowed(admin.adjust(adjust("alice", "a1")).await);
    assert_allowed(system.quota(ADMIN).await.set_tier(set_tier("alice")).await);
    assert_lacks(admin.deduct(deduct("alice", "d2")).await, "deduct");
    assert_allowed(credits.deduct(deduct("alice", "d1")).await);
    assert_allowed(
        credits
            .deduct_batch(credits_pb::DeductBatchRequest {
                items: vec![deduct("alice", "d3")],
            })
            .await,
    );
    let balance = admin_balance(&system, "alice").await;
    assert_eq!(balance, 10_000_000 - 1_000_000 - 2_000);

    // An unknown token stays UNAUTHENTICATED, whatever the method.
    let mut stranger = system.credits("not-a-token").await;
    let status = stranger
        .add_credits(grant("alice", "g9"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

async fn admin_balance(system: &System, user: &str) -> i64 {
    system
        .credits(PLAIN)
        .await
        .get_balance(credits_pb::GetBalanceRequest {
            user_id: user.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .balance_micros
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_token_cannot_deduct_and_a_plain_token_does_everything() {
    let system = start().await;
    let mut quota_credits = system.credits(QUOTA).await;
    assert_lacks(quota_credits.deduct(deduct("bob", "q1")).await, "deduct");
    assert_lacks(
        quota_credits
            .deduct_batch(credits_pb::DeductBatchRequest {
                items: vec![deduct("bob", "q2")],
            })
            .await,
        "deduct",
    );
    assert_lacks(
        quota_credits
            .get_balance(credits_pb::GetBalanceRequest {
                user_id: "bob".to_owned(),
            })
            .await,
        "deduct",
    );
    let mut quota = system.quota(QUOTA).await;
    assert_allowed(quota.check_quota(check("bob")).await);
    assert_lacks(quota.set_tier(set_tier("bob")).await, "admin");

    // REEVE_SERVICE_TOKENS: every scope, as before scopes existed.
    let mut plain = system.credits(PLAIN).await;
    assert_allowed(plain.add_credits(grant("bob", "p1")).await);
    assert_allowed(plain.adjust(adjust("bob", "p2")).await);
    assert_allowed(plain.deduct(deduct("bob", "p3")).await);
    let mut plain_quota = system.quota(PLAIN).await;
    assert_allowed(plain_quota.set_tier(set_tier("bob")).await);
    assert_allowed(plain_quota.check_quota(check("bob")).await);
    let (status, body) = system
        .post(
            "/api/credits/deduct",
            PLAIN,
            json!({"user_id": "bob", "amount": "0.5", "idempotency_key": "p4"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_service_routes_need_the_deduct_scope() {
    let system = start().await;
    assert_allowed(
        system
            .credits(ADMIN)
            .await
            .add_credits(grant("carol", "g"))
            .await,
    );
    let one = |key: &str| json!({"user_id": "carol", "amount": "0.25", "idempotency_key": key});
    let batch = |key: &str| json!({"items": [{"user_id": "carol", "amount": "0.25", "idempotency_key": key}]});
    for token in [QUOTA, ADMIN] {
        let (status, body) = system.post("/api/credits/deduct", token, one("r1")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["error"]["code"], "insufficient_scope", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("deduct")
        );
        let (status, body) = system
            .post("/api/credits/deduct/batch", token, batch("r2"))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["error"]["code"], "insufficient_scope", "{body}");
    }
    let (status, body) = system
        .post("/api/credits/deduct", "not-a-token", one("r1"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "invalid_service_token");
    // Nothing was deducted by the refused calls.
    assert_eq!(admin_balance(&system, "carol").await, 10_000_000);

    let (status, body) = system.post("/api/credits/deduct", GATEWAY, one("r1")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = system
        .post("/api/credits/deduct/batch", GATEWAY, batch("r2"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(admin_balance(&system, "carol").await, 9_500_000);
}

fn unix_now() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_is_refused_from_the_second_its_exp_names() {
    let system = start().await;
    let token = |exp: u64| hs256_token(json!({"sub": "dora", "exp": exp}), JWT_SECRET);
    // Start just after a second begins, so the whole request runs inside it.
    let into_second = unix_now().subsec_millis();
    tokio::time::sleep(std::time::Duration::from_millis(u64::from(
        1_005 - into_second.min(1_000),
    )))
    .await;
    let now = unix_now().as_secs();
    let (status, body) = system.get("/api/credits/balance", &token(now)).await;
    assert_eq!(
        unix_now().as_secs(),
        now,
        "the test ran across a second; rerun"
    );
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "exp == now accepted: {body}"
    );
    assert_eq!(body["error"]["code"], "token_expired");
    let (status, body) = system.get("/api/credits/balance", &token(now + 2)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_the_ledger_cannot_credit_never_starts_a_purchase() {
    let system = start().await;
    for sub in ["eve\u{1}", "eve\u{0}", "\u{7f}", ""] {
        let jwt = hs256_token(
            json!({"sub": sub, "exp": unix_now().as_secs() + 600}),
            JWT_SECRET,
        );
        let (status, body) = system
            .post("/api/credits/purchase", &jwt, json!({"amount": 25}))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{sub:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_token", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("sub is not a valid user id"),
            "{body}"
        );
        assert!(body["checkout_url"].is_null());
    }
    let jwt = hs256_token(
        json!({"sub": "eve", "exp": unix_now().as_secs() + 600}),
        JWT_SECRET,
    );
    let (status, body) = system
        .post("/api/credits/purchase", &jwt, json!({"amount": 25}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
