//! Test harness: credits-svc (and quota-svc) started in-process on port 0 over a
//! scratch PostgreSQL schema, a connection built by the crate's own builder, and the
//! ledger audit the tests end with.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use credits_svc::RunningServer;
use reeve_client::{ClientBuilder, Connection, SecretString};
use reeve_proto::credits::v1 as pb;
use reeve_runtime::auth::ServiceTokens;
use reeve_testkit::{Backend, ScratchDb};
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "client-test-token";
pub const CREDIT: i64 = 1_000_000;

pub struct Credits {
    pub db: ScratchDb,
    pub addr: SocketAddr,
    pub server: Option<RunningServer>,
}

fn config(url: &str, addr: SocketAddr) -> credits_svc::Config {
    credits_svc::Config {
        database_url: url.to_owned(),
        listen_addr: addr,
        service_tokens: ServiceTokens::new([TOKEN]),
        deduct_workers: None,
        checkout: None,
        lot_sweep_interval: std::time::Duration::from_secs(60),
        clock: reeve_runtime::clock::Clock::system(),
    }
}

impl Credits {
    pub async fn start() -> Credits {
        let db = ScratchDb::new(Backend::Postgres, "client").await;
        let server = credits_svc::start(
            config(&db.url, "127.0.0.1:0".parse().unwrap()),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        Credits {
            addr: server.local_addr,
            db,
            server: Some(server),
        }
    }

    /// Stops the server (its CancellationToken), in-flight calls finishing first.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.unwrap();
        }
    }

    /// A new server on the same address and database.
    pub async fn restart(&mut self) {
        let server = credits_svc::start(config(&self.db.url, self.addr), CancellationToken::new())
            .await
            .unwrap();
        self.server = Some(server);
    }

    pub fn connection(&self) -> Connection {
        ClientBuilder::new(self.addr.to_string())
            .service_token(SecretString::from(TOKEN))
            .connect_lazy()
            .unwrap()
    }

    pub async fn grant(&self, user_id: &str, amount_micros: i64) {
        self.connection()
            .credits()
            .add_credits(pb::AddCreditsRequest {
                user_id: user_id.to_owned(),
                amount_micros,
                idempotency_key: format!("grant-{user_id}"),
                kind: pb::CreditKind::Grant as i32,
                description: "test grant".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// (entries, balance) of `user_id`, after checking that the cached balance equals
    /// the sum of the ledger's entries.
    pub async fn audit(&self, user_id: &str) -> (i64, i64) {
        let store = credits_svc::store::open(&self.db.url).await.unwrap();
        let audit = store.audit(user_id).await.unwrap();
        assert_eq!(
            audit.cached, audit.entries_sum,
            "{user_id}: cached balance != sum of entries"
        );
        (audit.entries, audit.entries_sum.0)
    }

    /// Every deduction key of the ledger (all users), with how often it appears.
    pub async fn deduction_keys(&self) -> std::collections::HashMap<String, i64> {
        let pool = sqlx::PgPool::connect(&self.db.url).await.unwrap();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT idempotency_key, COUNT(*) FROM credit_ledger WHERE kind = 'deduction' GROUP BY idempotency_key",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        rows.into_iter().collect()
    }
}

impl Credits {
    /// Every settle entry of the ledger: hold id → (how many entries, micros charged).
    pub async fn settle_entries(&self) -> std::collections::HashMap<String, (i64, i64)> {
        let pool = sqlx::PgPool::connect(&self.db.url).await.unwrap();
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT idempotency_key, COUNT(*), (-SUM(amount_micros))::int8 FROM credit_ledger \
             WHERE kind = 'deduction' AND idempotency_key LIKE 'settle:%' GROUP BY idempotency_key",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(key, count, micros)| {
                (
                    key.strip_prefix("settle:").unwrap().to_owned(),
                    (count, micros),
                )
            })
            .collect()
    }

    /// The hold as credits-svc answers it now.
    pub async fn hold(&self, hold_id: &str) -> pb::Hold {
        self.connection()
            .credits()
            .get_hold(pb::GetHoldRequest {
                hold_id: hold_id.to_owned(),
            })
            .await
            .unwrap()
            .hold
            .unwrap()
    }

    /// (balance, held, available) of `user_id`.
    pub async fn balance(&self, user_id: &str) -> (i64, i64, i64) {
        let answer = self
            .connection()
            .credits()
            .get_balance(pb::GetBalanceRequest {
                user_id: user_id.to_owned(),
            })
            .await
            .unwrap();
        (
            answer.balance_micros,
            answer.held_micros,
            answer.available_micros,
        )
    }
}
