//! The typed clients and the quota guard against real services: a retried call keeps
//! its key (applied once), and the guard built from the builder consumes and releases.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{CREDIT, Credits, TOKEN};
use reeve_client::{ClientBuilder, QuotaGuard, RetryPolicy, SecretString};
use reeve_proto::credits::v1 as pb;
use reeve_runtime::auth::ServiceTokens;
use reeve_testkit::{Backend, ScratchDb};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deduct_sent_while_credits_svc_is_down_is_retried_with_its_key_and_applied_once() {
    let mut credits = Credits::start().await;
    credits.grant("alice", 10 * CREDIT).await;
    credits.stop().await;
    let client = credits.connection().credits().with_retry(RetryPolicy {
        max_attempts: 100,
        base_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    });
    let request = pb::DeductRequest {
        user_id: "alice".to_owned(),
        amount_micros: CREDIT,
        idempotency_key: "call-1".to_owned(),
        description: String::new(),
    };
    let pending = {
        let (client, request) = (client.clone(), request.clone());
        tokio::spawn(async move { client.deduct(request).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !pending.is_finished(),
        "still retrying while the service is down"
    );
    credits.restart().await;
    let first = pending.await.unwrap().unwrap();
    assert!(!first.duplicate);
    let again = client.deduct(request).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(credits.audit("alice").await, (2, 9 * CREDIT));

    // A refusal is an answer: not retried.
    let refused = client
        .deduct(pb::DeductRequest {
            user_id: "alice".to_owned(),
            amount_micros: 100 * CREDIT,
            idempotency_key: "call-2".to_owned(),
            description: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_guard_from_the_builder_consumes_once_per_key_and_releases() {
    let db = ScratchDb::new(Backend::Postgres, "client_quota").await;
    let server = quota_svc::start(
        quota_svc::Config {
            database_url: db.url.clone(),
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            service_tokens: ServiceTokens::new([TOKEN]),
            registry_path: None,
            batch_workers: quota_svc::store::DEFAULT_BATCH_WORKERS,
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let connection = ClientBuilder::new(format!("http://{}", server.local_addr))
        .service_token(SecretString::from(TOKEN))
        .connect()
        .await
        .unwrap();
    let guard = QuotaGuard::from_connection(&connection);
    let permit = guard
        .require("alice", "ad_generations", "req-1")
        .await
        .unwrap();
    assert_eq!(permit.reply.used, 1);
    let again = guard
        .require("alice", "ad_generations", "req-1")
        .await
        .unwrap();
    assert!(again.reply.duplicate);
    assert_eq!(again.reply.used, 1);
    assert!(guard.release(&permit).await.unwrap());
    let unknown = guard
        .require("alice", "no_such_feature", "req-2")
        .await
        .unwrap_err();
    assert_eq!(unknown.http_status(), 403);
    server.stop().await.unwrap();
}

/// Grants `<prefix>-0` … `<prefix>-{users - 1}` i + 1 credits each, then asks
/// `questions` balances at once through `reader`: of those users, of `<prefix>-{users}`
/// (never credited) and, every 50th, of an id with a NUL byte. Each answer must be its
/// own user's, each NUL id must fail alone with the refusal `GetBalance` gives it.
async fn grant_then_ask_all_at_once(
    credits: &Credits,
    reader: &reeve_client::BalanceReader,
    prefix: &str,
    users: i64,
    questions: i64,
) {
    for i in 0..users {
        credits
            .grant(&format!("{prefix}-{i}"), (i + 1) * CREDIT)
            .await;
    }
    let mut asked = tokio::task::JoinSet::new();
    for n in 0..questions {
        let reader = reader.clone();
        let user = if n % 50 == 7 {
            "bad\0user".to_owned()
        } else {
            format!("{prefix}-{}", n % (users + 1))
        };
        asked.spawn(async move { (user.clone(), reader.get(user).await) });
    }
    let mut refused = 0;
    for (user, answer) in asked.join_all().await {
        if user.contains('\0') {
            let status = answer.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("user_id"), "{status:?}");
            refused += 1;
            continue;
        }
        let answer = answer.unwrap_or_else(|status| panic!("{user}: {status:?}"));
        assert_eq!(answer.user_id, user);
        let i: i64 = user[prefix.len() + 1..].parse().unwrap();
        let expected = if i == users { 0 } else { (i + 1) * CREDIT };
        assert_eq!(answer.balance_micros, expected, "{user}");
        assert_eq!(answer.available_micros, expected, "{user}");
    }
    assert_eq!(refused, (0..questions).filter(|n| n % 50 == 7).count());
}

/// Many concurrent balance questions through the reader: each gets its own user's
/// answer (coalesced into `GetBalances` calls), and an invalid id among them fails
/// alone with the refusal `GetBalance` gives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balance_reader_answers_each_question_with_its_own_users_balance() {
    let credits = Credits::start().await;
    let reader = reeve_client::BalanceReader::new(credits.connection().credits());
    grant_then_ask_all_at_once(&credits, &reader, "reader", 20, 300).await;
}

/// A credits-svc from before `GetBalances`, as a rolling upgrade may leave one behind
/// the callers: a gRPC server of our own on loopback that answers `GetBalance` (from
/// the real credits-svc behind it) and every other method `UNIMPLEMENTED`, as tonic
/// answers a method it does not know. Returns its address and how many calls it
/// refused.
async fn credits_svc_without_get_balances(
    upstream: reeve_client::CreditsClient,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let refused = Arc::new(AtomicUsize::new(0));
    let get_balance = tower::service_fn(move |request: axum::extract::Request| {
        let upstream = upstream.clone();
        async move {
            let answer = tower::service_fn(move |asked: tonic::Request<pb::GetBalanceRequest>| {
                let upstream = upstream.clone();
                async move {
                    upstream
                        .get_balance(asked.into_inner())
                        .await
                        .map(tonic::Response::new)
                }
            });
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                pb::GetBalanceResponse,
                pb::GetBalanceRequest,
            >::default());
            Ok::<_, std::convert::Infallible>(grpc.unary(answer, request).await)
        }
    });
    let counted = Arc::clone(&refused);
    let router = axum::Router::new()
        .route_service("/reeve.credits.v1.CreditService/GetBalance", get_balance)
        .fallback(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { tonic::Status::unimplemented("").into_http::<axum::body::Body>() }
        });
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::from(router))
            .serve_with_incoming(incoming),
    );
    (addr, refused)
}

/// The reader against a credits-svc that does not know `GetBalances` yet: every
/// question still gets its own user's balance, each batch asked as `GetBalance` calls,
/// and an invalid id among them fails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balance_reader_answers_through_a_credits_svc_older_than_get_balances() {
    let credits = Credits::start().await;
    let (old, refused) = credits_svc_without_get_balances(credits.connection().credits()).await;
    let connection = ClientBuilder::new(old.to_string())
        .service_token(SecretString::from(TOKEN))
        .connect_lazy()
        .unwrap();
    let reader = reeve_client::BalanceReader::new(connection.credits());
    grant_then_ask_all_at_once(&credits, &reader, "old", 10, 200).await;
    // The questions did come together, and were refused as a batch.
    assert!(
        refused.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "no batch was sent: the fallback went untested"
    );
}
