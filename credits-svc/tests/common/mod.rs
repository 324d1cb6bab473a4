//! Test harness: a fresh database per test (a new PostgreSQL schema, or a SQLite file
//! in a temporary folder), the real server on port 0, and an authenticated client.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use credits_svc::{Config, RunningServer};
use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_runtime::auth::{BearerToken, ServiceTokens};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const TOKEN: &str = "test-service-token";
pub const CREDIT: i64 = 1_000_000;

pub use reeve_testkit::Backend;
use reeve_testkit::ScratchDb;

/// A database of its own for one test.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    _db: ScratchDb,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let db = ScratchDb::new(backend, "credits").await;
        TestDb {
            backend,
            url: db.url.clone(),
            _db: db,
        }
    }

    pub fn config(&self) -> Config {
        Config {
            database_url: self.url.clone(),
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            service_tokens: ServiceTokens::new([TOKEN, "second-token"]),
            deduct_workers: None,
            lot_sweep_interval: std::time::Duration::from_secs(60),
            clock: reeve_runtime::clock::Clock::system(),
            checkout: None,
        }
    }

    pub async fn start(&self) -> RunningServer {
        credits_svc::start(self.config(), CancellationToken::new())
            .await
            .unwrap()
    }
}

pub type Client = CreditServiceClient<InterceptedService<Channel, BearerToken>>;

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn client(addr: SocketAddr) -> Client {
    client_with_token(addr, TOKEN).await
}

pub async fn client_with_token(addr: SocketAddr, token: &str) -> Client {
    CreditServiceClient::with_interceptor(channel(addr).await, BearerToken::new(token).unwrap())
}

/// A user's balance answer (balance, held, available, paid, promotional, next expiry).
pub async fn balance(c: &mut Client, user: &str) -> pb::GetBalanceResponse {
    c.get_balance(pb::GetBalanceRequest {
        user_id: user.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// One `Deduct` call with an empty description.
pub async fn deduct(
    c: &mut Client,
    user: &str,
    micros: i64,
    key: &str,
) -> Result<pb::DeductResponse, tonic::Status> {
    c.deduct(pb::DeductRequest {
        user_id: user.into(),
        amount_micros: micros,
        idempotency_key: key.into(),
        description: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// The server on the time of `clock`, with expired lots and holds swept every `sweep`,
/// until `shutdown`.
pub async fn start_with_clock(
    db: &TestDb,
    clock: &reeve_runtime::clock::ManualClock,
    sweep: std::time::Duration,
    shutdown: &CancellationToken,
) -> RunningServer {
    let config = Config {
        clock: clock.clock(),
        lot_sweep_interval: sweep,
        ..db.config()
    };
    credits_svc::start(config, shutdown.clone()).await.unwrap()
}

/// Replays `PROPTEST_CASES` (default `default_cases`) random histories of 1 to 39
/// steps drawn from `step`, each on a runtime of two threads.
pub fn run_histories<S, F, Fut>(step: S, default_cases: u32, replay: F)
where
    S: proptest::strategy::Strategy,
    S::Value: std::fmt::Debug,
    F: Fn(Vec<S::Value>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default_cases);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    });
    runner
        .run(&proptest::collection::vec(step, 1..40), |steps| {
            runtime.block_on(replay(steps));
            Ok(())
        })
        .unwrap();
}

/// A balance row of `user` locked by a session of `pool` (PostgreSQL), until the
/// returned transaction ends; with that session's backend pid, for
/// [`wait_until_blocked_by`].
pub async fn lock_balance_row(
    pool: &sqlx::PgPool,
    user: &str,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, i32) {
    let mut blocking = pool.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar(
        "SELECT pg_backend_pid() FROM credit_accounts WHERE user_id = $1 FOR UPDATE",
    )
    .bind(user)
    .fetch_one(&mut *blocking)
    .await
    .unwrap();
    (blocking, pid)
}

/// Returns once some backend waits on a lock of the session `pid` (not on another
/// test's lock in the shared database); fails after 20 s, saying `what` never waited.
pub async fn wait_until_blocked_by(pool: &sqlx::PgPool, pid: i32, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} never waited");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
