//! Quota guarantees over real gRPC on loopback, on PostgreSQL and on SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use reeve_testkit::on_both_stores;

use common::{Backend, Client, SECOND, T0, TestDb, client};
use futures::future::join_all;
use quota_svc::window::WINDOW_US;
use reeve_client::{GuardError, QuotaGuard};
use reeve_proto::quota::v1 as pb;
use tonic::Code;

on_both_stores!(
    concurrent_consumes_allow_exactly_the_limit,
    a_unit_counts_until_exactly_thirty_days_later,
    enterprise_is_unlimited_but_still_counted,
    tier_and_override_changes_apply_to_the_next_check,
    unknown_features_and_tiers_are_refused,
    retried_consume_counts_once_and_release_gives_back_once,
    the_guard_maps_refusals_to_http_statuses,
    mixed_concurrent_consumes_count_each_key_once_per_feature,
    a_consume_retried_after_its_release_is_counted_again,
    a_consume_retried_after_its_release_is_refused_when_full,
    a_key_that_left_the_window_is_counted_again,
    a_release_after_the_window_gives_back_nothing,
);

fn consume(user: &str, feature: &str, key: &str) -> pb::CheckQuotaRequest {
    pb::CheckQuotaRequest {
        user_id: user.into(),
        feature: feature.into(),
        consume: 1,
        idempotency_key: key.into(),
    }
}

fn ask(user: &str, feature: &str) -> pb::CheckQuotaRequest {
    pb::CheckQuotaRequest {
        user_id: user.into(),
        feature: feature.into(),
        consume: 0,
        idempotency_key: String::new(),
    }
}

async fn check(client: &mut Client, request: pb::CheckQuotaRequest) -> pb::CheckQuotaResponse {
    client.check_quota(request).await.unwrap().into_inner()
}

async fn feature_usage(client: &mut Client, user: &str, feature: &str) -> pb::FeatureUsage {
    let usage = client
        .get_usage(pb::GetUsageRequest {
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.features.len(), 23);
    usage
        .features
        .into_iter()
        .find(|f| f.feature == feature)
        .unwrap()
}

fn seconds(us: i64) -> i64 {
    us / SECOND
}

/// 100 concurrent consumes of `agent_creations` (free limit 3) spread over `servers`.
async fn race_agent_creations(addrs: &[std::net::SocketAddr], user: &str) -> usize {
    let calls = (0..100).map(|i| {
        let addr = addrs[i % addrs.len()];
        let user = user.to_owned();
        async move {
            client(addr)
                .await
                .check_quota(consume(&user, "agent_creations", &format!("req-{i}")))
                .await
                .unwrap()
                .into_inner()
        }
    });
    join_all(calls)
        .await
        .into_iter()
        .filter(|r| r.allowed)
        .count()
}

async fn concurrent_consumes_allow_exactly_the_limit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    assert_eq!(
        race_agent_creations(&[server.local_addr], "free-user").await,
        3
    );
    let mut admin = client(server.local_addr).await;
    let usage = feature_usage(&mut admin, "free-user", "agent_creations").await;
    assert_eq!((usage.used, usage.remaining), (3, 0));
    assert_eq!(
        usage.limit,
        Some(pb::Limit {
            unlimited: false,
            units: 3
        })
    );
    assert_eq!(usage.next_free_at.unwrap().seconds, seconds(T0 + WINDOW_US));
    let reply = check(&mut admin, ask("free-user", "agent_creations")).await;
    assert!(!reply.allowed);
    assert_eq!(reply.tier, "free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_still_allow_exactly_the_limit() {
    let db = TestDb::new(Backend::Postgres).await;
    let first = db.start().await;
    let second = db.start().await;
    assert_eq!(
        race_agent_creations(&[first.local_addr, second.local_addr], "shared-user").await,
        3
    );
    let usage = feature_usage(
        &mut client(second.local_addr).await,
        "shared-user",
        "agent_creations",
    )
    .await;
    assert_eq!(usage.used, 3);
}

async fn a_unit_counts_until_exactly_thirty_days_later(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    // video_generations: free limit 2. One unit at T0, one at T0 + 10 s.
    assert!(
        check(&mut quota, consume("w", "video_generations", "a"))
            .await
            .allowed
    );
    db.clock.set(T0 + 10 * SECOND);
    assert!(
        check(&mut quota, consume("w", "video_generations", "b"))
            .await
            .allowed
    );
    let refused = check(&mut quota, consume("w", "video_generations", "c")).await;
    assert!(!refused.allowed);
    assert_eq!(
        refused.next_free_at.unwrap().seconds,
        seconds(T0 + WINDOW_US)
    );

    db.clock.set(T0 + WINDOW_US - SECOND);
    let still = check(&mut quota, ask("w", "video_generations")).await;
    assert_eq!((still.used, still.allowed), (2, false));
    assert!(
        !check(&mut quota, consume("w", "video_generations", "c"))
            .await
            .allowed
    );

    db.clock.set(T0 + WINDOW_US);
    let freed = check(&mut quota, ask("w", "video_generations")).await;
    assert_eq!((freed.used, freed.remaining, freed.allowed), (1, 1, true));
    let taken = check(&mut quota, consume("w", "video_generations", "c")).await;
    assert_eq!((taken.allowed, taken.used), (true, 2));
    // Now full again; the oldest counted unit is the one from T0 + 10 s.
    assert_eq!(
        taken.next_free_at.unwrap().seconds,
        seconds(T0 + 10 * SECOND + WINDOW_US)
    );
    let usage = feature_usage(&mut quota, "w", "video_generations").await;
    assert_eq!(usage.used, 2);
}

async fn enterprise_is_unlimited_but_still_counted(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    quota
        .set_tier(pb::SetTierRequest {
            user_id: "big".into(),
            tier: "enterprise".into(),
        })
        .await
        .unwrap();
    for i in 0..30 {
        let reply = check(
            &mut quota,
            consume("big", "agent_creations", &format!("k{i}")),
        )
        .await;
        assert!(reply.allowed);
        assert_eq!(
            reply.limit,
            Some(pb::Limit {
                unlimited: true,
                units: 0
            })
        );
        assert!(reply.next_free_at.is_none());
    }
    let usage = feature_usage(&mut quota, "big", "agent_creations").await;
    assert_eq!(usage.used, 30);
    assert!(usage.limit.unwrap().unlimited);
}

async fn tier_and_override_changes_apply_to_the_next_check(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    let user = "mover";
    let tier = quota
        .get_tier(pb::GetTierRequest {
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tier.tier, "free");
    for i in 0..3 {
        assert!(
            check(
                &mut quota,
                consume(user, "agent_creations", &format!("a{i}"))
            )
            .await
            .allowed
        );
    }
    assert!(
        !check(&mut quota, consume(user, "agent_creations", "a3"))
            .await
            .allowed
    );

    let set = |limit: pb::Limit| pb::SetOverrideRequest {
        user_id: user.into(),
        feature: "agent_creations".into(),
        limit: Some(limit),
    };
    quota
        .set_override(set(pb::Limit {
            unlimited: false,
            units: 4,
        }))
        .await
        .unwrap();
    let raised = check(&mut quota, consume(user, "agent_creations", "a3")).await;
    assert_eq!(
        (raised.allowed, raised.used, raised.remaining),
        (true, 4, 0)
    );
    assert!(
        feature_usage(&mut quota, user, "agent_creations")
            .await
            .overridden
    );

    let cleared = quota
        .clear_override(pb::ClearOverrideRequest {
            user_id: user.into(),
            feature: "agent_creations".into(),
        })
        .await
        .unwrap();
    assert!(cleared.into_inner().cleared);
    assert!(
        !check(&mut quota, ask(user, "agent_creations"))
            .await
            .allowed
    );

    let moved = quota
        .set_tier(pb::SetTierRequest {
            user_id: user.into(),
            tier: "pro".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.previous_tier, "free");
    let pro = check(&mut quota, consume(user, "agent_creations", "a4")).await;
    assert_eq!(
        (pro.allowed, pro.tier.as_str(), pro.remaining),
        (true, "pro", 15)
    );

    quota
        .set_override(set(pb::Limit {
            unlimited: false,
            units: 0,
        }))
        .await
        .unwrap();
    assert!(
        !check(&mut quota, consume(user, "agent_creations", "a5"))
            .await
            .allowed
    );
    quota
        .set_override(set(pb::Limit {
            unlimited: true,
            units: 0,
        }))
        .await
        .unwrap();
    assert!(
        check(&mut quota, consume(user, "agent_creations", "a5"))
            .await
            .allowed
    );
    let again = quota
        .clear_override(pb::ClearOverrideRequest {
            user_id: user.into(),
            feature: "agent_creations".into(),
        })
        .await
        .unwrap();
    assert!(again.into_inner().cleared);
    let none = quota
        .clear_override(pb::ClearOverrideRequest {
            user_id: user.into(),
            feature: "agent_creations".into(),
        })
        .await
        .unwrap();
    assert!(!none.into_inner().cleared);
}

async fn unknown_features_and_tiers_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    for request in [
        ask("u", "teleportations"),
        consume("u", "teleportations", "k"),
        ask("u", ""),
    ] {
        let status = quota.check_quota(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let status = quota
        .set_tier(pb::SetTierRequest {
            user_id: "u".into(),
            tier: "gold".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("gold"));
    let status = quota
        .set_override(pb::SetOverrideRequest {
            user_id: "u".into(),
            feature: "agent_creations".into(),
            limit: Some(pb::Limit {
                unlimited: false,
                units: -1,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let no_key = pb::CheckQuotaRequest {
        user_id: "u".into(),
        feature: "ab_tests".into(),
        consume: 1,
        idempotency_key: String::new(),
    };
    assert_eq!(
        quota.check_quota(no_key).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let negative = pb::CheckQuotaRequest {
        user_id: "u".into(),
        feature: "ab_tests".into(),
        consume: -1,
        idempotency_key: "k".into(),
    };
    assert_eq!(
        quota.check_quota(negative).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut anonymous = reeve_proto::quota::v1::quota_service_client::QuotaServiceClient::new(
        common::channel(server.local_addr).await,
    );
    assert_eq!(
        anonymous
            .check_quota(ask("u", "ab_tests"))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

async fn retried_consume_counts_once_and_release_gives_back_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    let first = check(&mut quota, consume("r", "ab_tests", "job-1")).await;
    assert_eq!(
        (first.allowed, first.used, first.duplicate),
        (true, 1, false)
    );
    let retried = check(&mut quota, consume("r", "ab_tests", "job-1")).await;
    assert_eq!(
        (retried.allowed, retried.used, retried.duplicate),
        (true, 1, true)
    );
    let bigger = pb::CheckQuotaRequest {
        user_id: "r".into(),
        feature: "ab_tests".into(),
        consume: 2,
        idempotency_key: "job-1".into(),
    };
    assert_eq!(
        quota.check_quota(bigger).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let release = || pb::ReleaseRequest {
        user_id: "r".into(),
        feature: "ab_tests".into(),
        idempotency_key: "job-1".into(),
    };
    let released = quota.release(release()).await.unwrap().into_inner();
    assert_eq!((released.released, released.units), (true, 1));
    assert_eq!(check(&mut quota, ask("r", "ab_tests")).await.used, 0);
    let twice = quota.release(release()).await.unwrap().into_inner();
    assert!(!twice.released);
    assert_eq!(check(&mut quota, ask("r", "ab_tests")).await.used, 0);
    // A released key is forgotten: a late retry of that consume is a new consume,
    // counted again (never allowed uncounted).
    let late = check(&mut quota, consume("r", "ab_tests", "job-1")).await;
    assert_eq!((late.allowed, late.duplicate, late.used), (true, false, 1));
    let unknown = quota
        .release(pb::ReleaseRequest {
            user_id: "r".into(),
            feature: "ab_tests".into(),
            idempotency_key: "never".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!unknown.released);
}

async fn the_guard_maps_refusals_to_http_statuses(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let guard = QuotaGuard::new(common::channel(server.local_addr).await, common::TOKEN).unwrap();
    let first = guard
        .require("g", "team_invites", "invite-1")
        .await
        .unwrap();
    guard
        .require("g", "team_invites", "invite-2")
        .await
        .unwrap();
    let exceeded = guard
        .require("g", "team_invites", "invite-3")
        .await
        .unwrap_err();
    assert_eq!(exceeded.http_status(), 429);
    assert!(
        matches!(&exceeded, GuardError::Exceeded { reply, .. } if reply.next_free_at.is_some())
    );
    assert!(guard.release(&first).await.unwrap());
    guard
        .require("g", "team_invites", "invite-3")
        .await
        .unwrap();
    assert_eq!(
        guard
            .require("g", "no_such_feature", "x")
            .await
            .unwrap_err()
            .http_status(),
        403
    );
    let wrong_token = QuotaGuard::new(common::channel(server.local_addr).await, "nope").unwrap();
    assert_eq!(
        wrong_token
            .require("g", "team_invites", "y")
            .await
            .unwrap_err()
            .http_status(),
        503
    );
}

#[tokio::test]
async fn a_registry_file_replaces_the_default_and_bad_files_refuse_start() {
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[features.ad_generations]\nfree = 1\npro = 2\nenterprise = \"unlimited\"\n",
    )
    .unwrap();
    let mut config = db.config();
    config.registry_path = Some(good.display().to_string());
    let server = db.start_with(config.clone()).await.unwrap();
    let mut quota = client(server.local_addr).await;
    let usage = quota
        .get_usage(pb::GetUsageRequest {
            user_id: "f".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.features.len(), 1);
    assert_eq!(
        usage.features[0].limit,
        Some(pb::Limit {
            unlimited: false,
            units: 1
        })
    );
    assert_eq!(
        quota
            .check_quota(ask("f", "agent_creations"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    let bad_files = [
        (
            "[features.a]\nfree = 1\nplatinum = 2\npro = 1\nenterprise = 1\n",
            "line 3",
            "unknown tier",
        ),
        (
            "[features.a]\nfree = -1\npro = 1\nenterprise = 1\n",
            "line 2",
            "negative",
        ),
        (
            "[features.a]\nfree = 1\npro = 1\nenterprise = 1\n[features.a]\nfree = 2\n",
            "line 5",
            "a",
        ),
    ];
    for (text, line, needle) in bad_files {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        config.registry_path = Some(path.display().to_string());
        let error = db
            .start_with(config.clone())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("REEVE_QUOTA_CONFIG") && error.contains(line) && error.contains(needle),
            "{error}"
        );
    }
    config.registry_path = Some(dir.path().join("missing.toml").display().to_string());
    let error = db.start_with(config).await.err().unwrap().to_string();
    assert!(error.contains("cannot read"), "{error}");
}

/// Many users and features at once, every key sent twice concurrently (so group commit
/// puts duplicates and crossing users in the same and in concurrent batches): each
/// feature counts each key once and never more than its limit.
async fn mixed_concurrent_consumes_count_each_key_once_per_feature(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let addr = server.local_addr;
    let mut calls = Vec::new();
    for user in 0..8 {
        for (feature, keys) in [("agent_creations", 5), ("ad_generations", 6)] {
            for key in 0..keys {
                for _ in 0..2 {
                    let (user, key) = (format!("mixed-{user}"), format!("k-{key}"));
                    calls.push(async move {
                        client(addr)
                            .await
                            .check_quota(consume(&user, feature, &key))
                            .await
                            .unwrap()
                            .into_inner()
                    });
                }
            }
        }
    }
    let replies = join_all(calls).await;
    let duplicates = replies.iter().filter(|r| r.duplicate).count();
    let mut admin = client(addr).await;
    for user in 0..8 {
        let user = format!("mixed-{user}");
        // Free limits: agent_creations 3 (of 5 keys), ad_generations 10 (of 6 keys).
        assert_eq!(
            feature_usage(&mut admin, &user, "agent_creations")
                .await
                .used,
            3,
            "{user}"
        );
        assert_eq!(
            feature_usage(&mut admin, &user, "ad_generations")
                .await
                .used,
            6,
            "{user}"
        );
    }
    // Every applied key's twin came back as a duplicate: 8 users × (3 + 6) keys.
    assert_eq!(duplicates, 8 * (3 + 6));
}

/// Two replicas, many users and features at once, each key sent once: the batches of
/// both replicas lock crossing sets of counters (set-based, in one statement, when a
/// batch names six pairs or more), so this is where a lock-order mistake would
/// deadlock or a stale read would overshoot. Every pair allows exactly its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_consuming_crossing_users_allow_exactly_each_limit() {
    let db = TestDb::new(Backend::Postgres).await;
    let first = db.start().await;
    let second = db.start().await;
    // One connection per replica, shared by every call, so calls arrive together and
    // the group commits gather large batches.
    let clients = [
        client(first.local_addr).await,
        client(second.local_addr).await,
    ];
    let mut calls = Vec::new();
    for round in 0..20 {
        for user in 0..12 {
            for feature in ["agent_creations", "ad_generations"] {
                let mut client = clients[(round + user) % 2].clone();
                let (user, key) = (format!("cross-{user}"), format!("k-{round}"));
                calls.push(async move {
                    client
                        .check_quota(consume(&user, feature, &key))
                        .await
                        .unwrap()
                        .into_inner()
                });
            }
        }
    }
    let allowed = join_all(calls).await.iter().filter(|r| r.allowed).count();
    let mut admin = client(second.local_addr).await;
    for user in 0..12 {
        let user = format!("cross-{user}");
        // Free limits: agent_creations 3 and ad_generations 10, of 20 keys each.
        let agents = feature_usage(&mut admin, &user, "agent_creations").await;
        let ads = feature_usage(&mut admin, &user, "ad_generations").await;
        assert_eq!((agents.used, ads.used), (3, 10), "{user}");
    }
    assert_eq!(allowed, 12 * (3 + 10));
}

/// A counter row held by a stuck transaction elsewhere (a crashed caller, an operator's
/// open session): the consumes that need it fail as UNAVAILABLE after the lock timeout,
/// the others in the same batches still go through, and once the row is free the
/// retry counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_counter_row_fails_only_its_own_consumes() {
    let db = TestDb::new(Backend::Postgres).await;
    let server = db.start().await;
    let addr = server.local_addr;
    // Create alice's counter, then hold its lock in a transaction of our own.
    let mut alice = client(addr).await;
    assert!(
        check(&mut alice, consume("alice", "ad_generations", "first"))
            .await
            .allowed
    );
    let mut holder = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT used FROM quota_counters WHERE user_id = 'alice' AND feature = 'ad_generations' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();

    let stuck = tokio::spawn(async move {
        client(addr)
            .await
            .check_quota(consume("alice", "ad_generations", "second"))
            .await
    });
    let others = (0..6).map(|i| async move {
        client(addr)
            .await
            .check_quota(consume(&format!("user-{i}"), "ad_generations", "k"))
            .await
    });
    for reply in join_all(others).await {
        assert!(
            reply.unwrap().into_inner().allowed,
            "other users are not held up for good"
        );
    }
    let status = stuck.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let retried = check(&mut alice, consume("alice", "ad_generations", "second")).await;
    assert!(retried.allowed && !retried.duplicate);
    assert_eq!(
        feature_usage(&mut alice, "alice", "ad_generations")
            .await
            .used,
        2
    );
}

fn release(user: &str, feature: &str, key: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        user_id: user.into(),
        feature: feature.into(),
        idempotency_key: key.into(),
    }
}

/// Issue 8, item 10: consume → release → the same consume again, ten times over on a
/// limit of 3. Every allowed consume is counted; the released units come back each time.
async fn a_consume_retried_after_its_release_is_counted_again(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    for cycle in 0..10 {
        let taken = check(&mut quota, consume("c", "agent_creations", "job")).await;
        assert_eq!(
            (taken.allowed, taken.duplicate, taken.used),
            (true, false, 1),
            "cycle {cycle}"
        );
        let retried = check(&mut quota, consume("c", "agent_creations", "job")).await;
        assert_eq!(
            (retried.allowed, retried.duplicate, retried.used),
            (true, true, 1),
            "cycle {cycle}"
        );
        let given = quota
            .release(release("c", "agent_creations", "job"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((given.released, given.units), (true, 1), "cycle {cycle}");
        assert_eq!(check(&mut quota, ask("c", "agent_creations")).await.used, 0);
    }
    let usage = feature_usage(&mut quota, "c", "agent_creations").await;
    assert_eq!((usage.used, usage.remaining), (0, 3));
}

/// A released key that comes back when the window is full is refused, not waved
/// through as a duplicate.
async fn a_consume_retried_after_its_release_is_refused_when_full(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    // agent_creations: free limit 3.
    for key in ["job", "a", "b"] {
        assert!(
            check(&mut quota, consume("f", "agent_creations", key))
                .await
                .allowed
        );
    }
    let given = quota
        .release(release("f", "agent_creations", "job"))
        .await
        .unwrap()
        .into_inner();
    assert!(given.released);
    assert!(
        check(&mut quota, consume("f", "agent_creations", "c"))
            .await
            .allowed
    );
    let late = check(&mut quota, consume("f", "agent_creations", "job")).await;
    assert_eq!(
        (late.allowed, late.duplicate, late.used, late.remaining),
        (false, false, 3, 0)
    );
    assert_eq!(
        feature_usage(&mut quota, "f", "agent_creations").await.used,
        3
    );
}

/// Issue 8, item 11: a key is remembered while its units count. Once its row has left
/// the 30-day window, the same key is a new consume: counted, or refused when full.
async fn a_key_that_left_the_window_is_counted_again(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    // video_generations: free limit 2. "old" at T0, "mid" at T0 + 10 s.
    assert!(
        check(&mut quota, consume("o", "video_generations", "old"))
            .await
            .allowed
    );
    db.clock.set(T0 + 10 * SECOND);
    assert!(
        check(&mut quota, consume("o", "video_generations", "mid"))
            .await
            .allowed
    );
    // One second before the edge "old" still counts: its retry is a duplicate.
    db.clock.set(T0 + WINDOW_US - SECOND);
    let inside = check(&mut quota, consume("o", "video_generations", "old")).await;
    assert_eq!(
        (inside.allowed, inside.duplicate, inside.used),
        (true, true, 2)
    );
    // At the edge it has left: the retry is counted as new.
    db.clock.set(T0 + WINDOW_US);
    let again = check(&mut quota, consume("o", "video_generations", "old")).await;
    assert_eq!(
        (again.allowed, again.duplicate, again.used),
        (true, false, 2)
    );
    assert!(
        !check(&mut quota, consume("o", "video_generations", "new"))
            .await
            .allowed
    );
    // "mid" leaves too; the window now holds only the second "old".
    db.clock.set(T0 + 10 * SECOND + WINDOW_US);
    let mid = check(&mut quota, consume("o", "video_generations", "mid")).await;
    assert_eq!((mid.allowed, mid.duplicate, mid.used), (true, false, 2));
    let full = check(&mut quota, consume("o", "video_generations", "old")).await;
    assert_eq!((full.allowed, full.duplicate, full.used), (true, true, 2));
    assert_eq!(
        feature_usage(&mut quota, "o", "video_generations")
            .await
            .used,
        2
    );
}

/// A release of a key whose units no longer count gives back nothing, and the live
/// usage is not moved by it.
async fn a_release_after_the_window_gives_back_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    assert!(
        check(&mut quota, consume("e", "ab_tests", "early"))
            .await
            .allowed
    );
    db.clock.set(T0 + 10 * SECOND);
    assert!(
        check(&mut quota, consume("e", "ab_tests", "late"))
            .await
            .allowed
    );
    // "early" has left the window (its row not yet pruned: no consume since).
    db.clock.set(T0 + WINDOW_US);
    let given = quota
        .release(release("e", "ab_tests", "early"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((given.released, given.units), (false, 0));
    assert_eq!(check(&mut quota, ask("e", "ab_tests")).await.used, 1);
}
