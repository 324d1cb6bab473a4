//! The quota suite: `CheckQuota` read-only and with consume over real gRPC, against the
//! seed's `tier_usage` design in raw SQL (a window SUM to read; a racy
//! insert-if-under-limit to consume), on the same database in the same run.

use std::time::Duration;

use reeve_proto::quota::v1 as pb;
use reeve_proto::quota::v1::quota_service_client::QuotaServiceClient;
use reeve_runtime::auth::{BearerToken, ServiceTokens};
use tokio_util::sync::CancellationToken;

use crate::{Args, drive, pick};

const TOKEN: &str = "loadgen-token";
const WINDOW_US: i64 = 30 * 24 * 3600 * 1_000_000;
/// Rows of earlier usage seeded per user and feature (the same in both designs).
const SEED_ROWS: i64 = 2;

pub(crate) fn features() -> Vec<String> {
    quota_svc::registry::Registry::default()
        .features()
        .map(str::to_owned)
        .collect()
}

pub(crate) async fn run(args: &Args, url: &str) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let config = quota_svc::Config {
        database_url: url.to_owned(),
        listen_addr: "127.0.0.1:0".parse()?,
        service_tokens: ServiceTokens::new([TOKEN]),
        registry_path: None,
        batch_workers: args.quota_batch_workers,
    };
    let server = quota_svc::start(config, shutdown.clone()).await?;
    // Raw statements on a pool set up as the services' are (no ping before each use).
    let pool = reeve_runtime::db::postgres_pool(url, 64).await?;
    seed(&pool, args.quota_users).await?;
    eprintln!(
        "seeded {} users × 23 features × {SEED_ROWS} usage rows in both designs",
        args.quota_users
    );

    let channels = crate::connect_channels(server.local_addr).await?;
    let token = BearerToken::new(TOKEN)?;
    let client = move |worker: usize| {
        QuotaServiceClient::with_interceptor(
            channels[worker % channels.len()].clone(),
            token.clone(),
        )
    };
    let features = std::sync::Arc::new(features());
    let users = args.quota_users as u64;
    let duration = Duration::from_secs(args.seconds);
    let callers = args.single_callers;
    let target = move |w: usize, s: u64, features: &[String]| target(w, s, users, features);
    let mut results = Vec::new();

    for consume in [0i64, 1] {
        let (c, f) = (client.clone(), features.clone());
        let name = if consume == 0 {
            "CheckQuota read-only"
        } else {
            "CheckQuota consume 1"
        };
        results.push(
            drive(
                format!("{name}, gRPC, {callers} callers"),
                callers,
                duration,
                move |w, s| {
                    let mut client = c(w);
                    let (user_id, feature) = target(w, s, &f);
                    async move {
                        client
                            .check_quota(pb::CheckQuotaRequest {
                                user_id,
                                feature,
                                consume,
                                idempotency_key: if consume > 0 {
                                    format!("c-{w}-{s}")
                                } else {
                                    String::new()
                                },
                            })
                            .await?;
                        Ok(1)
                    }
                },
            )
            .await?,
        );
        results.push(raw_checks(&pool, consume, users, &features, callers, duration).await?);
    }

    println!();
    println!("| scenario | checks/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for figures in &results {
        println!("{}", figures.row());
    }
    println!();
    println!(
        "CheckQuota read-only vs raw window SUM: {:.2}×",
        results[0].per_second() / results[1].per_second()
    );
    println!(
        "CheckQuota consume vs raw insert-if-under-limit: {:.2}×",
        results[2].per_second() / results[3].per_second()
    );
    shutdown.cancel();
    server.wait().await?;
    Ok(())
}

/// The (user, feature) a caller checks: a cheap deterministic spread.
pub(crate) fn target(w: usize, s: u64, users: u64, features: &[String]) -> (String, String) {
    let x = pick(w, s, 7);
    (
        format!("q{:05}", x % users),
        features[(x / users) as usize % features.len()].clone(),
    )
}

/// The seed's `tier_usage` design in raw SQL from `callers` callers: a window SUM to
/// read (`consume` 0), a racy insert-if-under-limit to consume.
pub(crate) async fn raw_checks(
    pool: &sqlx::PgPool,
    consume: i64,
    users: u64,
    features: &std::sync::Arc<Vec<String>>,
    callers: usize,
    duration: Duration,
) -> anyhow::Result<crate::Figures> {
    let (p, f) = (pool.clone(), features.clone());
    let name = if consume == 0 {
        "raw SQL: window SUM read"
    } else {
        "raw SQL: insert-if-under-limit (racy)"
    };
    drive(
        format!("{name}, {callers} callers"),
        callers,
        duration,
        move |w, s| {
            let pool = p.clone();
            let (user_id, feature) = target(w, s, users, &f);
            async move {
                let now = reeve_runtime::clock::now_us();
                if consume == 0 {
                    let _: i64 = sqlx::query_scalar(
                        "SELECT COALESCE(SUM(count), 0)::int8 FROM tier_usage \
                     WHERE user_id = $1 AND feature = $2 AND created_at_us > $3",
                    )
                    .bind(&user_id)
                    .bind(&feature)
                    .bind(now - WINDOW_US)
                    .fetch_one(&pool)
                    .await?;
                } else {
                    sqlx::query(
                        "INSERT INTO tier_usage (user_id, feature, count, created_at_us) \
                     SELECT $1, $2, 1, $3 WHERE (SELECT COALESCE(SUM(count), 0) FROM tier_usage \
                     WHERE user_id = $1 AND feature = $2 AND created_at_us > $4) < $5",
                    )
                    .bind(&user_id)
                    .bind(&feature)
                    .bind(now)
                    .bind(now - WINDOW_US)
                    .bind(1_000_000i64)
                    .execute(&pool)
                    .await?;
                }
                Ok(1)
            }
        },
    )
    .await
}

/// The same earlier usage in quota-svc's tables and in the seed's `tier_usage` design.
pub(crate) async fn seed(pool: &sqlx::PgPool, users: usize) -> anyhow::Result<()> {
    let users = i64::try_from(users)?;
    let features = features();
    let now = reeve_runtime::clock::now_us();
    sqlx::query(
        "CREATE TABLE tier_usage (id BIGSERIAL PRIMARY KEY, user_id TEXT NOT NULL, feature TEXT NOT NULL, \
         count INTEGER NOT NULL DEFAULT 1, created_at_us BIGINT NOT NULL)",
    )
    .execute(pool)
    .await?;
    sqlx::query("CREATE INDEX tier_usage_window ON tier_usage (user_id, feature, created_at_us)")
        .execute(pool)
        .await?;
    let pairs = "FROM generate_series(0, $1 - 1) AS u, UNNEST($2::text[]) AS f(name), generate_series(1, $3) AS r";
    sqlx::query(&format!(
        "INSERT INTO tier_usage (user_id, feature, count, created_at_us) \
         SELECT 'q' || lpad(u::text, 5, '0'), f.name, 1, $4 - r * 1000000 {pairs}"
    ))
    .bind(users)
    .bind(&features)
    .bind(SEED_ROWS)
    .bind(now)
    .execute(pool)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO quota_consumptions (user_id, feature, idempotency_key, units, consumed_at_us) \
         SELECT 'q' || lpad(u::text, 5, '0'), f.name, 'seed-' || r, 1, $4 - r * 1000000 {pairs}"
    ))
    .bind(users)
    .bind(&features)
    .bind(SEED_ROWS)
    .bind(now)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO quota_counters (user_id, feature, used) \
         SELECT 'q' || lpad(u::text, 5, '0'), f.name, $3 FROM generate_series(0, $1 - 1) AS u, UNNEST($2::text[]) AS f(name)",
    )
    .bind(users)
    .bind(&features)
    .bind(SEED_ROWS)
    .execute(pool)
    .await?;
    for table in ["tier_usage", "quota_consumptions", "quota_counters"] {
        sqlx::query(&format!("ANALYZE {table}"))
            .execute(pool)
            .await?;
    }
    Ok(())
}
