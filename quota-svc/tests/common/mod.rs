//! Test harness: a fresh database per test, quota-svc on port 0 with a clock the test
//! moves, and an authenticated client.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

pub fn postgres_base_url() -> String {
    std::env::var("REEVE_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

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
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        let clock = TestClock(Arc::new(AtomicI64::new(T0)));
        match backend {
            Backend::Postgres => {
                let schema = format!(
                    "quota_test_{}_{}_{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed),
                    rand::random::<u32>()
                );
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_base_url()).await.unwrap();
                sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut conn).await.unwrap();
                let url = format!("{}?options[search_path]={schema}", postgres_base_url());
                TestDb { url, clock, schema: Some(schema), _dir: None }
            }
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}/quota.db", dir.path().display());
                TestDb { url, clock, schema: None, _dir: Some(dir) }
            }
        }
    }

    pub fn config(&self) -> Config {
        Config {
            database_url: self.url.clone(),
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            service_tokens: ServiceTokens::new([TOKEN]),
            registry_path: None,
        }
    }

    pub async fn start_with(&self, config: Config) -> anyhow::Result<RunningServer> {
        let clock = self.clock.0.clone();
        quota_svc::start_with_clock(config, Arc::new(move || clock.load(Ordering::SeqCst)), CancellationToken::new()).await
    }

    pub async fn start(&self) -> RunningServer {
        self.start_with(self.config()).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(schema) = self.schema.take() {
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async {
                    if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_base_url()).await {
                        let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&mut conn).await;
                    }
                });
            })
            .join();
        }
    }
}

pub type Client = QuotaServiceClient<InterceptedService<Channel, BearerToken>>;

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

pub async fn client(addr: SocketAddr) -> Client {
    QuotaServiceClient::with_interceptor(channel(addr).await, BearerToken::new(TOKEN).unwrap())
}

#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await;
                }
            )*
        }
    };
}
