//! PostgreSQL's check-and-consume (the plpgsql `quota_consume` / `quota_consume_batch`)
//! equals the rules of `quota_svc::rules`: random histories of consumes (alone and
//! several at once), releases, questions, usage reads, tier and override changes and
//! clock moves (to the window's edges, across them, and a little back) are replayed on
//! a PostgreSQL store and on a SQLite store, whose consume is `rules::plan_consume`,
//! and every answer must be the same.
//!
//! `PROPTEST_CASES` sets the number of histories (default 64).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use futures::future::join_all;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use quota_svc::registry::Limit;
use quota_svc::store::{self, Consume, QuotaStore};
use quota_svc::window::{WINDOW_US, cutoff_us};
use reeve_testkit::{Backend, ScratchDb};

/// 2026-01-01T00:00:00Z, in microseconds.
const T0: i64 = 1_767_225_600_000_000;
const SECOND: i64 = 1_000_000;

const USERS: usize = 2;
const KEYS: usize = 3;
/// Two features, as the registry would give them (free, pro, enterprise).
const FEATURES: [(&str, [Limit; 3]); 2] = [
    (
        "small",
        [Limit::Units(3), Limit::Units(5), Limit::Unlimited],
    ),
    ("tight", [Limit::Units(1), Limit::Units(0), Limit::Units(4)]),
];
const TIERS: [&str; 4] = ["free", "pro", "enterprise", "gold"];

#[derive(Debug, Clone)]
struct Take {
    user: usize,
    feature: usize,
    key: usize,
    units: i64,
}

#[derive(Debug, Clone)]
enum Step {
    Consume(Take),
    /// Consumes of distinct (user, feature) pairs sent at once: one group commit on
    /// PostgreSQL, one after the other on SQLite.
    ConsumeTogether(Vec<Take>),
    Release {
        user: usize,
        feature: usize,
        key: usize,
    },
    Ask {
        user: usize,
        feature: usize,
    },
    Usage {
        user: usize,
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
    /// Moves the clock (a little back sometimes, as replicas' clocks disagree).
    Clock(i64),
}

fn take() -> impl Strategy<Value = Take> {
    (0..USERS, 0..FEATURES.len(), 0..KEYS, 1..=3i64).prop_map(|(user, feature, key, units)| Take {
        user,
        feature,
        key,
        units,
    })
}

fn step() -> impl Strategy<Value = Step> {
    let limit = prop_oneof![Just(Limit::Unlimited), (0..=4i64).prop_map(Limit::Units)];
    let clock = prop_oneof![
        Just(0),
        Just(1),
        Just(SECOND),
        Just(-SECOND),
        Just(WINDOW_US - 1),
        Just(WINDOW_US),
        Just(WINDOW_US + 1),
        Just(WINDOW_US / 2),
        0..WINDOW_US,
    ];
    prop_oneof![
        8 => take().prop_map(Step::Consume),
        2 => proptest::collection::vec(take(), 2..6).prop_map(|takes| {
            let mut seen = Vec::new();
            Step::ConsumeTogether(
                takes
                    .into_iter()
                    .filter(|t| {
                        let pair = (t.user, t.feature);
                        let fresh = !seen.contains(&pair);
                        seen.push(pair);
                        fresh
                    })
                    .collect(),
            )
        }),
        3 => (0..USERS, 0..FEATURES.len(), 0..KEYS)
            .prop_map(|(user, feature, key)| Step::Release { user, feature, key }),
        2 => (0..USERS, 0..FEATURES.len()).prop_map(|(user, feature)| Step::Ask { user, feature }),
        1 => (0..USERS).prop_map(|user| Step::Usage { user }),
        1 => (0..USERS, 0..TIERS.len()).prop_map(|(user, tier)| Step::SetTier { user, tier }),
        1 => (0..USERS, 0..FEATURES.len(), proptest::option::of(limit))
            .prop_map(|(user, feature, limit)| Step::SetOverride { user, feature, limit }),
        3 => clock.prop_map(Step::Clock),
    ]
}

/// One history on one store, with the user ids of its own case.
struct Replay<'a> {
    store: &'a Arc<dyn QuotaStore>,
    case: u64,
    concurrent: bool,
}

impl Replay<'_> {
    fn user(&self, user: usize) -> String {
        format!("case-{}-user-{user}", self.case)
    }

    async fn consume(&self, take: &Take, now_us: i64) -> String {
        let (feature, tier_limits) = FEATURES[take.feature];
        let user = self.user(take.user);
        let key = format!("key-{}", take.key);
        let request = Consume {
            user_id: &user,
            feature,
            key: &key,
            units: take.units,
            tier_limits,
            now_us,
            cutoff_us: cutoff_us(now_us),
        };
        format!("{:?}", self.store.consume(&request).await.unwrap())
    }

    /// Runs every step and answers what each one answered, in order.
    async fn run(&self, steps: &[Step]) -> Vec<String> {
        let mut now_us = T0;
        let mut answers = Vec::with_capacity(steps.len());
        for step in steps {
            let answer = match step {
                Step::Consume(take) => self.consume(take, now_us).await,
                Step::ConsumeTogether(takes) => {
                    let replies = if self.concurrent {
                        join_all(takes.iter().map(|t| self.consume(t, now_us))).await
                    } else {
                        let mut replies = Vec::new();
                        for take in takes {
                            replies.push(self.consume(take, now_us).await);
                        }
                        replies
                    };
                    replies.join("; ")
                }
                Step::Release { user, feature, key } => {
                    let released = self
                        .store
                        .release(
                            &self.user(*user),
                            FEATURES[*feature].0,
                            &format!("key-{key}"),
                            cutoff_us(now_us),
                        )
                        .await
                        .unwrap();
                    format!("released {released:?}")
                }
                Step::Ask { user, feature } => {
                    let context = self
                        .store
                        .check_context(
                            &self.user(*user),
                            FEATURES[*feature].0,
                            Some(cutoff_us(now_us)),
                        )
                        .await
                        .unwrap();
                    format!("{context:?}")
                }
                Step::Usage { user } => {
                    let usage = self
                        .store
                        .usage(&self.user(*user), cutoff_us(now_us))
                        .await
                        .unwrap();
                    let mut usage: Vec<_> = usage.into_iter().collect();
                    usage.sort_by(|a, b| a.0.cmp(&b.0));
                    format!("{usage:?}")
                }
                Step::SetTier { user, tier } => {
                    let previous = self
                        .store
                        .set_tier(&self.user(*user), TIERS[*tier], now_us)
                        .await
                        .unwrap();
                    format!("previous tier {previous:?}")
                }
                Step::SetOverride {
                    user,
                    feature,
                    limit: Some(limit),
                } => {
                    self.store
                        .set_override(&self.user(*user), FEATURES[*feature].0, *limit, now_us)
                        .await
                        .unwrap();
                    "override set".to_owned()
                }
                Step::SetOverride {
                    user,
                    feature,
                    limit: None,
                } => {
                    let cleared = self
                        .store
                        .clear_override(&self.user(*user), FEATURES[*feature].0)
                        .await
                        .unwrap();
                    format!("cleared {cleared}")
                }
                Step::Clock(delta_us) => {
                    now_us += delta_us;
                    format!("now {now_us}")
                }
            };
            answers.push(answer);
        }
        answers
    }
}

#[test]
fn postgres_and_the_rules_answer_every_history_alike() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_pg_db, _sqlite_db, postgres, sqlite) = runtime.block_on(async {
        let pg_db = ScratchDb::new(Backend::Postgres, "quota_equiv").await;
        let sqlite_db = ScratchDb::new(Backend::Sqlite, "quota_equiv").await;
        let postgres = store::open(&pg_db.url, store::DEFAULT_BATCH_WORKERS)
            .await
            .unwrap();
        let sqlite = store::open(&sqlite_db.url, 1).await.unwrap();
        (pg_db, sqlite_db, postgres, sqlite)
    });
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let next_case = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(&proptest::collection::vec(step(), 1..60), |steps| {
        let case = next_case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (on_postgres, on_sqlite) = runtime.block_on(async {
            let pg = Replay {
                store: &postgres,
                case,
                concurrent: true,
            };
            let lite = Replay {
                store: &sqlite,
                case,
                concurrent: false,
            };
            (pg.run(&steps).await, lite.run(&steps).await)
        });
        for (index, (pg, lite)) in on_postgres.iter().zip(&on_sqlite).enumerate() {
            if pg != lite {
                return Err(TestCaseError::fail(format!(
                    "step {index} ({:?}): PostgreSQL answered {pg}, SQLite (the rules) {lite}",
                    steps[index]
                )));
            }
        }
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}
