//! What the services' integration tests share: a scratch database per test (a new
//! PostgreSQL schema, dropped afterwards, or a SQLite file in a temporary folder), so
//! tests run in parallel, and [`on_both_stores!`] to run one test body on both stores.
//! Test-only: no service depends on this crate. [`proxy::FaultProxy`] cuts the
//! network between a service and its database for fault tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod proxy;

use std::sync::atomic::{AtomicU64, Ordering};

pub use proxy::FaultProxy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// The PostgreSQL database the tests create their schemas in
/// (`REEVE_TEST_DATABASE_URL`, default the local `test` database).
pub fn postgres_base_url() -> String {
    std::env::var("REEVE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A database of its own for one test; the schema (or folder) goes with the value.
pub struct ScratchDb {
    pub backend: Backend,
    /// A `REEVE_DATABASE_URL` for it.
    pub url: String,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl ScratchDb {
    /// `prefix` names the schema or file, so a leftover says which suite made it.
    pub async fn new(backend: Backend, prefix: &str) -> ScratchDb {
        match backend {
            Backend::Postgres => {
                let schema = format!(
                    "{prefix}_test_{}_{}_{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed),
                    rand::random::<u32>()
                );
                let mut conn =
                    <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_base_url())
                        .await
                        .unwrap();
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let url = format!("{}?options[search_path]={schema}", postgres_base_url());
                ScratchDb {
                    backend,
                    url,
                    schema: Some(schema),
                    _dir: None,
                }
            }
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}/{prefix}.db", dir.path().display());
                ScratchDb {
                    backend,
                    url,
                    schema: None,
                    _dir: Some(dir),
                }
            }
        }
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if let Some(schema) = self.schema.take() {
            // A thread of its own: Drop may run inside the test's runtime.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    if let Ok(mut conn) =
                        <sqlx::PgConnection as sqlx::Connection>::connect(&postgres_base_url())
                            .await
                    {
                        let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                            .execute(&mut conn)
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs each named `async fn(Backend)` as a test on PostgreSQL and on SQLite.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await;
                }
            )*
        }
    };
}
