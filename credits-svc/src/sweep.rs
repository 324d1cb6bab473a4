//! The lot sweeper: writes the `expiration` entries of lots whose instant has come and
//! that nobody touched since. Expiry does not wait for it (every read and write treats
//! an expired lot as gone); it only makes the ledger say so. Safe on every replica at
//! once: each user is swept under its balance lock, and `expire:<lot id>` is written
//! once whoever gets there first.

use std::sync::Arc;
use std::time::Duration;

use reeve_runtime::clock::Clock;
use tokio_util::sync::CancellationToken;

use crate::store::LedgerStore;

/// Users swept per transaction.
const USERS_PER_ROUND: u32 = 500;

pub fn spawn(
    store: Arc<dyn LedgerStore>,
    clock: Clock,
    every: Duration,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            // Rounds until nothing is due (a backlog after downtime drains at once).
            loop {
                match store.expire_due(clock.now_us(), USERS_PER_ROUND).await {
                    Ok(swept) if swept == USERS_PER_ROUND as usize => continue,
                    Ok(swept) => {
                        if swept > 0 {
                            tracing::info!(users = swept, "expired lots swept");
                        }
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "lot sweep failed; next tick retries");
                        break;
                    }
                }
            }
        }
    });
}

/// Lots warned of per transaction.
const WARNINGS_PER_ROUND: u32 = 500;

/// The `lot.expiring` sweeper: every `every`, warns once of each lot whose expiry is
/// within `ahead` (through the outbox; safe on every replica: a lot is warned of once
/// whoever gets there first).
pub fn spawn_expiring_warnings(
    store: Arc<dyn LedgerStore>,
    clock: Clock,
    every: Duration,
    ahead: Duration,
    shutdown: CancellationToken,
) {
    let ahead_us = i64::try_from(ahead.as_micros()).unwrap_or(i64::MAX);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            loop {
                match store
                    .warn_expiring(clock.now_us(), ahead_us, WARNINGS_PER_ROUND)
                    .await
                {
                    Ok(warned) if warned == WARNINGS_PER_ROUND as usize => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "lot.expiring sweep failed; next tick retries");
                        break;
                    }
                }
            }
        }
    });
}
