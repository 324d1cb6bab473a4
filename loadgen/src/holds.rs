//! The holds scenarios of the credits suite, run after the deduction scenarios on the
//! same server and database, so their ratios to single Deduct and to DeductBatch ×100
//! come from the same run:
//!
//! - **Hold + SettleHold per LLM call**: each caller makes one call after the other,
//!   a call being one `Hold` (5,000 micros) then one `SettleHold` of the real cost; the
//!   rate counts calls and the latency is the pair's. An untimed 2 s warm-up of the
//!   same calls and an ANALYZE come first (the tables' first plans are made for no
//!   rows).
//! - **SettleHoldBatch ×100**: the holds are created beforehand and excluded from the
//!   timing (inserted by SQL, as the seed inserts lots: one reservation on the user's
//!   lot each, spread over the `u` users), sized from the DeductBatch ×100 rate of the
//!   same run so the clients never run out; the rate counts settled holds.
//!
//! Every hold must be granted and every settle applied (not duplicate, no shortfall);
//! anything else fails the run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_runtime::auth::BearerToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{Args, Figures, drive, pick, user};

type Client = CreditServiceClient<InterceptedService<Channel, BearerToken>>;

/// What each hold reserves; every settle is below it.
const HOLD_MICROS: i64 = 5_000;
const BATCH_ITEMS: u64 = 100;

/// Runs both scenarios; `deduct_batch_per_second` (DeductBatch ×100 of this run) sizes
/// the holds created for the batch scenario.
pub(crate) async fn run(
    args: &Args,
    client: Arc<impl Fn(usize) -> Client + Send + Sync + 'static>,
    pool: &sqlx::PgPool,
    deduct_batch_per_second: f64,
) -> anyhow::Result<Vec<Figures>> {
    let duration = Duration::from_secs(args.seconds);
    let users = args.users;
    let mut results = Vec::new();

    // The holds tables start empty and never analyzed, so the first plans of their
    // statements are made for a table of no rows (sequential scans that grow with every
    // hold): a database past its first minute has statistics. An untimed warm-up of the
    // same calls gives the tables a history, then ANALYZE does what autovacuum would.
    let pair = |tag: &'static str| {
        let c = Arc::clone(&client);
        move |w: usize, s: u64| {
            let mut client = c(w);
            async move {
                let hold_id = format!("{tag}-{w}-{s}");
                client
                    .hold(pb::HoldRequest {
                        user_id: user(pick(w, s, 0), users),
                        hold_id: hold_id.clone(),
                        amount_micros: HOLD_MICROS,
                        ttl_seconds: 600,
                        description: String::new(),
                    })
                    .await?;
                let settled = client
                    .settle_hold(pb::SettleHoldRequest {
                        hold_id,
                        amount_micros: 1_000 + (s as i64 % 500),
                        description: String::new(),
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    !settled.duplicate && settled.shortfall_micros == 0,
                    "a settle was not applied as asked"
                );
                Ok(1)
            }
        }
    };
    drive(
        "warm-up (untimed): Hold + SettleHold".to_owned(),
        args.single_callers,
        Duration::from_secs(2),
        pair("hw"),
    )
    .await?;
    sqlx::query("ANALYZE credit_holds").execute(pool).await?;
    results.push(
        drive(
            format!(
                "Hold + SettleHold per LLM call, gRPC, {} callers",
                args.single_callers
            ),
            args.single_callers,
            duration,
            pair("hs"),
        )
        .await?,
    );

    // Enough for the whole run at 1.5× the DeductBatch ×100 rate, plus a batch per client.
    let holds = ((deduct_batch_per_second * args.seconds as f64 * 1.5) as u64)
        .max(100_000)
        .div_ceil(BATCH_ITEMS)
        * BATCH_ITEMS
        + BATCH_ITEMS * args.batch_clients as u64;
    let started = Instant::now();
    seed_holds(pool, holds, users).await?;
    eprintln!(
        "created {holds} holds for SettleHoldBatch in {:.1} s (not timed; ~{:.1} per user)",
        started.elapsed().as_secs_f64(),
        holds as f64 / users as f64
    );
    let next = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&client);
    results.push(
        drive(
            format!(
                "SettleHoldBatch ×{BATCH_ITEMS}, gRPC, {} clients, holds made beforehand",
                args.batch_clients
            ),
            args.batch_clients,
            duration,
            move |w, _| {
                let mut client = c(w);
                let first = next.fetch_add(BATCH_ITEMS, Ordering::Relaxed);
                async move {
                    anyhow::ensure!(
                        first + BATCH_ITEMS <= holds,
                        "ran out of the {holds} holds made beforehand"
                    );
                    let items = (first..first + BATCH_ITEMS)
                        .map(|n| pb::SettleHoldRequest {
                            hold_id: format!("sb-{n}"),
                            amount_micros: 1_000 + (n as i64 % 500),
                            description: String::new(),
                        })
                        .collect();
                    let outcomes = client
                        .settle_hold_batch(pb::SettleHoldBatchRequest { items })
                        .await?
                        .into_inner()
                        .outcomes;
                    let settled = outcomes
                        .iter()
                        .filter(|o| {
                            matches!(
                                &o.result,
                                Some(pb::settle_hold_outcome::Result::Settled(s)) if !s.duplicate
                            )
                        })
                        .count();
                    anyhow::ensure!(
                        settled as u64 == BATCH_ITEMS,
                        "only {settled} of {BATCH_ITEMS} settled"
                    );
                    Ok(BATCH_ITEMS)
                }
            },
        )
        .await?,
    );
    Ok(results)
}

/// Creates `holds` active holds `sb-<n>` of [`HOLD_MICROS`] on the `u` users (a
/// permutation spreads consecutive holds over distinct users), each reserving from the
/// user's one lot, with the lots' `held_micros` moved to match, as `Hold` would leave
/// them.
async fn seed_holds(pool: &sqlx::PgPool, holds: u64, users: usize) -> anyhow::Result<()> {
    let now_us = credits_svc::system_clock_us();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO credit_holds (hold_id, user_id, amount_micros, status, description, created_at_us, \
             expires_at_us, reserved_lot_ids, reserved_micros) \
         SELECT 'sb-' || g, l.user_id, $3, 'held', '', $4, $4 + 86400000000, ARRAY[l.id], ARRAY[$3::int8] \
         FROM generate_series(0::int8, $1 - 1) AS g \
         JOIN credit_lots AS l ON l.user_id = 'u' || lpad(((g * 7919) % $2)::text, 6, '0')",
    )
    .bind(i64::try_from(holds)?)
    .bind(i64::try_from(users)?)
    .bind(HOLD_MICROS)
    .bind(now_us)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE credit_lots AS l SET held_micros = l.held_micros + r.held \
         FROM (SELECT reserved_lot_ids[1] AS lot_id, SUM(amount_micros)::int8 AS held FROM credit_holds \
               WHERE hold_id LIKE 'sb-%' GROUP BY 1) AS r \
         WHERE l.id = r.lot_id",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    for table in ["credit_holds", "credit_lots"] {
        sqlx::query(&format!("ANALYZE {table}"))
            .execute(pool)
            .await?;
    }
    Ok(())
}
