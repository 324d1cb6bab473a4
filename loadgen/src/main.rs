//! Load generator: drives credits-svc over real gRPC on loopback against PostgreSQL
//! and, in the same run on the same database, times the raw-SQL equivalent, so every
//! figure comes with a ratio that does not depend on how fast this machine is today.
//!
//! It creates a schema of its own, seeds it, and drops it at the end. It only ever
//! talks to loopback addresses and stops after the configured duration.
//!
//! `REEVE_LOADGEN_PROFILE=<database url>` adds, below each scenario, the CPU it cost
//! per operation here and in PostgreSQL and its busiest statements ([`profile`]).

/// The services' binaries use mimalloc; the load generator runs them in its process,
/// so it does too (glibc's malloc was 28% of a REST deduction's CPU, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod ceilings;
mod holds;
mod outbox;
mod profile;
mod quota;
mod recorder;
mod scale;
mod soak;
mod stack;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_runtime::auth::{BearerToken, ServiceTokens};
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const TOKEN: &str = "loadgen-token";
/// Every seeded user starts with a million credits, so no deduction runs short.
const SEED_BALANCE_MICROS: i64 = 1_000_000 * 1_000_000;

#[derive(Parser, Debug)]
#[command(about = "Benchmark credits-svc against raw SQL on the same PostgreSQL")]
struct Args {
    /// PostgreSQL database to create the benchmark schema in.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database_url: String,
    /// Users seeded with a balance.
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    /// Seconds each scenario runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients sending batches (gateway replicas flushing).
    #[arg(long, default_value_t = 4)]
    batch_clients: usize,
    /// Concurrent callers of single Deduct (and of CheckQuota).
    #[arg(long, default_value_t = 64)]
    single_callers: usize,
    /// Which suite to run: credits, quota, recorder, all (those three), ceilings,
    /// scale, soak, or rest-deduct (REST deductions only, to profile).
    #[arg(long, default_value = "all")]
    suite: String,
    /// Scale suite: the ledger sizes (existing entries) to measure at, in order.
    #[arg(long, value_delimiter = ',', default_value = "0,10000000,50000000")]
    entries: Vec<u64>,
    /// Scale suite: entries of the one heavy user whose History is paged (taken from
    /// the first levels' entries).
    #[arg(long, default_value_t = 10_000_000)]
    heavy_entries: u64,
    /// Scale suite: usage rows in quota-svc's tables for the quota checks at scale.
    #[arg(long, default_value_t = 10_000_000)]
    usage_rows: u64,
    /// Scale suite: the dedicated database it creates and keeps (never `test`).
    #[arg(long, default_value = "reeve_scale")]
    scale_database: String,
    /// Scale suite: seconds each ledger scenario (DeductBatch ×100, single Deduct) runs
    /// at each level, when not `--seconds`: a whole checkpoint cycle (PostgreSQL's
    /// `checkpoint_timeout`, 300 by default) measures sustained throughput, not only
    /// the seconds right after a checkpoint.
    #[arg(long)]
    ledger_seconds: Option<u64>,
    /// Scale suite: the timed calls' idempotency keys, `random` (as UUIDv4s land in the
    /// index) or `sequential` (time-ordered, as UUIDv7s do: each after all the seed's).
    #[arg(long, default_value = "random", value_parser = ["random", "sequential"])]
    key_order: String,
    /// Soak suite: minutes of mixed load.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Production telemetry (JSON logs at info, spans, the Prometheus recorder) in this
    /// process, as the services' binaries set it up; `false` measures without it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    telemetry: bool,
    /// Users of the quota suite (each with usage rows in all 23 features).
    #[arg(long, default_value_t = 20_000)]
    quota_users: usize,
    /// quota-svc's concurrent group-commit batches (`REEVE_QUOTA_BATCH_WORKERS`).
    #[arg(long, default_value_t = quota_svc::store::DEFAULT_BATCH_WORKERS)]
    quota_batch_workers: usize,
}

/// Sends one DeductBatch and requires every item applied (the timed batch scenarios
/// use fresh keys and enough credits); the number applied.
pub(crate) async fn deduct_all(
    client: &mut stack::CreditsClient,
    items: Vec<pb::DeductRequest>,
) -> anyhow::Result<u64> {
    let sent = items.len();
    let outcomes = client
        .deduct_batch(pb::DeductBatchRequest { items })
        .await?
        .into_inner()
        .outcomes;
    let applied = outcomes
        .iter()
        .filter(|o| matches!(o.result, Some(pb::deduct_outcome::Result::Applied(_))))
        .count();
    anyhow::ensure!(applied == sent, "only {applied} of {sent} applied");
    Ok(applied as u64)
}

#[derive(Debug)]
pub(crate) struct Figures {
    name: String,
    deductions: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

impl Figures {
    pub(crate) fn per_second(&self) -> f64 {
        self.deductions as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn row(&self) -> String {
        format!(
            "| {} | {:.0} | {:.2} | {:.2} |",
            self.name,
            self.per_second(),
            self.latency_us.value_at_quantile(0.50) as f64 / 1_000.0,
            self.latency_us.value_at_quantile(0.99) as f64 / 1_000.0,
        )
    }
}

/// Runs `concurrency` workers for `duration`; each call of `operation(worker, sequence)`
/// returns how many deductions it made, and its latency is recorded.
pub(crate) async fn drive<F, Fut>(
    name: String,
    concurrency: usize,
    duration: Duration,
    operation: F,
) -> anyhow::Result<Figures>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<u64>> + Send,
{
    let profile = profile::Profile::start().await?;
    let started = Instant::now();
    let deadline = started + duration;
    let workers = (0..concurrency).map(|worker| {
        let operation = operation.clone();
        tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut deductions = 0;
            let mut sequence = 0;
            while Instant::now() < deadline {
                let begun = Instant::now();
                deductions += operation(worker, sequence).await?;
                // A call beyond the histogram's 60 s is recorded as 60 s, not a failed run
                // (the scale suite's History at 50M entries had calls longer than that).
                histogram.saturating_record(
                    u64::try_from(begun.elapsed().as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
                sequence += 1;
            }
            anyhow::Ok((deductions, histogram))
        })
    });
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut deductions = 0;
    for worker in futures::future::join_all(workers).await {
        let (count, histogram) = worker??;
        deductions += count;
        latency_us.add(histogram)?;
    }
    let figures = Figures {
        name,
        deductions,
        elapsed: started.elapsed(),
        latency_us,
    };
    eprintln!("{}", figures.row());
    if let Some(profile) = profile {
        profile.finish(figures.deductions).await?;
    }
    Ok(figures)
}

fn user(index: u64, users: usize) -> String {
    format!("u{:06}", index % users as u64)
}

/// A user of the population seeded with five live lots each.
fn user_with_five_lots(index: u64, users: usize) -> String {
    format!("w{:06}", index % users as u64)
}

/// The HTTP/2 connections the callers share (one is a bottleneck of its own).
pub(crate) async fn connect_channels(addr: std::net::SocketAddr) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await?,
        );
    }
    Ok(channels)
}

/// One `DeductBatch`'s items: `count` deductions of 1,000–1,499 micros, for the users
/// `population` makes of the worker's spread, keyed by `key` (of the item's position).
pub(crate) fn batch_items(
    worker: usize,
    sequence: u64,
    count: u64,
    population: impl Fn(u64) -> String,
    key: impl Fn(u64) -> String,
) -> Vec<pb::DeductRequest> {
    (0..count)
        .map(|i| pb::DeductRequest {
            user_id: population(pick(worker, sequence, i)),
            amount_micros: 1_000 + (i as i64 % 500),
            idempotency_key: key(i),
            description: String::new(),
        })
        .collect()
}

/// A single `Deduct` of 1,000 micros.
pub(crate) fn single_deduction(user_id: String, idempotency_key: String) -> pb::DeductRequest {
    pb::DeductRequest {
        user_id,
        amount_micros: 1_000,
        idempotency_key,
        description: String::new(),
    }
}

/// A cheap deterministic spread of users (no RNG state shared between workers).
pub(crate) fn pick(worker: usize, sequence: u64, item: u64) -> u64 {
    let mut x = (worker as u64) << 40 ^ sequence << 16 ^ item;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

const RAW_DEDUCT_BATCH: &str = "\
WITH items AS ( \
    SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[]) WITH ORDINALITY AS t(user_id, amount_micros, idempotency_key, position) \
), locked AS ( \
    SELECT user_id FROM raw_accounts WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE \
), new_entries AS ( \
    INSERT INTO raw_ledger (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us) \
    SELECT user_id, 'deduction', -amount_micros, 0, idempotency_key, '', $4 FROM items ORDER BY position \
    ON CONFLICT (idempotency_key, key_source) DO NOTHING \
    RETURNING user_id, amount_micros \
) \
UPDATE raw_accounts AS a SET balance_micros = a.balance_micros + d.delta_micros, updated_at_us = $4 \
FROM (SELECT user_id, SUM(amount_micros)::int8 AS delta_micros FROM new_entries GROUP BY user_id) AS d \
WHERE a.user_id = d.user_id AND a.user_id IN (SELECT user_id FROM locked)";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.telemetry {
        reeve_runtime::telemetry::init_with(
            "reeve-loadgen",
            reeve_runtime::telemetry::LogFormat::Json,
        )?;
    }
    if args.suite == "scale" {
        return scale::run(&args).await;
    }
    let schema = format!("loadgen_{}", std::process::id());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.database_url)
        .await
        .context("connect to PostgreSQL")?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await?;
    let url = format!("{}?options[search_path]={schema}", args.database_url);
    let result = async {
        if matches!(args.suite.as_str(), "credits" | "all") {
            run(&args, &url).await?;
        }
        if matches!(args.suite.as_str(), "quota" | "all") {
            quota::run(&args, &url).await?;
        }
        if matches!(args.suite.as_str(), "recorder" | "all") {
            recorder::run(&args).await?;
        }
        if args.suite == "ceilings" {
            ceilings::run(&args, &url).await?;
        }
        if args.suite == "rest-deduct" {
            ceilings::run_rest_deduct(&args, &url).await?;
        }
        if args.suite == "soak" {
            soak::run(&args, &url).await?;
        }
        anyhow::Ok(())
    }
    .await;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&admin)
        .await?;
    result
}

async fn run(args: &Args, url: &str) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let config = credits_svc::Config {
        database_url: url.to_owned(),
        listen_addr: "127.0.0.1:0".parse()?,
        service_tokens: ServiceTokens::new([TOKEN]),
        deduct_workers: None,
        lot_sweep_interval: std::time::Duration::from_secs(60),
        clock: reeve_runtime::clock::Clock::system(),
        checkout: None,
    };
    let server = credits_svc::start(config, shutdown.clone()).await?;
    // The raw statements run on a pool set up as the services' are (no ping before
    // each use): the comparison is of the work, not of the pool.
    let pool = reeve_runtime::db::postgres_pool(url, 64).await?;
    seed(&pool, args.users).await?;
    eprintln!(
        "seeded {} users in the service's and the raw tables",
        args.users
    );

    let channels = connect_channels(server.local_addr).await?;
    let token = BearerToken::new(TOKEN)?;
    let client = move |worker: usize| {
        CreditServiceClient::with_interceptor(
            channels[worker % channels.len()].clone(),
            token.clone(),
        )
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20)
    };
    let client = Arc::new(client);
    let duration = Duration::from_secs(args.seconds);
    let users = args.users;
    let mut results = Vec::new();

    // DeductBatch over the users holding one lot each, or five.
    let batches = |batch_size: u64, five_lots: bool| {
        let c = client.clone();
        let (label, prefix, population): (&str, &str, fn(u64, usize) -> String) = if five_lots {
            ("5 lots per user", "b5", user_with_five_lots)
        } else {
            ("1 lot per user", "b", user)
        };
        drive(
            format!(
                "DeductBatch ×{batch_size}, gRPC, {} clients, {label}",
                args.batch_clients
            ),
            args.batch_clients,
            duration,
            move |w, s| {
                let mut client = c(w);
                async move {
                    // With five lots, more than one lot's 1/5 share is never reached; a
                    // deduction draws one or two lots as they run down.
                    let items = batch_items(
                        w,
                        s,
                        batch_size,
                        |spread| population(spread, users),
                        |i| format!("{prefix}{batch_size}-{w}-{s}-{i}"),
                    );
                    deduct_all(&mut client, items).await
                }
            },
        )
    };

    for batch_size in [100u64, 1_000] {
        results.push(batches(batch_size, false).await?);
        let p = pool.clone();
        results.push(
            drive(
                format!(
                    "raw SQL: one UNNEST statement ×{batch_size}, {} clients",
                    args.batch_clients
                ),
                args.batch_clients,
                duration,
                move |w, s| {
                    let pool = p.clone();
                    async move {
                        let users_: Vec<String> = (0..batch_size)
                            .map(|i| user(pick(w, s, i), users))
                            .collect();
                        let amounts: Vec<i64> =
                            (0..batch_size).map(|i| 1_000 + (i as i64 % 500)).collect();
                        let keys: Vec<String> = (0..batch_size)
                            .map(|i| format!("rb{batch_size}-{w}-{s}-{i}"))
                            .collect();
                        sqlx::query(RAW_DEDUCT_BATCH)
                            .bind(&users_)
                            .bind(&amounts)
                            .bind(&keys)
                            .bind(credits_svc::system_clock_us())
                            .execute(&pool)
                            .await?;
                        Ok(batch_size)
                    }
                },
            )
            .await?,
        );
    }

    for batch_size in [100u64, 1_000] {
        results.push(batches(batch_size, true).await?);
    }

    let c = client.clone();
    results.push(
        drive(
            format!("Deduct (single), gRPC, {} callers", args.single_callers),
            args.single_callers,
            duration,
            move |w, s| {
                let mut client = c(w);
                async move {
                    client
                        .deduct(single_deduction(
                            user(pick(w, s, 0), users),
                            format!("s-{w}-{s}"),
                        ))
                        .await?;
                    Ok(1)
                }
            },
        )
        .await?,
    );
    results.push(raw_single_deductions(&pool, users, args.single_callers, duration).await?);

    // Holds last: the deduction scenarios above run on users without holds.
    let deduct_batch_per_second = results[0].per_second();
    results.extend(holds::run(args, client.clone(), &pool, deduct_batch_per_second).await?);
    // The outbox's cost last: it sets low-balance alerts on every user.
    results.extend(outbox::run(args, client.clone(), &pool, url).await?);

    println!("| scenario | deductions (holds: calls, settles)/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for figures in &results {
        println!("{}", figures.row());
    }
    let ratio = |a: usize, b: usize| results[a].per_second() / results[b].per_second();
    println!();
    println!(
        "DeductBatch ×100 vs raw UNNEST: {:.0}%",
        100.0 * ratio(0, 1)
    );
    println!(
        "DeductBatch ×1000 vs raw UNNEST: {:.0}%",
        100.0 * ratio(2, 3)
    );
    println!(
        "DeductBatch ×100 with 5 lots per user vs raw UNNEST: {:.0}%",
        100.0 * ratio(4, 1)
    );
    println!(
        "DeductBatch ×1000 with 5 lots per user vs raw UNNEST: {:.0}%",
        100.0 * ratio(5, 3)
    );
    println!(
        "single Deduct (group commit) vs one transaction per deduction: {:.2}×",
        ratio(6, 7)
    );
    let pair_p99_ms = results[8].latency_us.value_at_quantile(0.99) as f64 / 1_000.0;
    println!(
        "Hold + SettleHold per call vs single Deduct: {:.0}% (target ≥ 50%), p99 {pair_p99_ms:.2} ms (target < 20 ms)",
        100.0 * ratio(8, 6)
    );
    println!(
        "SettleHoldBatch ×100 vs DeductBatch ×100: {:.0}% (target ≥ 70%)",
        100.0 * ratio(9, 0)
    );
    println!(
        "DeductBatch ×100 with the outbox busy (an endpoint, an event per user) vs quiet: {:.0}% (target ≥ 90%)",
        100.0 * ratio(11, 10)
    );

    shutdown.cancel();
    server.wait().await?;
    Ok(())
}

/// Seeds `users` balances (each with its grant entry, so balance = sum of entries) in
/// the service's tables, and the same in raw tables of the same shape.
async fn seed(pool: &sqlx::PgPool, users: usize) -> anyhow::Result<()> {
    let users = i64::try_from(users)?;
    for (accounts, ledger) in [
        ("credit_accounts", "credit_ledger"),
        ("raw_accounts", "raw_ledger"),
    ] {
        if accounts == "raw_accounts" {
            sqlx::query("CREATE TABLE raw_accounts (LIKE credit_accounts INCLUDING ALL)")
                .execute(pool)
                .await?;
            sqlx::query("CREATE TABLE raw_ledger (LIKE credit_ledger INCLUDING ALL)")
                .execute(pool)
                .await?;
        }
        sqlx::query(&format!(
            "INSERT INTO {accounts} (user_id, balance_micros, updated_at_us) \
             SELECT 'u' || lpad(g::text, 6, '0'), $2, 0 FROM generate_series(0, $1 - 1) AS g"
        ))
        .bind(users)
        .bind(SEED_BALANCE_MICROS)
        .execute(pool)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO {ledger} (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us) \
             SELECT 'u' || lpad(g::text, 6, '0'), 'grant', $2, $2, 'seed-' || g, 'loadgen seed', 0 FROM generate_series(0, $1 - 1) AS g"
        ))
        .bind(users)
        .bind(SEED_BALANCE_MICROS)
        .execute(pool)
        .await?;
        if accounts == "credit_accounts" {
            // One paid lot per `u` user; a second population `w` with five live lots
            // each (mixed categories, priorities and far expiries), same balance.
            sqlx::query(
                "INSERT INTO credit_lots (user_id, category, priority, expires_at_us, source, \
                 original_micros, remaining_micros, entry_id, created_at_us) \
                 SELECT 'u' || lpad(g::text, 6, '0'), 'paid', 50, NULL, 'seed-' || g, $2, $2, NULL, 0 \
                 FROM generate_series(0, $1 - 1) AS g",
            )
            .bind(users)
            .bind(SEED_BALANCE_MICROS)
            .execute(pool)
            .await?;
            sqlx::query(
                "INSERT INTO credit_accounts (user_id, balance_micros, updated_at_us) \
                 SELECT 'w' || lpad(g::text, 6, '0'), $2, 0 FROM generate_series(0, $1 - 1) AS g",
            )
            .bind(users)
            .bind(SEED_BALANCE_MICROS)
            .execute(pool)
            .await?;
            // Their grant entry, so balance = sum of entries holds for them too.
            sqlx::query(
                "INSERT INTO credit_ledger (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us) \
                 SELECT 'w' || lpad(g::text, 6, '0'), 'grant', $2, $2, 'seed-w' || g, 'loadgen seed', 0 FROM generate_series(0, $1 - 1) AS g",
            )
            .bind(users)
            .bind(SEED_BALANCE_MICROS)
            .execute(pool)
            .await?;
            sqlx::query(
                "INSERT INTO credit_lots (user_id, category, priority, expires_at_us, source, \
                 original_micros, remaining_micros, entry_id, created_at_us) \
                 SELECT 'w' || lpad(g::text, 6, '0'), \
                        CASE WHEN l % 2 = 0 THEN 'promotional' ELSE 'paid' END, \
                        10 * l, CASE WHEN l < 3 THEN 4000000000000000 + l END, \
                        'seed-w' || g || '-' || l, $2 / 5, $2 / 5, NULL, 0 \
                 FROM generate_series(0, $1 - 1) AS g, generate_series(0, 4) AS l",
            )
            .bind(users)
            .bind(SEED_BALANCE_MICROS)
            .execute(pool)
            .await?;
            sqlx::query("ANALYZE credit_lots").execute(pool).await?;
        }
        sqlx::query(&format!("ANALYZE {accounts}"))
            .execute(pool)
            .await?;
        sqlx::query(&format!("ANALYZE {ledger}"))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// `BEGIN; UPDATE … WHERE balance >= amount RETURNING; INSERT entry; COMMIT` from
/// `callers` connections, on the raw tables of [`seed`].
pub(crate) async fn raw_single_deductions(
    pool: &sqlx::PgPool,
    users: usize,
    callers: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let p = pool.clone();
    drive(format!("raw SQL: one transaction per deduction, {callers} callers"), callers, duration, move |w, s| {
            let pool = p.clone();
            async move {
                let mut tx = pool.begin().await?;
                let user_id = user(pick(w, s, 0), users);
                let now = credits_svc::system_clock_us();
                let balance: Option<i64> = sqlx::query_scalar(
                    "UPDATE raw_accounts SET balance_micros = balance_micros - $2, updated_at_us = $3 \
                     WHERE user_id = $1 AND balance_micros >= $2 RETURNING balance_micros",
                )
                .bind(&user_id)
                .bind(1_000i64)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                let balance = balance.context("raw deduction found no balance")?;
                sqlx::query(
                    "INSERT INTO raw_ledger (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us) \
                     VALUES ($1, 'deduction', -1000, $2, $3, '', $4)",
                )
                .bind(&user_id)
                .bind(balance)
                .bind(format!("rs-{w}-{s}"))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(1)
            }
    })
    .await
}
