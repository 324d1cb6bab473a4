//! Test harness: a fresh database per test (a new PostgreSQL schema, or a SQLite file
//! in a temporary folder), the real server on port 0, and an authenticated client.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use credits_svc::{Config, RunningServer};
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_runtime::auth::{BearerToken, ServiceTokens};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const TOKEN: &str = "test-service-token";
pub const CREDIT: i64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Base URL of the PostgreSQL database the tests create their schemas in.
pub fn postgres_base_url() -> String {
    std::env::var("REEVE_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database of its own for one test; dropped (schema or folder) with the value.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Postgres => {
                let schema = format!(
                    "credits_test_{}_{}_{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed),
                    rand::random::<u32>()
                );
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_base_url()).await.unwrap();
                sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut conn).await.unwrap();
                let url = format!("{}?options[search_path]={schema}", postgres_base_url());
                TestDb { backend, url, schema: Some(schema), _dir: None }
            }
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}/ledger.db", dir.path().display());
                TestDb { backend, url, schema: None, _dir: Some(dir) }
            }
        }
    }

    pub fn config(&self) -> Config {
        Config {
            database_url: self.url.clone(),
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            service_tokens: ServiceTokens::new([TOKEN, "second-token"]),
            deduct_workers: None,
            checkout: None,
        }
    }

    pub async fn start(&self) -> RunningServer {
        credits_svc::start(self.config(), CancellationToken::new()).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(schema) = self.schema.take() {
            // A thread of its own: Drop may run inside the test's runtime.
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

pub type Client = CreditServiceClient<InterceptedService<Channel, BearerToken>>;

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

pub async fn client(addr: SocketAddr) -> Client {
    client_with_token(addr, TOKEN).await
}

pub async fn client_with_token(addr: SocketAddr, token: &str) -> Client {
    CreditServiceClient::with_interceptor(channel(addr).await, BearerToken::new(token).unwrap())
}

/// Runs each named `async fn(Backend)` as a test on PostgreSQL and on SQLite.
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
