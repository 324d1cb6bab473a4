//! The scale suite (issue 14): what a call costs as the tables grow. In a database of
//! its own (`--scale-database`, created fresh and dropped at the end, never `test`):
//!
//! - **quota**: `CheckQuota` read-only and with consume on the usual seed, then again
//!   with `--usage-rows` rows in `quota_consumptions` (in the window, spread over the
//!   same users and features, counters moved to match);
//! - **ledger**: `DeductBatch` ×100 and single `Deduct` with the ledger at each of
//!   `--entries` existing entries, for `--ledger-seconds` each (by default
//!   `--seconds`). The entries are seeded by SQL straight into
//!   credits-svc's tables, consistent with the rest: each is a deduction drawn from the
//!   user's lot, with its `balance_after` in id order, the cached balance and the lot
//!   moved by the same amount. The first `--heavy-entries` belong to one heavy user
//!   (`h000000`), the rest are spread over the `u` users. Keys are random (hex of a
//!   hash), in the seed and in the timed calls, as a gateway's UUIDs would be: the
//!   idempotency index is touched at random places, not at its right edge;
//! - **History** of the heavy user, once it holds its entries: the first page and a
//!   page near the oldest entry (and one in the middle), with the plan PostgreSQL uses
//!   for each.
//!
//! Seeding is timed and printed; `VACUUM ANALYZE` follows each level (what autovacuum
//! would do, done before the timing rather than during it), then a `CHECKPOINT`. The
//! PostgreSQL settings that decide the cost of a large ledger are printed first, and
//! what PostgreSQL read and wrote (pages read into the buffers, WAL, full-page images,
//! pages evicted by backends) per deduction after the ledger figures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use reeve_proto::credits::v1 as pb;
use reeve_proto::quota::v1 as qpb;
use reeve_runtime::auth::ServiceTokens;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use crate::stack::{CreditsClient, QuotaClient};
use crate::{Args, Figures, TOKEN, drive, pick, user};

const HEAVY: &str = "h000000";
/// Enough for any number of seeded and timed deductions of 1,000 micros.
const HEAVY_BALANCE_MICROS: i64 = 1_000_000_000_000_000;
const SEED_CHUNK_ROWS: u64 = 2_500_000;

/// A random-looking idempotency key (what a UUIDv4 looks like to the index): a hash
/// first, so keys land all over the index, then what makes it unique.
fn random_key(w: usize, s: u64, i: u64, salt: u64) -> String {
    format!(
        "{:016x}-{w}-{s}-{i}-{salt}",
        pick(w, s, i) ^ salt.rotate_left(17)
    )
}

/// The timed calls' keys: random, or (`--key-order sequential`) time-ordered like a
/// UUIDv7, after every seeded key ('z' sorts after hex digits), so each lands at the
/// index's right edge.
fn call_key(sequential: bool, w: usize, s: u64, i: u64, salt: u64) -> String {
    if sequential {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_micros());
        format!("z{micros:020}-{w}-{s}-{i}-{salt}")
    } else {
        random_key(w, s, i, salt)
    }
}

pub(crate) async fn run(args: &Args) -> anyhow::Result<()> {
    let db = &args.scale_database;
    anyhow::ensure!(
        db != "test" && db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "--scale-database must be a plain name other than test"
    );
    let (server_url, _) = args
        .database_url
        .rsplit_once('/')
        .context("--database-url has no database name")?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{server_url}/postgres"))
        .await
        .context("connect to PostgreSQL's postgres database")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await?;
    let url = format!("{server_url}/{db}");
    let result = measure(args, &url).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    result
}

async fn measure(args: &Args, url: &str) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let credits = credits_svc::start(
        credits_svc::Config {
            database_url: url.to_owned(),
            listen_addr: "127.0.0.1:0".parse()?,
            service_tokens: ServiceTokens::new([TOKEN]),
            deduct_workers: None,
            lot_sweep_interval: Duration::from_secs(60),
            clock: reeve_runtime::clock::Clock::system(),
            checkout: None,
        },
        shutdown.clone(),
    )
    .await?;
    let quota = quota_svc::start(
        quota_svc::Config {
            database_url: url.to_owned(),
            listen_addr: "127.0.0.1:0".parse()?,
            service_tokens: ServiceTokens::new([TOKEN]),
            registry_path: None,
            batch_workers: args.quota_batch_workers,
        },
        shutdown.clone(),
    )
    .await?;
    let pool = PgPoolOptions::new()
        .max_connections(64)
        .after_connect(|conn, _| {
            Box::pin(async move {
                // Seeding only: large sorts in memory, no wait for each chunk's fsync.
                sqlx::query("SET work_mem = '1GB'")
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("SET synchronous_commit = off")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    let token = reeve_runtime::auth::BearerToken::new(TOKEN)?;
    let credits_channels = crate::connect_channels(credits.local_addr).await?;
    let quota_channels = crate::connect_channels(quota.local_addr).await?;
    let credits_client = {
        let token = token.clone();
        Arc::new(move |w: usize| -> CreditsClient {
            reeve_proto::credits::v1::credit_service_client::CreditServiceClient::with_interceptor(
                credits_channels[w % credits_channels.len()].clone(),
                token.clone(),
            )
        })
    };
    let quota_client = Arc::new(move |w: usize| -> QuotaClient {
        reeve_proto::quota::v1::quota_service_client::QuotaServiceClient::with_interceptor(
            quota_channels[w % quota_channels.len()].clone(),
            token.clone(),
        )
    });
    let duration = Duration::from_secs(args.seconds);
    let ledger_duration = Duration::from_secs(args.ledger_seconds.unwrap_or(args.seconds));
    let callers = args.single_callers;
    let mut tables: Vec<String> = Vec::new();

    // The settings that decide what a growing ledger costs, with the figures.
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, current_setting(name) FROM pg_settings \
         WHERE name IN ('shared_buffers', 'max_wal_size', 'checkpoint_timeout', 'wal_compression') \
         ORDER BY name",
    )
    .fetch_all(&pool)
    .await?;
    let settings: Vec<String> = settings
        .into_iter()
        .map(|(name, value)| format!("{name} = {value}"))
        .collect();
    println!(
        "PostgreSQL: {}; the timed calls' keys: {}",
        settings.join(", "),
        args.key_order
    );

    // Quota.
    let started = Instant::now();
    crate::quota::seed(&pool, args.quota_users).await?;
    let base_rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM quota_consumptions")
        .fetch_one(&pool)
        .await?;
    eprintln!(
        "quota: seeded {base_rows} usage rows in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let features = Arc::new(crate::quota::features());
    let mut quota_rows = Vec::new();
    quota_rows
        .extend(quota_checks(&quota_client, &features, args, callers, duration, base_rows).await?);
    let grown = grow_usage(&pool, args, &features).await?;
    quota_rows
        .extend(quota_checks(&quota_client, &features, args, callers, duration, grown).await?);
    tables.push(table(
        "quota checks as usage grows",
        "checks/s",
        &quota_rows,
        &[(2, 0, "read-only"), (3, 1, "consume")],
    ));
    println!("{}", tables.last().map(String::as_str).unwrap_or_default());

    // Ledger.
    let started = Instant::now();
    crate::seed(&pool, args.users).await?;
    seed_heavy(&pool).await?;
    eprintln!(
        "ledger: seeded {} users in {:.1} s",
        2 * args.users + 1,
        started.elapsed().as_secs_f64()
    );
    let mut levels = args.entries.clone();
    levels.sort_unstable();
    levels.dedup();
    let mut seeded = 0u64;
    let mut heavy = 0u64;
    let mut ledger_rows: Vec<Figures> = Vec::new();
    let mut wal_rows: Vec<String> = Vec::new();
    let mut history_rows: Vec<Figures> = Vec::new();
    let mut plans = Vec::new();
    for (level_index, &level) in levels.iter().enumerate() {
        if level > seeded {
            let started = Instant::now();
            let to_heavy = (level - seeded).min(args.heavy_entries.saturating_sub(heavy));
            if to_heavy > 0 {
                seed_heavy_entries(&pool, heavy, to_heavy).await?;
                heavy += to_heavy;
            }
            let spread = level - seeded - to_heavy;
            let per_user = spread / args.users as u64;
            if per_user > 0 {
                seed_spread_entries(&pool, args.users, per_user, level_index).await?;
            }
            seeded += to_heavy + per_user * args.users as u64;
            let inserted = started.elapsed();
            let vacuum_started = Instant::now();
            sqlx::query("VACUUM (ANALYZE) credit_ledger")
                .execute(&pool)
                .await?;
            sqlx::query("VACUUM (ANALYZE) credit_accounts, credit_lots")
                .execute(&pool)
                .await?;
            let size: String = sqlx::query_scalar(
                "SELECT pg_size_pretty(pg_total_relation_size('credit_ledger'))",
            )
            .fetch_one(&pool)
            .await?;
            println!(
                "ledger at {seeded} seeded entries ({heavy} of them the heavy user's): inserted in {:.0} s, VACUUM ANALYZE {:.0} s; credit_ledger with its indexes {size}",
                inserted.as_secs_f64(),
                vacuum_started.elapsed().as_secs_f64()
            );
        }
        // Each level is measured from a fresh checkpoint: a page's first change after one
        // writes the whole page to the WAL, so a level measured while the seed's
        // checkpoint was still under way would pay for writes the others did not.
        if let Err(error) = sqlx::query("CHECKPOINT").execute(&pool).await {
            eprintln!("CHECKPOINT refused ({error}); the level is measured without one");
        }
        let label = format!("ledger at {seeded} entries");
        let sequential = args.key_order == "sequential";
        let c = Arc::clone(&credits_client);
        let users = args.users;
        ledger_rows.push(
            Wal::during(
                &pool,
                &mut wal_rows,
                drive(
                    format!("DeductBatch ×100, {} clients, {label}", args.batch_clients),
                    args.batch_clients,
                    ledger_duration,
                    move |w, s| {
                        let mut client = c(w);
                        async move {
                            let items = crate::batch_items(
                                w,
                                s,
                                100,
                                |spread| user(spread, users),
                                |i| call_key(sequential, w, s, i, level),
                            );
                            crate::deduct_all(&mut client, items).await
                        }
                    },
                ),
            )
            .await?,
        );
        let c = Arc::clone(&credits_client);
        ledger_rows.push(
            Wal::during(
                &pool,
                &mut wal_rows,
                drive(
                    format!("Deduct (single), {callers} callers, {label}"),
                    callers,
                    ledger_duration,
                    move |w, s| {
                        let mut client = c(w);
                        async move {
                            client
                                .deduct(crate::single_deduction(
                                    user(pick(w, s, 0), users),
                                    call_key(sequential, w, s, 1_000_000, level),
                                ))
                                .await?;
                            Ok(1)
                        }
                    },
                ),
            )
            .await?,
        );
        if heavy >= args.heavy_entries && heavy > 0 {
            let (rows, plan) = history(&pool, &credits_client, heavy, &label, duration).await?;
            history_rows.extend(rows);
            plans.push(plan);
        }
    }
    let pairs: Vec<(usize, usize, String)> = (1..levels.len())
        .flat_map(|l| {
            [
                (2 * l, 0, format!("DeductBatch ×100 at level {}", levels[l])),
                (2 * l + 1, 1, format!("Deduct at level {}", levels[l])),
            ]
        })
        .collect();
    let pairs: Vec<(usize, usize, &str)> =
        pairs.iter().map(|(a, b, n)| (*a, *b, n.as_str())).collect();
    tables.push(table("ledger growth", "deductions/s", &ledger_rows, &pairs));
    tables.push(format!(
        "What PostgreSQL read and wrote during each ledger scenario, per deduction (checkpoints: in all):\n\n\
         | scenario | WAL bytes | full-page images | pages read into the buffers | pages written by backends | checkpoints |\n|---|---:|---:|---:|---:|---:|\n{}",
        wal_rows.join("\n")
    ));
    let history_pairs: Vec<(usize, usize, &str)> = (0..history_rows.len() / 3)
        .flat_map(|l| {
            [
                (3 * l + 1, 3 * l, "middle page vs first page"),
                (3 * l + 2, 3 * l, "deep page vs first page"),
            ]
        })
        .collect();
    tables.push(table(
        "History of the heavy user (50 entries a page, 8 callers)",
        "pages/s",
        &history_rows,
        &history_pairs,
    ));
    println!();
    for table in &tables {
        println!("{table}");
    }
    for plan in &plans {
        println!("{plan}");
    }
    shutdown.cancel();
    credits.wait().await?;
    quota.wait().await?;
    Ok(())
}

/// A markdown table of `rows`, then each `(a, b, name)` as a's rate over b's.
fn table(title: &str, unit: &str, rows: &[Figures], ratios: &[(usize, usize, &str)]) -> String {
    let mut out =
        format!("\n{title}\n\n| scenario | {unit} | p50 ms | p99 ms |\n|---|---:|---:|---:|\n");
    for row in rows {
        out.push_str(&row.row());
        out.push('\n');
    }
    out.push('\n');
    for (a, b, name) in ratios {
        if let (Some(a), Some(b)) = (rows.get(*a), rows.get(*b)) {
            out.push_str(&format!(
                "{name}: {:.0}% of the baseline, p99 {:.2} → {:.2} ms\n",
                100.0 * a.per_second() / b.per_second(),
                b.latency_us.value_at_quantile(0.99) as f64 / 1_000.0,
                a.latency_us.value_at_quantile(0.99) as f64 / 1_000.0,
            ));
        }
    }
    out
}

async fn quota_checks(
    client: &Arc<impl Fn(usize) -> QuotaClient + Send + Sync + 'static>,
    features: &Arc<Vec<String>>,
    args: &Args,
    callers: usize,
    duration: Duration,
    rows: i64,
) -> anyhow::Result<Vec<Figures>> {
    let users = args.quota_users as u64;
    let mut results = Vec::new();
    for consume in [0i64, 1] {
        let (c, f) = (Arc::clone(client), Arc::clone(features));
        results.push(
            drive(
                format!(
                    "CheckQuota {}, {callers} callers, {rows} usage rows",
                    if consume == 0 {
                        "read-only"
                    } else {
                        "consume 1"
                    }
                ),
                callers,
                duration,
                move |w, s| {
                    let mut client = c(w);
                    let (user_id, feature) = crate::quota::target(w, s, users, &f);
                    async move {
                        client
                            .check_quota(qpb::CheckQuotaRequest {
                                user_id,
                                feature,
                                consume,
                                idempotency_key: if consume > 0 {
                                    format!("c-{rows}-{w}-{s}")
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
    }
    Ok(results)
}

/// Adds usage rows (in the window, spread over the seeded users and features) until
/// `quota_consumptions` holds `--usage-rows`; counters move to match. The total.
async fn grow_usage(pool: &sqlx::PgPool, args: &Args, features: &[String]) -> anyhow::Result<i64> {
    let have: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM quota_consumptions")
        .fetch_one(pool)
        .await?;
    let pairs = (args.quota_users * features.len()) as i64;
    let per_pair = (i64::try_from(args.usage_rows)? - have).max(0) / pairs;
    if per_pair == 0 {
        return Ok(have);
    }
    let started = Instant::now();
    let now = reeve_runtime::clock::now_us();
    let users = i64::try_from(args.quota_users)?;
    let chunk = (2_000_000 / (per_pair * features.len() as i64)).max(1);
    let mut first = 0i64;
    while first < users {
        let last = (first + chunk).min(users);
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO quota_consumptions (user_id, feature, idempotency_key, units, consumed_at_us) \
             SELECT 'q' || lpad(u::text, 5, '0'), f.name, 'scale-' || r, 1, $4 - 1000 * r \
             FROM generate_series($1, $2 - 1) AS u, UNNEST($3::text[]) AS f(name), generate_series(1, $5) AS r",
        )
        .bind(first)
        .bind(last)
        .bind(features)
        .bind(now)
        .bind(per_pair)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE quota_counters SET used = used + $3 \
             WHERE user_id >= 'q' || lpad($1::text, 5, '0') AND user_id < 'q' || lpad($2::text, 5, '0')",
        )
        .bind(first)
        .bind(last)
        .bind(per_pair)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        first = last;
    }
    sqlx::query("VACUUM (ANALYZE) quota_consumptions, quota_counters")
        .execute(pool)
        .await?;
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM quota_consumptions")
        .fetch_one(pool)
        .await?;
    println!(
        "quota: {total} usage rows ({per_pair} more per user and feature) in {:.0} s with VACUUM ANALYZE",
        started.elapsed().as_secs_f64()
    );
    Ok(total)
}

/// The heavy user: an account, its grant entry and its one lot.
async fn seed_heavy(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO credit_accounts (user_id, balance_micros, updated_at_us) VALUES ($1, $2, 0)",
    )
    .bind(HEAVY)
    .bind(HEAVY_BALANCE_MICROS)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO credit_ledger (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us) \
         VALUES ($1, 'grant', $2, $2, 'seed-heavy', 'loadgen seed', 0)",
    )
    .bind(HEAVY)
    .bind(HEAVY_BALANCE_MICROS)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO credit_lots (user_id, category, priority, expires_at_us, source, original_micros, remaining_micros, entry_id, created_at_us) \
         VALUES ($1, 'paid', 50, NULL, 'seed-heavy', $2, $2, NULL, 0)",
    )
    .bind(HEAVY)
    .bind(HEAVY_BALANCE_MICROS)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `count` deductions of 1,000 micros for the heavy user, after the `done` already
/// there, in chunks; each chunk, its balance and its lot in one transaction.
async fn seed_heavy_entries(pool: &sqlx::PgPool, done: u64, count: u64) -> anyhow::Result<()> {
    let mut at = done;
    let end = done + count;
    while at < end {
        let next = (at + SEED_CHUNK_ROWS).min(end);
        let started = Instant::now();
        let mut tx = pool.begin().await?;
        // Inserted in key order (ids follow it): balance_after counts down in id order.
        sqlx::query(
            "INSERT INTO credit_ledger (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us, draws) \
             SELECT a.user_id, 'deduction', -1000, a.balance_micros - 1000 * s.n, s.key, '', 1700000000000000 + $1 + s.n, \
                    '[[' || l.id || ',1000]]' \
             FROM (SELECT key, row_number() OVER (ORDER BY key) AS n \
                   FROM (SELECT md5('heavy-' || g) AS key FROM generate_series($1, $2 - 1) AS g) k) s, \
                  credit_accounts a, credit_lots l \
             WHERE a.user_id = $3 AND l.user_id = $3 \
             ORDER BY s.key",
        )
        .bind(i64::try_from(at)?)
        .bind(i64::try_from(next)?)
        .bind(HEAVY)
        .execute(&mut *tx)
        .await?;
        let moved = 1000 * i64::try_from(next - at)?;
        sqlx::query(
            "UPDATE credit_accounts SET balance_micros = balance_micros - $2 WHERE user_id = $1",
        )
        .bind(HEAVY)
        .bind(moved)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE credit_lots SET remaining_micros = remaining_micros - $2 WHERE user_id = $1",
        )
        .bind(HEAVY)
        .bind(moved)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        eprintln!(
            "  heavy user: {} entries ({:.0} rows/s)",
            next,
            (next - at) as f64 / started.elapsed().as_secs_f64()
        );
        at = next;
    }
    Ok(())
}

/// `per_user` deductions of 1,000 micros for every `u` user, in chunks of users; each
/// chunk with its balances and lots in one transaction.
async fn seed_spread_entries(
    pool: &sqlx::PgPool,
    users: usize,
    per_user: u64,
    level: usize,
) -> anyhow::Result<()> {
    let chunk = (SEED_CHUNK_ROWS / per_user).max(1) as usize;
    let mut first = 0usize;
    while first < users {
        let last = (first + chunk).min(users);
        let started = Instant::now();
        let (lo, hi) = (
            user(first as u64, usize::MAX),
            user(last as u64, usize::MAX),
        );
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO credit_ledger (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us, draws) \
             SELECT user_id, 'deduction', -1000, balance - 1000 * n, key, '', 1700000000000000 + n, draws FROM ( \
                 SELECT a.user_id, a.balance_micros AS balance, k.key, '[[' || l.id || ',1000]]' AS draws, \
                        row_number() OVER (PARTITION BY a.user_id ORDER BY k.key) AS n \
                 FROM credit_accounts a JOIN credit_lots l ON l.user_id = a.user_id, \
                      LATERAL (SELECT md5(a.user_id || '-' || $3 || '-' || j) AS key FROM generate_series(1, $4) AS j) k \
                 WHERE a.user_id >= $1 AND a.user_id < $2 \
             ) s ORDER BY key",
        )
        .bind(&lo)
        .bind(&hi)
        .bind(i64::try_from(level)?)
        .bind(i64::try_from(per_user)?)
        .execute(&mut *tx)
        .await?;
        let moved = 1000 * i64::try_from(per_user)?;
        sqlx::query("UPDATE credit_accounts SET balance_micros = balance_micros - $3 WHERE user_id >= $1 AND user_id < $2")
            .bind(&lo)
            .bind(&hi)
            .bind(moved)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE credit_lots SET remaining_micros = remaining_micros - $3 WHERE user_id >= $1 AND user_id < $2")
            .bind(&lo)
            .bind(&hi)
            .bind(moved)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        eprintln!(
            "  users {first}..{last}: {per_user} entries each ({:.0} rows/s)",
            ((last - first) as u64 * per_user) as f64 / started.elapsed().as_secs_f64()
        );
        first = last;
    }
    Ok(())
}

/// The heavy user's first page, a middle page and a page near the oldest entry, each
/// from 8 callers; and PostgreSQL's plan for the store's query at the first and the
/// deep page.
async fn history(
    pool: &sqlx::PgPool,
    client: &Arc<impl Fn(usize) -> CreditsClient + Send + Sync + 'static>,
    heavy: u64,
    label: &str,
    duration: Duration,
) -> anyhow::Result<(Vec<Figures>, String)> {
    // Page tokens are entry ids: the next page is the entries below the token.
    let middle: i64 = sqlx::query_scalar(
        "SELECT id FROM credit_ledger WHERE user_id = $1 ORDER BY -id OFFSET $2 LIMIT 1",
    )
    .bind(HEAVY)
    .bind(i64::try_from(heavy / 2)?)
    .fetch_one(pool)
    .await?;
    let deep: i64 = sqlx::query_scalar(
        "SELECT id FROM credit_ledger WHERE user_id = $1 ORDER BY -id DESC OFFSET 100 LIMIT 1",
    )
    .bind(HEAVY)
    .fetch_one(pool)
    .await?;
    let mut rows = Vec::new();
    for (name, token) in [
        ("first page", None),
        ("middle page", Some(middle)),
        ("deep page (100 entries from the oldest)", Some(deep)),
    ] {
        let c = Arc::clone(client);
        rows.push(
            drive(
                format!("History {name}, {heavy} entries of the user, {label}"),
                8,
                duration,
                move |w, _| {
                    let mut client = c(w);
                    async move {
                        let page = client
                            .history(pb::HistoryRequest {
                                user_id: HEAVY.to_owned(),
                                page_size: 50,
                                page_token: token.map(|t| t.to_string()).unwrap_or_default(),
                            })
                            .await?
                            .into_inner();
                        anyhow::ensure!(
                            page.entries.len() == 50,
                            "a page of {}",
                            page.entries.len()
                        );
                        Ok(1)
                    }
                },
            )
            .await?,
        );
    }
    let mut plan = format!("\nPlans of the History query ({label}):\n");
    for (name, before) in [("first page", i64::MAX), ("deep page", deep)] {
        let lines: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM credit_ledger {}",
            credits_svc::store::postgres::HISTORY_FILTER
        ))
        .bind(HEAVY)
        .bind(before)
        .bind(51_i64)
        .fetch_all(pool)
        .await?;
        plan.push_str(&format!("\n{name}:\n"));
        for line in lines {
            plan.push_str(&format!("    {line}\n"));
        }
    }
    Ok((rows, plan))
}

/// PostgreSQL's WAL counters (`pg_stat_wal`, all databases), the pages this database
/// read into `shared_buffers` because they were not there (`pg_stat_database`), its
/// checkpoints and the pages backends had to write out themselves to make room in
/// `shared_buffers` (`pg_stat_bgwriter` up to PostgreSQL 16; not shown on later
/// versions). A deduction's random idempotency key dirties an index page that, on a
/// large ledger, is rarely in the buffers and is written to the WAL whole the first
/// time it changes after a checkpoint.
struct Wal {
    bytes: f64,
    full_pages: i64,
    /// Pages read into the buffers (from the operating system's cache or the disk).
    reads: i64,
    /// Checkpoints and backend writes, where `pg_stat_bgwriter` still has them.
    bgwriter: Option<(i64, i64)>,
}

impl Wal {
    async fn now(pool: &sqlx::PgPool) -> anyhow::Result<Wal> {
        let (bytes, full_pages): (f64, i64) =
            sqlx::query_as("SELECT wal_bytes::float8, wal_fpi FROM pg_stat_wal")
                .fetch_one(pool)
                .await?;
        let reads: i64 = sqlx::query_scalar(
            "SELECT blks_read FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await?;
        let bgwriter = sqlx::query_as(
            "SELECT checkpoints_timed + checkpoints_req, buffers_backend FROM pg_stat_bgwriter",
        )
        .fetch_one(pool)
        .await
        .ok();
        Ok(Wal {
            bytes,
            full_pages,
            reads,
            bgwriter,
        })
    }

    /// Runs one scenario and notes what PostgreSQL wrote during it in `rows`.
    async fn during(
        pool: &sqlx::PgPool,
        rows: &mut Vec<String>,
        scenario: impl Future<Output = anyhow::Result<Figures>>,
    ) -> anyhow::Result<Figures> {
        let before = Wal::now(pool).await?;
        let figures = scenario.await?;
        rows.push(Wal::now(pool).await?.since(&before, &figures));
        Ok(figures)
    }

    /// A table row: what was written since `before`, per deduction of `figures`.
    fn since(&self, before: &Wal, figures: &Figures) -> String {
        let deductions = figures.deductions.max(1) as f64;
        let (checkpoints, evictions) = match (self.bgwriter, before.bgwriter) {
            (Some((c1, b1)), Some((c0, b0))) => (
                (c1 - c0).to_string(),
                format!("{:.2}", (b1 - b0) as f64 / deductions),
            ),
            _ => ("—".to_owned(), "—".to_owned()),
        };
        format!(
            "| {} | {:.0} | {:.2} | {:.2} | {evictions} | {checkpoints} |",
            figures.name,
            (self.bytes - before.bytes) / deductions,
            (self.full_pages - before.full_pages) as f64 / deductions,
            (self.reads - before.reads) as f64 / deductions,
        )
    }
}
