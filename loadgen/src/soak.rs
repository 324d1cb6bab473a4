//! The soak suite (issue 14): `--minutes` of mixed load on the whole stack in this
//! process (credits-svc, quota-svc, the bridge), with this process's RSS sampled every
//! minute, every outcome counted by kind (expected refusals apart from errors), and an
//! audit at the end: every user's cached balance equals the sum of their entries, every
//! user's live lots add up to their balance, and every quota counter equals its
//! unreleased consumptions.
//!
//! The mix, all at once, each from its own callers: `DeductBatch` ×100, single
//! `Deduct`, `Hold` then `SettleHold` (one in eight released instead), `CheckQuota`
//! with consume, REST balance and history reads (user JWTs), and Stripe-signed
//! `payment_intent.succeeded` webhooks to the bridge. A population of "poor" users
//! (0.05 credits each, topped up only by the webhooks) receives an eighth of the single
//! deductions (0.2 credits each) and a sixteenth of the holds, so insufficient-credits refusals happen all along: they are
//! expected and counted apart. Quota checks run into the free tier's limits the same
//! way (an answer `allowed: false`, not an error).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reeve_proto::credits::v1 as pb;
use reeve_proto::quota::v1 as qpb;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

use crate::ceilings::deduct_body;
use crate::stack::{Stack, WEBHOOK_SECRET, user_tokens};
use crate::{Args, TOKEN, pick, user};

/// Poor users: a small balance each, so refusals happen; webhooks top them up.
const POOR_USERS: u64 = 1_000;
const POOR_BALANCE_MICROS: i64 = 50_000;

/// Outcome counts by kind: `ok:*`, `refused:*` (expected) and `error:*`.
#[derive(Default)]
struct Tally {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn add(&self, kind: &str) {
        if let Ok(mut counts) = self.counts.lock() {
            *counts.entry(kind.to_owned()).or_default() += 1;
        }
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// A gRPC failure: insufficient credits is an expected refusal, anything else an
    /// error named by its code.
    fn status(&self, op: &str, status: &tonic::Status) {
        if status.code() == tonic::Code::FailedPrecondition
            && status.message().starts_with("insufficient credits")
        {
            self.add(&format!("refused:{op}:insufficient_credits"));
        } else {
            self.add(&format!(
                "error:{op}:{:?}: {}",
                status.code(),
                truncate(status.message())
            ));
        }
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

fn poor(index: u64) -> String {
    format!("p{:05}", index % POOR_USERS)
}

/// This process's resident set, in MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Stripe's fixtures (`shared/stripe-fixtures` beside the checkout, or
/// `REEVE_STRIPE_FIXTURES`).
fn fixture(name: &str) -> anyhow::Result<serde_json::Value> {
    let dir = std::env::var("REEVE_STRIPE_FIXTURES").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/stripe-fixtures").to_owned()
    });
    let path = format!("{dir}/{name}.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("Stripe fixture {path}: {e} (set REEVE_STRIPE_FIXTURES)"))?;
    Ok(serde_json::from_str(&text)?)
}

/// A signed `payment_intent.succeeded` of `cents` for `user_id`: payload and header.
fn payment_webhook(
    templates: &(serde_json::Value, serde_json::Value),
    id: &str,
    user_id: &str,
    cents: i64,
) -> (String, String) {
    let (event_template, pi_template) = templates;
    let mut pi = pi_template.clone();
    pi["id"] = json!(format!("pi_{id}"));
    pi["amount"] = json!(cents);
    pi["amount_received"] = json!(cents);
    pi["currency"] = json!("usd");
    pi["status"] = json!("succeeded");
    pi["latest_charge"] = json!(format!("ch_{id}"));
    pi["metadata"] = json!({ "user_id": user_id });
    let mut event = event_template.clone();
    let now = fake_stripe::now_secs();
    event["id"] = json!(format!("evt_{id}"));
    event["type"] = json!("payment_intent.succeeded");
    event["created"] = json!(now);
    event["data"] = json!({ "object": pi });
    let payload = event.to_string();
    let signature = fake_stripe::sign(&payload, WEBHOOK_SECRET, now);
    (payload, signature)
}

/// Runs `callers` loops of `operation(worker, sequence)` until `stop`.
fn spawn_loops<F, Fut>(
    callers: usize,
    stop: &Arc<AtomicBool>,
    operation: F,
) -> Vec<tokio::task::JoinHandle<()>>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    (0..callers)
        .map(|w| {
            let stop = Arc::clone(stop);
            let operation = operation.clone();
            tokio::spawn(async move {
                let mut s = 0;
                while !stop.load(Ordering::Relaxed) {
                    operation(w, s).await;
                    s += 1;
                }
            })
        })
        .collect()
}

pub(crate) async fn run(args: &Args, url: &str) -> anyhow::Result<()> {
    let stack = Arc::new(Stack::start(url, args.quota_batch_workers, axum::Router::new()).await?);
    let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
    crate::seed(&pool, args.users).await?;
    seed_poor(&pool).await?;
    let users = args.users;
    let templates = Arc::new((fixture("event")?, fixture("payment_intent")?));
    let tokens = user_tokens(4_096, |i| {
        if i.is_multiple_of(8) {
            poor(i)
        } else {
            user(i, users)
        }
    })?;
    let features = Arc::new(crate::quota::features());
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let run_id = std::process::id();
    eprintln!(
        "soak: {} users with 1,000,000 credits, {POOR_USERS} poor users with 0.05; {} minutes",
        users, args.minutes
    );
    let mut tasks = Vec::new();

    // DeductBatch ×100 from 2 clients.
    let (s, t) = (Arc::clone(&stack), Arc::clone(&tally));
    tasks.extend(spawn_loops(2, &stop, move |w, seq| {
        let (s, t) = (Arc::clone(&s), Arc::clone(&t));
        async move {
            let Ok(mut client) = s.credits(w) else { return };
            let items = (0..100)
                .map(|i| pb::DeductRequest {
                    user_id: user(pick(w, seq, i), users),
                    amount_micros: 1_000 + (i as i64 % 500),
                    idempotency_key: format!("sb-{run_id}-{w}-{seq}-{i}"),
                    description: String::new(),
                })
                .collect();
            match client.deduct_batch(pb::DeductBatchRequest { items }).await {
                Ok(reply) => {
                    for outcome in reply.into_inner().outcomes {
                        match outcome.result {
                            Some(pb::deduct_outcome::Result::Applied(_)) => t.add("ok:batch_item"),
                            Some(pb::deduct_outcome::Result::Insufficient(_)) => {
                                t.add("refused:batch_item:insufficient_credits")
                            }
                            other => t.add(&format!("error:batch_item:{other:?}")),
                        }
                    }
                }
                Err(status) => t.status("batch", &status),
            }
        }
    }));

    // Single Deduct from 16 callers, one in eight to a poor user.
    let (s, t) = (Arc::clone(&stack), Arc::clone(&tally));
    tasks.extend(spawn_loops(16, &stop, move |w, seq| {
        let (s, t) = (Arc::clone(&s), Arc::clone(&t));
        async move {
            let Ok(mut client) = s.credits(w) else { return };
            let x = pick(w, seq, 0);
            // A poor user's deduction is 0.2 credits: they run short between top-ups.
            let (user_id, amount_micros) = if x.is_multiple_of(8) {
                (poor(x), 200_000)
            } else {
                (user(x, users), 1_000)
            };
            match client
                .deduct(pb::DeductRequest {
                    user_id,
                    amount_micros,
                    idempotency_key: format!("ss-{run_id}-{w}-{seq}"),
                    description: String::new(),
                })
                .await
            {
                Ok(_) => t.add("ok:deduct"),
                Err(status) => t.status("deduct", &status),
            }
        }
    }));

    // Hold then SettleHold (or ReleaseHold, one in eight) from 8 callers.
    let (s, t) = (Arc::clone(&stack), Arc::clone(&tally));
    tasks.extend(spawn_loops(8, &stop, move |w, seq| {
        let (s, t) = (Arc::clone(&s), Arc::clone(&t));
        async move {
            let Ok(mut client) = s.credits(w) else { return };
            let x = pick(w, seq, 3);
            let user_id = if x.is_multiple_of(16) {
                poor(x)
            } else {
                user(x, users)
            };
            let hold_id = format!("sh-{run_id}-{w}-{seq}");
            match client
                .hold(pb::HoldRequest {
                    user_id,
                    hold_id: hold_id.clone(),
                    amount_micros: 5_000,
                    ttl_seconds: 600,
                    description: String::new(),
                })
                .await
            {
                Ok(_) => t.add("ok:hold"),
                Err(status) => {
                    t.status("hold", &status);
                    return;
                }
            }
            if seq % 8 == 7 {
                match client
                    .release_hold(pb::ReleaseHoldRequest { hold_id })
                    .await
                {
                    Ok(_) => t.add("ok:release_hold"),
                    Err(status) => t.status("release_hold", &status),
                }
            } else {
                match client
                    .settle_hold(pb::SettleHoldRequest {
                        hold_id,
                        amount_micros: 1_000 + (seq as i64 % 500),
                        description: String::new(),
                    })
                    .await
                {
                    Ok(reply) if reply.get_ref().shortfall_micros == 0 => t.add("ok:settle_hold"),
                    Ok(_) => t.add("error:settle_hold:shortfall"),
                    Err(status) => t.status("settle_hold", &status),
                }
            }
        }
    }));

    // CheckQuota consume 1 from 16 callers, over few users so the free tier's limits
    // are reached (refusals are answers, not errors).
    let (s, t, f) = (
        Arc::clone(&stack),
        Arc::clone(&tally),
        Arc::clone(&features),
    );
    tasks.extend(spawn_loops(16, &stop, move |w, seq| {
        let (s, t) = (Arc::clone(&s), Arc::clone(&t));
        let (user_id, feature) = crate::quota::target(w, seq, 2_000, &f);
        async move {
            let Ok(mut client) = s.quota(w) else { return };
            match client
                .check_quota(qpb::CheckQuotaRequest {
                    user_id,
                    feature,
                    consume: 1,
                    idempotency_key: format!("sq-{run_id}-{w}-{seq}"),
                })
                .await
            {
                Ok(reply) if reply.get_ref().allowed => t.add("ok:check_quota"),
                Ok(_) => t.add("refused:check_quota:over_limit"),
                Err(status) => t.status("check_quota", &status),
            }
        }
    }));

    // REST reads with user JWTs from 8 callers: balance, and history one time in four.
    let (s, t, k) = (Arc::clone(&stack), Arc::clone(&tally), Arc::clone(&tokens));
    tasks.extend(spawn_loops(8, &stop, move |w, seq| {
        let (s, t) = (Arc::clone(&s), Arc::clone(&t));
        let token = k[(pick(w, seq, 5) % k.len() as u64) as usize].1.clone();
        async move {
            let (path, op) = if seq % 4 == 3 {
                ("/api/credits/history", "rest_history")
            } else {
                ("/api/credits/balance", "rest_balance")
            };
            match s
                .http
                .get(format!("{}{path}", s.base))
                .bearer_auth(token)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let _ = r.bytes().await;
                    t.add(&format!("ok:{op}"));
                }
                Ok(r) => t.add(&format!("error:{op}:HTTP {}", r.status())),
                Err(e) => t.add(&format!("error:{op}:{}", truncate(&e.to_string()))),
            }
        }
    }));

    // REST deductions with the service token from 4 callers.
    let (s, t) = (Arc::clone(&stack), Arc::clone(&tally));
    tasks.extend(spawn_loops(4, &stop, move |w, seq| {
        let (s, t) = (Arc::clone(&s), Arc::clone(&t));
        async move {
            let x = pick(w, seq, 6);
            let user_id = if x.is_multiple_of(8) {
                poor(x)
            } else {
                user(x, users)
            };
            let body = deduct_body(&user_id, &format!("sr-{run_id}-{w}-{seq}"));
            match s
                .http
                .post(format!("{}/api/credits/deduct", s.base))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let _ = r.bytes().await;
                    t.add("ok:rest_deduct");
                }
                Ok(r) if r.status() == reqwest::StatusCode::PAYMENT_REQUIRED => {
                    let _ = r.bytes().await;
                    t.add("refused:rest_deduct:insufficient_credits");
                }
                Ok(r) => t.add(&format!("error:rest_deduct:HTTP {}", r.status())),
                Err(e) => t.add(&format!("error:rest_deduct:{}", truncate(&e.to_string()))),
            }
        }
    }));

    // Stripe webhooks: one caller, a purchase of $1 to $5 for a poor user every 500 ms
    // (about what the poor users' deductions take).
    let (s, t, tm) = (
        Arc::clone(&stack),
        Arc::clone(&tally),
        Arc::clone(&templates),
    );
    tasks.extend(spawn_loops(1, &stop, move |w, seq| {
        let (s, t, tm) = (Arc::clone(&s), Arc::clone(&t), Arc::clone(&tm));
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let x = pick(w, seq, 9);
            let (payload, signature) = payment_webhook(
                &tm,
                &format!("soak{run_id}x{seq}"),
                &poor(x),
                100 * (1 + (x % 5) as i64),
            );
            match s
                .http
                .post(format!("{}/api/credits/webhook", s.base))
                .header("content-type", "application/json")
                .header("stripe-signature", signature)
                .body(payload)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let _ = r.bytes().await;
                    t.add("ok:webhook");
                }
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    t.add(&format!("error:webhook:HTTP {status}: {}", truncate(&body)));
                }
                Err(e) => t.add(&format!("error:webhook:{}", truncate(&e.to_string()))),
            }
        }
    }));

    let started = Instant::now();
    let mut samples: Vec<(u64, f64)> = vec![(0, rss_mib())];
    let mut previous = tally.snapshot();
    println!("| minute | RSS MiB | ok ops in the minute | expected refusals | errors |");
    println!("|---:|---:|---:|---:|---:|");
    for minute in 1..=args.minutes {
        let due = started + Duration::from_secs(60 * minute);
        tokio::time::sleep_until(due.into()).await;
        let now = tally.snapshot();
        let delta = |prefix: &str| -> u64 {
            now.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| v - previous.get(k).copied().unwrap_or(0))
                .sum()
        };
        let rss = rss_mib();
        samples.push((minute, rss));
        println!(
            "| {minute} | {rss:.1} | {} | {} | {} |",
            delta("ok:"),
            delta("refused:"),
            delta("error:")
        );
        previous = now;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed();

    let totals = tally.snapshot();
    println!();
    println!(
        "Outcomes over {:.1} minutes, by kind:",
        elapsed.as_secs_f64() / 60.0
    );
    println!();
    println!("| kind | count | per s |");
    println!("|---|---:|---:|");
    for (kind, count) in &totals {
        println!(
            "| {kind} | {count} | {:.1} |",
            *count as f64 / elapsed.as_secs_f64()
        );
    }
    let errors: u64 = totals
        .iter()
        .filter(|(k, _)| k.starts_with("error:"))
        .map(|(_, v)| v)
        .sum();

    // RSS: growth after warm-up (the larger of minute 5 and a sixth of the run).
    let warm = (args.minutes / 6).max(5).min(args.minutes);
    let warm_rss = samples
        .iter()
        .find(|(m, _)| *m == warm)
        .map(|(_, r)| *r)
        .unwrap_or(0.0);
    let last_rss = samples.last().map(|(_, r)| *r).unwrap_or(0.0);
    let max_rss = samples.iter().map(|(_, r)| *r).fold(0.0, f64::max);
    let growth = if warm_rss > 0.0 {
        100.0 * (last_rss - warm_rss) / warm_rss
    } else {
        0.0
    };

    let audit = audit(&pool).await?;
    println!();
    println!(
        "RSS: {:.1} MiB at start, {warm_rss:.1} MiB after warm-up (minute {warm}), {last_rss:.1} MiB at the end, {max_rss:.1} MiB peak: {growth:+.1}% after warm-up (target ≤ +10%)",
        samples[0].1
    );
    println!("errors outside the expected refusals: {errors} (target 0)");
    println!(
        "audit: {} users, {} entries; cached balance ≠ sum of entries: {}; live lots ≠ balance: {}; quota counters ≠ unreleased consumptions: {} (target 0 each)",
        audit.users,
        audit.entries,
        audit.balance_mismatches,
        audit.lot_mismatches,
        audit.quota_mismatches
    );
    let clean = errors == 0
        && growth <= 10.0
        && audit.balance_mismatches == 0
        && audit.lot_mismatches == 0
        && audit.quota_mismatches == 0;
    println!("soak: {}", if clean { "clean" } else { "NOT clean" });
    Ok(())
}

struct Audit {
    users: i64,
    entries: i64,
    balance_mismatches: i64,
    lot_mismatches: i64,
    quota_mismatches: i64,
}

/// credits-svc's `BalanceAudit` (cached balance beside the sum of the user's entries)
/// for every user at once, the lots against the balances, and quota-svc's counters
/// against their consumptions.
async fn audit(pool: &sqlx::PgPool) -> anyhow::Result<Audit> {
    let (users, entries): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM credit_accounts), (SELECT COUNT(*) FROM credit_ledger)",
    )
    .fetch_one(pool)
    .await?;
    let balance_mismatches: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM credit_accounts a \
         FULL JOIN (SELECT user_id, SUM(amount_micros)::int8 AS total FROM credit_ledger GROUP BY user_id) l \
           ON l.user_id = a.user_id \
         WHERE COALESCE(a.balance_micros, 0) <> COALESCE(l.total, 0)",
    )
    .fetch_one(pool)
    .await?;
    // Live lots add up to the balance of a user not in debt (no lot expires in the run).
    let lot_mismatches: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM credit_accounts a \
         LEFT JOIN (SELECT user_id, SUM(remaining_micros)::int8 AS total FROM credit_lots GROUP BY user_id) l \
           ON l.user_id = a.user_id \
         WHERE a.balance_micros >= 0 AND a.balance_micros <> COALESCE(l.total, 0)",
    )
    .fetch_one(pool)
    .await?;
    let quota_mismatches: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM quota_counters c \
         LEFT JOIN (SELECT user_id, feature, SUM(units)::int8 AS total FROM quota_consumptions \
                    WHERE NOT released GROUP BY user_id, feature) q \
           ON q.user_id = c.user_id AND q.feature = c.feature \
         WHERE c.used <> COALESCE(q.total, 0)",
    )
    .fetch_one(pool)
    .await?;
    Ok(Audit {
        users,
        entries,
        balance_mismatches,
        lot_mismatches,
        quota_mismatches,
    })
}

/// The poor users: a small balance each, with its grant entry and its lot.
async fn seed_poor(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let users = i64::try_from(POOR_USERS)?;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO credit_accounts (user_id, balance_micros, updated_at_us) \
         SELECT 'p' || lpad(g::text, 5, '0'), $2, 0 FROM generate_series(0, $1 - 1) AS g",
    )
    .bind(users)
    .bind(POOR_BALANCE_MICROS)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO credit_ledger (user_id, kind, amount_micros, balance_after_micros, idempotency_key, description, created_at_us) \
         SELECT 'p' || lpad(g::text, 5, '0'), 'grant', $2, $2, 'seed-p' || g, 'loadgen seed', 0 FROM generate_series(0, $1 - 1) AS g",
    )
    .bind(users)
    .bind(POOR_BALANCE_MICROS)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO credit_lots (user_id, category, priority, expires_at_us, source, \
         original_micros, remaining_micros, entry_id, created_at_us) \
         SELECT 'p' || lpad(g::text, 5, '0'), 'paid', 50, NULL, 'seed-p' || g, $2, $2, NULL, 0 \
         FROM generate_series(0, $1 - 1) AS g",
    )
    .bind(users)
    .bind(POOR_BALANCE_MICROS)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
