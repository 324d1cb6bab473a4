//! PostgreSQL's set-based `quota_consume_batch` (migration 2005) answers and writes
//! exactly what the item loop it took over from (`quota_consume_each`, migration 2003)
//! does. Each batch of a random history runs twice from the same state, once through
//! each function inside a savepoint of one transaction: the rows answered and the
//! counters and consumptions after must be equal; the loop's run is then kept. Between
//! batches, releases, tier and override changes (an unknown tier too) and clock moves
//! around the window's edges vary that state.
//!
//! Batches name 6 to 10 distinct (user, feature) pairs, so the set-based statements run
//! (under six pairs the whole batch takes the loop: see the migration), and some name
//! a pair again, whose later items go through the loop after the set-based part.
//! `PROPTEST_CASES` sets the number of histories (default 32).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use quota_svc::registry::Limit;
use quota_svc::store;
use quota_svc::window::{WINDOW_US, cutoff_us};
use reeve_testkit::{Backend, ScratchDb};
use sqlx::PgPool;

/// 2026-01-01T00:00:00Z, in microseconds.
const T0: i64 = 1_767_225_600_000_000;
const SECOND: i64 = 1_000_000;
const USERS: usize = 4;
const FEATURES: [&str; 3] = ["small", "tight", "wide"];
const KEYS: usize = 3;
const TIERS: [&str; 4] = ["free", "pro", "enterprise", "gold"];

#[derive(Debug, Clone)]
struct Item {
    user: usize,
    feature: usize,
    key: usize,
    units: i64,
    /// The registry's limit of each tier for this feature (`None`: unlimited).
    limits: [Option<i64>; 3],
}

#[derive(Debug, Clone)]
enum Step {
    Batch(Vec<Item>),
    Release {
        user: usize,
        feature: usize,
        key: usize,
    },
    SetTier {
        user: usize,
        tier: usize,
    },
    /// `None` clears the override.
    SetOverride {
        user: usize,
        feature: usize,
        limit: Option<Limit>,
    },
    Clock(i64),
}

fn limit() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![3 => (0..=6i64).prop_map(Some), 1 => Just(None)]
}

fn batch() -> impl Strategy<Value = Vec<Item>> {
    let pairs: Vec<(usize, usize)> = (0..USERS)
        .flat_map(|user| (0..FEATURES.len()).map(move |feature| (user, feature)))
        .collect();
    // Six to ten distinct pairs, and up to four more items naming some of them again
    // (they go through the loop after the set-based part).
    (
        proptest::sample::subsequence(pairs, 6..=10),
        proptest::collection::vec(any::<proptest::sample::Index>(), 0..5),
    )
        .prop_flat_map(|(pairs, again)| {
            let named: Vec<(usize, usize)> = pairs
                .iter()
                .copied()
                .chain(again.iter().map(|index| *index.get(&pairs)))
                .collect();
            let items = named
                .into_iter()
                .map(|(user, feature)| {
                    (0..KEYS, 1..=3i64, [limit(), limit(), limit()]).prop_map(
                        move |(key, units, limits)| Item {
                            user,
                            feature,
                            key,
                            units,
                            limits,
                        },
                    )
                })
                .collect::<Vec<_>>();
            items.prop_shuffle()
        })
}

fn step() -> impl Strategy<Value = Step> {
    let clock = prop_oneof![
        Just(0),
        Just(SECOND),
        Just(-SECOND),
        Just(WINDOW_US - 1),
        Just(WINDOW_US),
        Just(WINDOW_US + 1),
        0..WINDOW_US,
    ];
    let override_limit = prop_oneof![Just(Limit::Unlimited), (0..=4i64).prop_map(Limit::Units)];
    prop_oneof![
        6 => batch().prop_map(Step::Batch),
        2 => (0..USERS, 0..FEATURES.len(), 0..KEYS)
            .prop_map(|(user, feature, key)| Step::Release { user, feature, key }),
        1 => (0..USERS, 0..TIERS.len()).prop_map(|(user, tier)| Step::SetTier { user, tier }),
        1 => (0..USERS, 0..FEATURES.len(), proptest::option::of(override_limit))
            .prop_map(|(user, feature, limit)| Step::SetOverride { user, feature, limit }),
        2 => clock.prop_map(Step::Clock),
    ]
}

type Answer = (
    i32,
    String,
    Option<i64>,
    i64,
    Option<i64>,
    String,
    Option<i64>,
);

/// Runs `function` on the batch inside the transaction; its answers (by item) and the
/// case's counters and consumptions after it.
async fn run(
    tx: &mut sqlx::PgConnection,
    function: &str,
    case: &str,
    items: &[Item],
    now_us: i64,
) -> (Vec<Answer>, String) {
    let user = |item: &Item| format!("{case}-user-{}", item.user);
    let limits =
        |tier: usize| -> Vec<Option<i64>> { items.iter().map(|item| item.limits[tier]).collect() };
    let answers: Vec<Answer> = sqlx::query_as(&format!(
        "SELECT idx, outcome, recorded_units, used, oldest_us, tier, limit_units \
         FROM {function}($1, $2, $3, $4, $5, $6, $7, $8, $9) ORDER BY idx"
    ))
    .bind(items.iter().map(user).collect::<Vec<_>>())
    .bind(
        items
            .iter()
            .map(|i| FEATURES[i.feature])
            .collect::<Vec<_>>(),
    )
    .bind(
        items
            .iter()
            .map(|i| format!("key-{}", i.key))
            .collect::<Vec<_>>(),
    )
    .bind(items.iter().map(|i| i.units).collect::<Vec<_>>())
    .bind(limits(0))
    .bind(limits(1))
    .bind(limits(2))
    .bind(vec![now_us; items.len()])
    .bind(vec![cutoff_us(now_us); items.len()])
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    let tables: String = sqlx::query_scalar(
        "SELECT COALESCE((SELECT string_agg(format('%s/%s used %s', user_id, feature, used), ', ' \
                 ORDER BY user_id, feature) FROM quota_counters WHERE user_id LIKE $1), '') \
             || ' | ' || \
             COALESCE((SELECT string_agg(format('%s/%s/%s %s at %s released %s', user_id, feature, \
                 idempotency_key, units, consumed_at_us, released), ', ' \
                 ORDER BY user_id, feature, idempotency_key) \
                 FROM quota_consumptions WHERE user_id LIKE $1), '')",
    )
    .bind(format!("{case}-%"))
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    (answers, tables)
}

async fn replay(
    pool: &PgPool,
    store: &dyn store::QuotaStore,
    case: &str,
    steps: &[Step],
) -> Result<usize, String> {
    let mut now_us = T0;
    let mut set_based = 0;
    for (index, step) in steps.iter().enumerate() {
        let user = |user: usize| format!("{case}-user-{user}");
        match step {
            Step::Batch(items) => {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("SAVEPOINT set_based")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let batch = run(&mut tx, "quota_consume_batch", case, items, now_us).await;
                sqlx::query("ROLLBACK TO SAVEPOINT set_based")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let each = run(&mut tx, "quota_consume_each", case, items, now_us).await;
                tx.commit().await.unwrap();
                if batch != each {
                    return Err(format!(
                        "step {index}: the set-based batch answered {:?}\nand left {}\n\
                         the item loop answered {:?}\nand left {}",
                        batch.0, batch.1, each.0, each.1
                    ));
                }
                set_based += 1;
            }
            Step::Release {
                user: u,
                feature,
                key,
            } => {
                store
                    .release(
                        &user(*u),
                        FEATURES[*feature],
                        &format!("key-{key}"),
                        cutoff_us(now_us),
                    )
                    .await
                    .unwrap();
            }
            Step::SetTier { user: u, tier } => {
                store
                    .set_tier(&user(*u), TIERS[*tier], now_us)
                    .await
                    .unwrap();
            }
            Step::SetOverride {
                user: u,
                feature,
                limit: Some(limit),
            } => {
                store
                    .set_override(&user(*u), FEATURES[*feature], *limit, now_us)
                    .await
                    .unwrap();
            }
            Step::SetOverride {
                user: u,
                feature,
                limit: None,
            } => {
                store
                    .clear_override(&user(*u), FEATURES[*feature])
                    .await
                    .unwrap();
            }
            Step::Clock(delta_us) => now_us += delta_us,
        }
    }
    Ok(set_based)
}

#[test]
fn the_set_based_batch_answers_and_writes_what_the_item_loop_does() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_db, pool, store) = runtime.block_on(async {
        let db = ScratchDb::new(Backend::Postgres, "quota_batch").await;
        // Opening the store applies the migrations.
        let store = store::open(&db.url, 1).await.unwrap();
        let pool = PgPool::connect(&db.url).await.unwrap();
        (db, pool, store)
    });
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(32);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let next_case = std::sync::atomic::AtomicU64::new(0);
    let batches = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&proptest::collection::vec(step(), 1..40), |steps| {
        let case = format!(
            "case-{}",
            next_case.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let compared = runtime
            .block_on(replay(&pool, store.as_ref(), &case, &steps))
            .map_err(TestCaseError::fail)?;
        batches.fetch_add(compared, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    // The comparison ran (a history without batches compares nothing).
    assert!(
        batches.into_inner() >= cases as usize,
        "too few batches compared"
    );
}

/// Waits until `count` of this test's batches wait on a lock (its statement's text is
/// its own: other tests share the database).
async fn until_waiting(pool: &PgPool, count: i64) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
                 AND query LIKE '%quota_consume_batch($1, $2, $3, $4, $5, $5, $5, $6, $7)%'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting >= count {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("never saw {count} sessions waiting on a lock");
}

/// A batch whose first part found a user's tier unknown (so locked none of that
/// user's counters) must not lock that counter later for the pair's repeated items,
/// even when the tier has become known meanwhile: it would be taken after counters that
/// sort later, and deadlock with a batch taking them in order (found in review).
#[test]
fn a_tier_known_only_midway_locks_nothing_out_of_order() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let db = ScratchDb::new(Backend::Postgres, "quota_batch_order").await;
        let _store = store::open(&db.url, 1).await.unwrap();
        let pool = PgPool::connect(&db.url).await.unwrap();
        sqlx::query(
            "INSERT INTO quota_tiers (user_id, tier, updated_at_us) VALUES ('b', 'gold', 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO quota_counters (user_id, feature, used) \
             SELECT u, 'x', 0 FROM unnest('{b,m,n1,n2,n3,z}'::text[]) AS u",
        )
        .execute(&pool)
        .await
        .unwrap();
        let batch = |users: &'static [&'static str]| {
            let pool = pool.clone();
            async move {
                let n = users.len();
                let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
                sqlx::query_as::<_, Answer>(
                    "SELECT idx, outcome, recorded_units, used, oldest_us, tier, limit_units \
                     FROM quota_consume_batch($1, $2, $3, $4, $5, $5, $5, $6, $7) ORDER BY idx",
                )
                .bind(users)
                .bind(vec!["x"; n])
                .bind(keys)
                .bind(vec![1i64; n])
                .bind(vec![Some(9i64); n])
                .bind(vec![T0; n])
                .bind(vec![cutoff_us(T0); n])
                .fetch_all(&pool)
                .await
            }
        };
        // Another session holds the last counter in order.
        let mut holder = pool.begin().await.unwrap();
        sqlx::query("SELECT used FROM quota_counters WHERE user_id = 'z' FOR UPDATE")
            .execute(&mut *holder)
            .await
            .unwrap();
        // Set-based from six pairs: b (unknown tier, not locked), m … z (waits for z),
        // then b again.
        let first = tokio::spawn(batch(&["b", "m", "n1", "n2", "n3", "z", "b"]));
        until_waiting(&pool, 1).await;
        sqlx::query("UPDATE quota_tiers SET tier = 'pro' WHERE user_id = 'b'")
            .execute(&pool)
            .await
            .unwrap();
        // In order: locks b, then waits for m, which the first batch holds.
        let second = tokio::spawn(batch(&["b", "m"]));
        until_waiting(&pool, 2).await;
        holder.commit().await.unwrap();
        let first = first.await.unwrap().expect("the first batch completes");
        let second = second.await.unwrap().expect("the second batch completes");
        assert_eq!((first.len(), second.len()), (7, 2));
        // The first batch answered its repeated b as its first b: an unknown tier.
        let outcome = |answers: &[Answer], idx: i32| {
            let answer = answers.iter().find(|a| a.0 == idx).unwrap();
            (answer.1.clone(), answer.5.clone())
        };
        let unknown = ("unknown_tier".to_owned(), "gold".to_owned());
        assert_eq!(outcome(&first, 1), unknown);
        assert_eq!(outcome(&first, 7), unknown);
        assert_eq!(
            outcome(&second, 1),
            ("recorded".to_owned(), "pro".to_owned())
        );
    });
}
