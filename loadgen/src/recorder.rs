//! The recorder suite: records per second through `reeve_client::Recorder` from 256
//! tasks, against DeductBatch ×100 sent directly in the same run (the rate a gateway
//! would get by batching by hand), and the recorder again with its write-ahead file,
//! which prices the fsync per group of records.
//!
//! A recorder's figure counts every record accepted during the run *and* the time
//! `close()` then takes to flush them, so a full buffer cannot flatter it. Every
//! outcome must be `applied`; anything else fails the run. It uses a schema of its
//! own, dropped at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reeve_client::{ClientBuilder, Recorder, SecretString};
use reeve_proto::credits::v1 as pb;
use reeve_runtime::auth::ServiceTokens;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use super::{Args, Figures, TOKEN, drive, pick, seed, user};

const TASKS: usize = 256;
const BATCH_ITEMS: usize = 100;

pub(crate) async fn run(args: &Args) -> anyhow::Result<()> {
    let schema = format!("loadgen_recorder_{}", std::process::id());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.database_url)
        .await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await?;
    let url = format!("{}?options[search_path]={schema}", args.database_url);
    let result = measure(args, &url).await;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&admin)
        .await?;
    result
}

async fn measure(args: &Args, url: &str) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let config = credits_svc::Config {
        database_url: url.to_owned(),
        listen_addr: "127.0.0.1:0".parse()?,
        service_tokens: ServiceTokens::new([TOKEN]),
        deduct_workers: None,
        checkout: None,
        lot_sweep_interval: Duration::from_secs(60),
        clock: reeve_runtime::clock::Clock::system(),
    };
    let server = credits_svc::start(config, shutdown.clone()).await?;
    let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
    seed(&pool, args.users).await?;
    eprintln!("recorder suite: seeded {} users", args.users);
    let connection = ClientBuilder::new(server.local_addr.to_string())
        .service_token(SecretString::from(TOKEN))
        .connect()
        .await?;
    let duration = Duration::from_secs(args.seconds);
    let users = args.users;
    let mut results = Vec::new();

    let credits = connection.credits();
    results.push(
        drive(
            format!(
                "DeductBatch ×{BATCH_ITEMS}, gRPC, {} clients",
                args.batch_clients
            ),
            args.batch_clients,
            duration,
            move |w, s| {
                let credits = credits.clone();
                async move {
                    let items = (0..BATCH_ITEMS as u64)
                        .map(|i| pb::DeductRequest {
                            user_id: user(pick(w, s, i), users),
                            amount_micros: 1_000 + (i as i64 % 500),
                            idempotency_key: format!("rb-{w}-{s}-{i}"),
                            description: String::new(),
                        })
                        .collect();
                    credits
                        .deduct_batch(pb::DeductBatchRequest { items })
                        .await?;
                    Ok(BATCH_ITEMS as u64)
                }
            },
        )
        .await?,
    );

    for write_ahead in [false, true] {
        results.push(through_recorder(args, &connection, write_ahead, duration).await?);
    }

    println!("| scenario | deductions/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for figures in &results {
        println!("{}", figures.row());
    }
    let ratio = |a: usize, b: usize| results[a].per_second() / results[b].per_second();
    println!();
    println!(
        "recorder, {TASKS} tasks vs DeductBatch ×{BATCH_ITEMS}: {:.0}%",
        100.0 * ratio(1, 0)
    );
    println!(
        "recorder with write-ahead file vs without: {:.0}%",
        100.0 * ratio(2, 1)
    );
    shutdown.cancel();
    server.wait().await?;
    Ok(())
}

/// 256 tasks recording for `duration`, then `close()`; the rate includes the drain.
async fn through_recorder(
    args: &Args,
    connection: &reeve_client::Connection,
    write_ahead: bool,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let refused = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&refused);
    let wal = std::env::temp_dir().join(format!("loadgen-recorder-{}.wal", std::process::id()));
    let _ = std::fs::remove_file(&wal);
    let mut builder = Recorder::builder(connection.credits())
        .batch_items(BATCH_ITEMS)
        .max_in_flight(args.batch_clients)
        .on_outcome(move |item| {
            if !item.outcome.is_success() {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
    if write_ahead {
        builder = builder.write_ahead_file(&wal);
    }
    let recorder = builder.start()?;
    let users = args.users;
    let prefix = if write_ahead { "rw" } else { "rr" };
    let started = Instant::now();
    let r = recorder.clone();
    let mut figures = drive(
        format!(
            "Recorder (×{BATCH_ITEMS}, {} in flight), {TASKS} tasks{}",
            args.batch_clients,
            if write_ahead {
                ", write-ahead file"
            } else {
                ""
            }
        ),
        TASKS,
        duration,
        move |w, s| {
            let recorder = r.clone();
            async move {
                recorder
                    .record(
                        user(pick(w, s, 0), users),
                        1_000 + (s as i64 % 500),
                        format!("{prefix}-{w}-{s}"),
                    )
                    .await?;
                Ok(1)
            }
        },
    )
    .await?;
    recorder.close().await?;
    figures.elapsed = started.elapsed();
    eprintln!("{} (drain included)", figures.row());
    let _ = std::fs::remove_file(&wal);
    anyhow::ensure!(
        refused.load(Ordering::Relaxed) == 0,
        "some recorded deductions were refused"
    );
    Ok(figures)
}
