//! A process that records deductions through a [`Recorder`], for the crash and
//! SIGTERM tests (and for trying the write-ahead file by hand). Settings come from the
//! environment:
//!
//! - `PROBE_ADDR`, `PROBE_TOKEN`: credits-svc and the service token;
//! - `PROBE_MODE`: `record` (record `PROBE_ITEMS` deductions over `PROBE_USERS` users,
//!   keys `PROBE_PREFIX-<i>`, from 64 tasks, then close) or `replay` (open the
//!   write-ahead file, replay it, close);
//! - `PROBE_KIND`: `deduct` (default) or `settle`: each item is then a `Hold` of
//!   `PROBE_HOLD_MICROS` (default 5,000) with hold id `PROBE_PREFIX-<i>`, sent directly,
//!   followed by its settle recorded through the recorder (SettleHoldBatch);
//! - `PROBE_WAL`: the write-ahead file (optional);
//! - `PROBE_BATCH_ITEMS`, `PROBE_BATCH_DELAY_MS`, `PROBE_IN_FLIGHT`: the recorder's N, T, K.
//!
//! It prints `accepted <key>` once `record` has returned for a key, and `closed` once
//! `close()` has drained everything. SIGTERM stops recording and closes (draining).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reeve_client::{ClientBuilder, Recorder, SecretString};
use reeve_proto::credits::v1 as pb;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is required"))
}

fn number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(text) => text.parse().map_err(|_| format!("{name} must be a number")),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connection = ClientBuilder::new(var("PROBE_ADDR")?)
        .service_token(SecretString::from(var("PROBE_TOKEN")?))
        .connect_lazy()?;
    let mut builder = Recorder::builder(connection.credits())
        .batch_items(usize::try_from(number("PROBE_BATCH_ITEMS", 100)?)?)
        .batch_delay(Duration::from_millis(number("PROBE_BATCH_DELAY_MS", 10)?))
        .max_in_flight(usize::try_from(number("PROBE_IN_FLIGHT", 2)?)?);
    if let Ok(path) = std::env::var("PROBE_WAL") {
        builder = builder.write_ahead_file(path);
    }
    let recorder = builder.start()?;
    let mut terminate = signal(SignalKind::terminate())?;
    if var("PROBE_MODE")? == "replay" {
        recorder.close().await?;
        println!("closed");
        return Ok(());
    }
    let items = number("PROBE_ITEMS", 1_000)?;
    let users = number("PROBE_USERS", 10)?.max(1);
    let prefix = var("PROBE_PREFIX")?;
    let settle = std::env::var("PROBE_KIND").is_ok_and(|kind| kind == "settle");
    let hold_micros = i64::try_from(number("PROBE_HOLD_MICROS", 5_000)?)?;
    let credits = connection.credits();
    let stop = CancellationToken::new();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (recorder, stop, next, prefix, credits) = (
            recorder.clone(),
            stop.clone(),
            Arc::clone(&next),
            prefix.clone(),
            credits.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items || stop.is_cancelled() {
                    return Ok::<(), Box<dyn std::error::Error + Send + Sync>>(());
                }
                let key = format!("{prefix}-{i}");
                let amount = 1_000 + i64::try_from(i % 997).unwrap_or(0);
                let user_id = format!("user-{}", i % users);
                if settle {
                    credits
                        .hold(pb::HoldRequest {
                            user_id: user_id.clone(),
                            hold_id: key.clone(),
                            amount_micros: hold_micros,
                            ttl_seconds: 3_600,
                            description: String::new(),
                        })
                        .await?;
                    recorder.settle(key.clone(), user_id, amount).await?;
                } else {
                    recorder.record(user_id, amount, key.clone()).await?;
                }
                println!("accepted {key}");
            }
        }));
    }
    let all = futures_join(tasks);
    tokio::select! {
        result = all => result?,
        _ = terminate.recv() => {
            stop.cancel();
            eprintln!("SIGTERM: closing");
        }
    }
    recorder.close().await?;
    println!("closed");
    Ok(())
}

async fn futures_join(
    tasks: Vec<tokio::task::JoinHandle<Result<(), Box<dyn std::error::Error + Send + Sync>>>>,
) -> Result<(), Box<dyn std::error::Error>> {
    for task in tasks {
        task.await?.map_err(|e| e.to_string())?;
    }
    Ok(())
}
