//! The network to PostgreSQL fails under load: a TCP proxy of our own
//! (`reeve_testkit::FaultProxy`) sits between every service (credits-svc, quota-svc,
//! the bridge) and the database, and is cut for a few seconds while gateway-style
//! DeductBatch and Deduct calls (real gRPC, several tasks) and signed Stripe webhooks
//! (real HTTP) keep coming. Then every call is retried with its key, as a client does,
//! and the ledger is audited straight from the database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_proto::credits::v1::deduct_outcome::Result as Outcome;
use reeve_runtime::auth::{BearerToken, ServiceTokens};
use reeve_testkit::proxy::{upstream_of, url_via};
use reeve_testkit::{Backend, FaultProxy, ScratchDb};
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use common::{JWT_SECRET, SERVICE_TOKEN, WEBHOOK_SECRET};

type Credits = CreditServiceClient<InterceptedService<Channel, BearerToken>>;

const USERS: usize = 6;
const GRANT_MICROS: i64 = 1_000_000 * 1_000_000;
const DEDUCT_MICROS: i64 = 1_000;
const PURCHASE_CENTS: i64 = 500;
const BATCH_ITEMS: usize = 50;
const CUT: Duration = Duration::from_secs(3);

fn user(i: usize) -> String {
    format!("fault-user-{}", i % USERS)
}

fn item(key: String, i: usize) -> pb::DeductRequest {
    pb::DeductRequest {
        user_id: user(i),
        amount_micros: DEDUCT_MICROS,
        idempotency_key: key,
        description: "fault test".to_owned(),
    }
}

async fn client(addr: std::net::SocketAddr) -> Credits {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    CreditServiceClient::with_interceptor(channel, BearerToken::new(SERVICE_TOKEN).unwrap())
        .max_decoding_message_size(64 << 20)
}

fn signed(event: &serde_json::Value) -> (String, String) {
    let payload = event.to_string();
    let signature = fake_stripe::sign(&payload, WEBHOOK_SECRET, fake_stripe::now_secs());
    (payload, signature)
}

async fn send_webhook(http: &reqwest::Client, base: &str, event: &serde_json::Value) -> bool {
    let (payload, signature) = signed(event);
    http.post(format!("{base}/api/credits/webhook"))
        .header("content-type", "application/json")
        .header("stripe-signature", signature)
        .body(payload)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
}

#[derive(Default)]
struct Sent {
    /// Every batch sent, and whether it was answered OK.
    batches: Vec<(Vec<pb::DeductRequest>, bool)>,
    /// Every single deduction sent, and whether it was answered OK.
    singles: Vec<(pb::DeductRequest, bool)>,
    /// Every webhook sent (payment intent id, user, the event), and whether it was 200.
    webhooks: Vec<(serde_json::Value, bool)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_cut_under_load_loses_nothing_acknowledged_and_doubles_nothing() {
    let db = ScratchDb::new(Backend::Postgres, "fault").await;
    let proxy = FaultProxy::start(upstream_of(&db.url).await).await;
    let via = url_via(&db.url, proxy.local_addr());
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
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
        common::credits_config(&via, "127.0.0.1:0".parse().unwrap(), fake.api_base()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let quota = quota_svc::start(
        quota_svc::Config {
            database_url: via.clone(),
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
            http_addr: "127.0.0.1:0".parse().unwrap(),
            credits_url: format!("http://{}", credits.local_addr),
            quota_url: format!("http://{}", quota.local_addr),
            service_tokens: ServiceTokens::new([SERVICE_TOKEN]),
            service_token: SERVICE_TOKEN.into(),
            jwt: webhook_bridge::auth::JwtKey::Hs256(JWT_SECRET.into()),
            jwt_audience: None,
            jwt_issuer: None,
            webhook_secret: WEBHOOK_SECRET.into(),
            database_url: via.clone(),
            currency: "usd".to_owned(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let base = format!("http://{}", bridge.local_addr);
    let credits_addr = credits.local_addr;
    let http = reqwest::Client::new();

    let mut admin = client(credits_addr).await;
    for i in 0..USERS {
        admin
            .add_credits(pb::AddCreditsRequest {
                user_id: user(i),
                amount_micros: GRANT_MICROS,
                idempotency_key: format!("fault-grant-{i}"),
                kind: pb::CreditKind::Grant.into(),
                description: "fault test".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    // The load: batches, singles and webhooks, each from tasks of their own.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..3 {
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut credits = client(credits_addr).await;
            let mut sent = Sent::default();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let items: Vec<_> = (0..BATCH_ITEMS)
                    .map(|j| item(format!("fault-b{t}-{n}-{j}"), t + n + j))
                    .collect();
                let answer = credits
                    .deduct_batch(pb::DeductBatchRequest {
                        items: items.clone(),
                    })
                    .await;
                let acked = match answer {
                    Ok(reply) => {
                        let outcomes = reply.into_inner().outcomes;
                        assert_eq!(outcomes.len(), items.len());
                        for outcome in outcomes {
                            assert!(
                                matches!(outcome.result, Some(Outcome::Applied(_))),
                                "{outcome:?}"
                            );
                        }
                        true
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        false
                    }
                };
                sent.batches.push((items, acked));
                n += 1;
            }
            sent
        }));
    }
    for t in 0..3 {
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut credits = client(credits_addr).await;
            let mut sent = Sent::default();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let request = item(format!("fault-s{t}-{n}"), t * 7 + n);
                let acked = match credits.deduct(request.clone()).await {
                    Ok(reply) => {
                        assert!(!reply.into_inner().duplicate);
                        true
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        false
                    }
                };
                sent.singles.push((request, acked));
                n += 1;
            }
            sent
        }));
    }
    {
        let stop = Arc::clone(&stop);
        let base = base.clone();
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Sent::default();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let pi = format!("pi_fault_{n}");
                let event = common::event(
                    &format!("evt_fault_{n}"),
                    "payment_intent.succeeded",
                    common::payment_intent(&pi, Some(&user(n)), PURCHASE_CENTS, "usd"),
                    None,
                );
                let acked = send_webhook(&http, &base, &event).await;
                sent.webhooks.push((event, acked));
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        }));
    }

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    proxy.cut();
    let cut_at = Instant::now();
    let mut readiness_during_cut = Vec::new();
    while cut_at.elapsed() < CUT {
        let status = http
            .get(format!("{base}/readyz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map(|r| r.status());
        readiness_during_cut.push(status.ok());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.restore();
    assert!(
        readiness_during_cut.contains(&Some(StatusCode::SERVICE_UNAVAILABLE)),
        "readiness never reported the outage: {readiness_during_cut:?}"
    );

    // The services recover by themselves: ready again, and a deduction goes through.
    let restored_at = Instant::now();
    loop {
        let ready = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK);
        let deducted = admin
            .deduct(item(
                format!("fault-probe-{}", restored_at.elapsed().as_millis()),
                0,
            ))
            .await;
        if ready && deducted.is_ok() {
            break;
        }
        assert!(
            restored_at.elapsed() < Duration::from_secs(30),
            "not recovered 30 s after the restore: ready={ready}, deduct={deducted:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovered_in = restored_at.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Sent::default();
    for task in tasks {
        let part = task.await.unwrap();
        sent.batches.extend(part.batches);
        sent.singles.extend(part.singles);
        sent.webhooks.extend(part.webhooks);
    }
    let failed = sent.batches.iter().filter(|(_, acked)| !acked).count()
        + sent.singles.iter().filter(|(_, acked)| !acked).count();
    eprintln!(
        "fault: {} batches, {} singles, {} webhooks sent; {failed} calls failed during the cut; recovered {recovered_in:?} after the restore",
        sent.batches.len(),
        sent.singles.len(),
        sent.webhooks.len(),
    );
    assert!(failed > 0, "the cut failed no call: it tested nothing");
    assert!(sent.batches.iter().filter(|(_, acked)| *acked).count() > 2);
    assert!(sent.singles.iter().filter(|(_, acked)| *acked).count() > 2);

    // Every call retried with its key: what was acknowledged is a duplicate now.
    for (items, acked) in &sent.batches {
        let outcomes = admin
            .deduct_batch(pb::DeductBatchRequest {
                items: items.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .outcomes;
        for outcome in outcomes {
            match outcome.result {
                Some(Outcome::Duplicate(_)) => {}
                Some(Outcome::Applied(_)) if !acked => {}
                other => panic!("retry of a batch (acked: {acked}): {other:?}"),
            }
        }
    }
    for (request, acked) in &sent.singles {
        let reply = admin.deduct(request.clone()).await.unwrap().into_inner();
        assert!(
            reply.duplicate || !acked,
            "an acknowledged deduction applied twice"
        );
    }
    for (event, _) in &sent.webhooks {
        assert!(
            send_webhook(&http, &base, event).await,
            "redelivery refused"
        );
    }

    // The audit, straight from the database.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let cached: BTreeMap<String, i64> =
        sqlx::query_as("SELECT user_id, balance_micros FROM credit_accounts")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let summed: BTreeMap<String, i64> = sqlx::query_as(
        "SELECT user_id, SUM(amount_micros)::BIGINT FROM credit_ledger GROUP BY user_id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(cached, summed, "a cached balance differs from its entries");

    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT idempotency_key FROM credit_ledger WHERE kind = 'deduction'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let in_ledger: BTreeSet<String> = rows.iter().map(|(k,)| k.clone()).collect();
    assert_eq!(in_ledger.len(), rows.len(), "a key applied twice");
    let mut expected: BTreeSet<String> = sent
        .batches
        .iter()
        .flat_map(|(items, _)| items.iter().map(|i| i.idempotency_key.clone()))
        .chain(sent.singles.iter().map(|(r, _)| r.idempotency_key.clone()))
        .collect();
    let probes: Vec<String> = in_ledger
        .iter()
        .filter(|k| k.starts_with("fault-probe-"))
        .cloned()
        .collect();
    expected.extend(probes);
    assert_eq!(
        in_ledger, expected,
        "the ledger's deductions are not the sent ones"
    );

    let (purchases, purchased): (i64, Option<i64>) = sqlx::query_as(
        "SELECT COUNT(*), SUM(amount_micros)::BIGINT FROM credit_ledger WHERE kind = 'purchase'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let events = sent.webhooks.len() as i64;
    assert!(events > 0);
    assert_eq!(purchases, events, "each payment credited exactly once");
    assert_eq!(purchased, Some(events * PURCHASE_CENTS * 10_000));

    // And each balance is what was granted, bought and deducted.
    let deductions: BTreeMap<String, i64> = sqlx::query_as(
        "SELECT user_id, COUNT(*) FROM credit_ledger WHERE kind = 'deduction' GROUP BY user_id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let mut bought = BTreeMap::<String, i64>::new();
    for (event, _) in &sent.webhooks {
        let user_id = event["data"]["object"]["metadata"]["user_id"]
            .as_str()
            .unwrap()
            .to_owned();
        *bought.entry(user_id).or_default() += PURCHASE_CENTS * 10_000;
    }
    for i in 0..USERS {
        let u = user(i);
        let expected = GRANT_MICROS + bought.get(&u).copied().unwrap_or(0)
            - DEDUCT_MICROS * deductions.get(&u).copied().unwrap_or(0);
        assert_eq!(cached[&u], expected, "{u}");
    }
    drop(proxy);
}
