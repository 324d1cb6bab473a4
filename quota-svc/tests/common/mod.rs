//! Test harness: a fresh database per test, quota-svc on port 0 with a clock the test
//! moves, and an authenticated client.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use quota_svc::{Config, RunningServer};
use reeve_proto::quota::v1::quota_service_client::QuotaServiceClient;
use reeve_runtime::auth::{BearerToken, ServiceTokens};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const TOKEN: &str = "quota-test-token";
/// 2026-01-01T00:00:00Z, in microseconds.
pub const T0: i64 = 1_767_225_600_000_000;
pub const SECOND: i64 = 1_000_000;

pub use reeve_testkit::Backend;
use reeve_testkit::ScratchDb;

/// A clock the test sets.
#[derive(Clone)]
pub struct TestClock(Arc<AtomicI64>);

impl TestClock {
    pub fn set(&self, us: i64) {
        self.0.store(us, Ordering::SeqCst);
    }
}

pub struct TestDb {
    pub url: String,
    pub clock: TestClock,
    _db: ScratchDb,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let db = ScratchDb::new(backend, "quota").await;
        TestDb {
            url: db.url.clone(),
            clock: TestClock(Arc::new(AtomicI64::new(T0))),
            _db: db,
        }
    }

    pub fn config(&self) -> Config {
        Config {
            database_url: self.url.clone(),
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            service_tokens: ServiceTokens::new([TOKEN]),
            registry_path: None,
            batch_workers: quota_svc::store::DEFAULT_BATCH_WORKERS,
        }
    }

    pub async fn start_with(&self, config: Config) -> anyhow::Result<RunningServer> {
        let clock = self.clock.0.clone();
        quota_svc::start_with_clock(
            config,
            Arc::new(move || clock.load(Ordering::SeqCst)),
            CancellationToken::new(),
        )
        .await
    }

    pub async fn start(&self) -> RunningServer {
        self.start_with(self.config()).await.unwrap()
    }
}

pub type Client = QuotaServiceClient<InterceptedService<Channel, BearerToken>>;

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn client(addr: SocketAddr) -> Client {
    QuotaServiceClient::with_interceptor(channel(addr).await, BearerToken::new(TOKEN).unwrap())
}
