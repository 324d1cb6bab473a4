//! What quota-svc refuses, and how: identifiers it could not store are refused before
//! any SQL with the workspace's one rule (`reeve_runtime::ids`), and a database that is
//! busy answers a retryable status, never INTERNAL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use reeve_testkit::on_both_stores;

use common::{Backend, TestDb, client};
use reeve_proto::quota::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

on_both_stores!(
    control_characters_in_ids_are_refused_before_any_sql,
    ids_follow_the_shared_length_rule,
);

fn consume(user: &str, feature: &str, key: &str) -> pb::CheckQuotaRequest {
    pb::CheckQuotaRequest {
        user_id: user.into(),
        feature: feature.into(),
        consume: 1,
        idempotency_key: key.into(),
    }
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// Drops quota-svc's tables under the running server: from then on any request that
/// reaches SQL fails, so an INVALID_ARGUMENT proves the refusal came first.
async fn drop_tables(db: &TestDb) {
    const DROP: &str = "DROP TABLE quota_consumptions; DROP TABLE quota_counters; \
                        DROP TABLE quota_overrides; DROP TABLE quota_tiers";
    if db.url.starts_with("postgres") {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
            .await
            .unwrap();
        sqlx::raw_sql(DROP).execute(&mut conn).await.unwrap();
    } else {
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db.url)
            .await
            .unwrap();
        sqlx::raw_sql(DROP).execute(&mut conn).await.unwrap();
    }
}

async fn control_characters_in_ids_are_refused_before_any_sql(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    drop_tables(&db).await;
    for (bad, wanted) in [
        ("a\0b", "INVALID_USER_ID"),
        ("line\nbreak", "INVALID_USER_ID"),
        ("del\u{7f}", "INVALID_USER_ID"),
        ("c1\u{85}", "INVALID_USER_ID"),
    ] {
        let status = quota
            .check_quota(consume(bad, "ab_tests", "k"))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::InvalidArgument, wanted),
            "{bad:?}"
        );
        let status = quota
            .get_usage(pb::GetUsageRequest {
                user_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::InvalidArgument, wanted)
        );
        let status = quota
            .set_tier(pb::SetTierRequest {
                user_id: bad.into(),
                tier: "pro".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::InvalidArgument, wanted)
        );
    }
    for bad in ["k\0", "tab\there", "\u{9f}"] {
        let status = quota
            .check_quota(consume("u", "ab_tests", bad))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::InvalidArgument, "INVALID_IDEMPOTENCY_KEY"),
            "{bad:?}"
        );
        let status = quota
            .release(pb::ReleaseRequest {
                user_id: "u".into(),
                feature: "ab_tests".into(),
                idempotency_key: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::InvalidArgument, "INVALID_IDEMPOTENCY_KEY"),
            "{bad:?}"
        );
        // A question carries no key, but a key it carries must still be storable.
        let mut question = consume("u", "ab_tests", bad);
        question.consume = 0;
        let status = quota.check_quota(question).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
    }
    for bad in ["ab_tests\0", "\0", "ab\ntests"] {
        let status = quota.check_quota(consume("u", bad, "k")).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        let status = quota
            .set_override(pb::SetOverrideRequest {
                user_id: "u".into(),
                feature: bad.into(),
                limit: Some(pb::Limit {
                    unlimited: true,
                    units: 0,
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
    }
    // The refused message never echoes the value.
    let status = quota
        .check_quota(consume("secret\0value", "ab_tests", "k"))
        .await
        .unwrap_err();
    assert!(!status.message().contains("secret"), "{}", status.message());
}

/// User ids are 1 to 128 characters and keys 1 to 256 characters, counted as
/// characters (not bytes), as everywhere else in Reeve.
async fn ids_follow_the_shared_length_rule(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    let status = quota
        .check_quota(consume(&"u".repeat(129), "ab_tests", "k"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::InvalidArgument, "INVALID_USER_ID")
    );
    let longest_user = "ü".repeat(128);
    let longest_key = "ключ".repeat(64);
    let reply = quota
        .check_quota(consume(&longest_user, "ab_tests", &longest_key))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.allowed && !reply.duplicate);
    let status = quota
        .check_quota(consume("u", "ab_tests", &"k".repeat(257)))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::InvalidArgument, "INVALID_IDEMPOTENCY_KEY")
    );
}

/// Another process holds SQLite's write lock past the busy timeout: the consume, the
/// release answer UNAVAILABLE (retry later), not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_sqlite_database_answers_unavailable() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = db.start().await;
    let addr = server.local_addr;
    let mut quota = client(addr).await;
    assert!(
        quota
            .check_quota(consume("busy", "ab_tests", "first"))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let mut holder = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE; UPDATE quota_counters SET used = used")
        .execute(&mut holder)
        .await
        .unwrap();
    let consumed = tokio::spawn(async move {
        client(addr)
            .await
            .check_quota(consume("busy", "ab_tests", "second"))
            .await
    });
    let released = tokio::spawn(async move {
        client(addr)
            .await
            .release(pb::ReleaseRequest {
                user_id: "busy".into(),
                feature: "ab_tests".into(),
                idempotency_key: "first".into(),
            })
            .await
    });
    let consumed = consumed.await.unwrap().unwrap_err();
    assert_eq!(consumed.code(), Code::Unavailable, "{consumed:?}");
    let released = released.await.unwrap().unwrap_err();
    assert_eq!(released.code(), Code::Unavailable, "{released:?}");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    let retried = quota
        .check_quota(consume("busy", "ab_tests", "second"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((retried.allowed, retried.used), (true, 2));
}

/// A counter or tier row held by a stuck transaction elsewhere: a release or a tier
/// change gives up after the lock timeout with UNAVAILABLE instead of waiting for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_or_tier_change_of_a_held_row_answers_unavailable() {
    let db = TestDb::new(Backend::Postgres).await;
    let server = db.start().await;
    let addr = server.local_addr;
    let mut quota = client(addr).await;
    assert!(
        quota
            .check_quota(consume("held", "ab_tests", "first"))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    quota
        .set_tier(pb::SetTierRequest {
            user_id: "held".into(),
            tier: "pro".into(),
        })
        .await
        .unwrap();
    let mut holder = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::raw_sql(
        "BEGIN; SELECT used FROM quota_counters WHERE user_id = 'held' FOR UPDATE; \
         SELECT tier FROM quota_tiers WHERE user_id = 'held' FOR UPDATE",
    )
    .execute(&mut holder)
    .await
    .unwrap();
    let release = quota.release(pb::ReleaseRequest {
        user_id: "held".into(),
        feature: "ab_tests".into(),
        idempotency_key: "first".into(),
    });
    let status = tokio::time::timeout(Duration::from_secs(15), release)
        .await
        .expect("a release must not wait for a held row for good")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let tier = quota.set_tier(pb::SetTierRequest {
        user_id: "held".into(),
        tier: "free".into(),
    });
    let status = tokio::time::timeout(Duration::from_secs(15), tier)
        .await
        .expect("a tier change must not wait for a held row for good")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    let given = quota
        .release(pb::ReleaseRequest {
            user_id: "held".into(),
            feature: "ab_tests".into(),
            idempotency_key: "first".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((given.released, given.units), (true, 1));
}

/// Real PostgreSQL contention (a lock wait past `lock_timeout`, a deadlock, a
/// serialization failure) is classified as a retryable `StoreError::Unavailable`,
/// which the service answers as UNAVAILABLE, never INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_contention_errors_are_retryable() {
    use quota_svc::store::StoreError;
    use sqlx::Connection;

    let db = TestDb::new(Backend::Postgres).await;
    let mut a = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut b = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE contention (id INT PRIMARY KEY, v INT NOT NULL); \
         INSERT INTO contention VALUES (1, 0), (2, 0)",
    )
    .execute(&mut a)
    .await
    .unwrap();
    let retryable = |error: sqlx::Error| {
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert!(
            matches!(StoreError::from(error), StoreError::Unavailable(_)),
            "SQLSTATE {code:?} must be retryable"
        );
        code
    };

    // Lock timeout (55P03).
    sqlx::raw_sql("BEGIN; UPDATE contention SET v = 1 WHERE id = 1")
        .execute(&mut a)
        .await
        .unwrap();
    let error =
        sqlx::raw_sql("SET lock_timeout = '100ms'; UPDATE contention SET v = 2 WHERE id = 1")
            .execute(&mut b)
            .await
            .unwrap_err();
    assert_eq!(retryable(error).as_deref(), Some("55P03"));
    sqlx::raw_sql("ROLLBACK; RESET lock_timeout")
        .execute(&mut a)
        .await
        .unwrap();
    sqlx::raw_sql("RESET lock_timeout")
        .execute(&mut b)
        .await
        .unwrap();

    // Deadlock (40P01): each holds one row and wants the other's.
    sqlx::raw_sql("BEGIN; UPDATE contention SET v = 1 WHERE id = 1")
        .execute(&mut a)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; UPDATE contention SET v = 1 WHERE id = 2")
        .execute(&mut b)
        .await
        .unwrap();
    let (first, second) = tokio::join!(
        sqlx::raw_sql("UPDATE contention SET v = 2 WHERE id = 2").execute(&mut a),
        sqlx::raw_sql("UPDATE contention SET v = 2 WHERE id = 1").execute(&mut b),
    );
    let error = first
        .err()
        .or(second.err())
        .expect("one side is the victim");
    assert_eq!(retryable(error).as_deref(), Some("40P01"));
    sqlx::raw_sql("ROLLBACK").execute(&mut a).await.unwrap();
    sqlx::raw_sql("ROLLBACK").execute(&mut b).await.unwrap();

    // Serialization failure (40001): a row changed under a repeatable-read snapshot.
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT v FROM contention WHERE id = 1")
        .execute(&mut a)
        .await
        .unwrap();
    sqlx::raw_sql("UPDATE contention SET v = 3 WHERE id = 1")
        .execute(&mut b)
        .await
        .unwrap();
    let error = sqlx::raw_sql("UPDATE contention SET v = 4 WHERE id = 1")
        .execute(&mut a)
        .await
        .unwrap_err();
    assert_eq!(retryable(error).as_deref(), Some("40001"));
    sqlx::raw_sql("ROLLBACK").execute(&mut a).await.unwrap();
}
