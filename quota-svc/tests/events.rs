//! `quota.threshold_reached` (issue 12) on PostgreSQL and SQLite: written in the
//! consume's transaction, once per mark (80% and 100% of the limit in the window)
//! whatever the concurrency, and again only after usage fell below a mark.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, SECOND, T0, TestDb, client};
use futures::future::join_all;
use quota_svc::events::QUOTA_THRESHOLD_REACHED;
use reeve_proto::quota::v1 as pb;
use reeve_testkit::on_both_stores;

on_both_stores!(concurrent_consumes_tell_each_mark_once);

async fn threshold_events(db: &TestDb) -> Vec<serde_json::Value> {
    reeve_events::EventStore::open(&db.url)
        .await
        .unwrap()
        .outbox(0, 1_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == QUOTA_THRESHOLD_REACHED)
        .map(|e| e.body)
        .collect()
}

fn consume(key: &str) -> pb::CheckQuotaRequest {
    pb::CheckQuotaRequest {
        user_id: "erin".into(),
        feature: "agent_creations".into(),
        consume: 1,
        idempotency_key: key.into(),
    }
}

async fn concurrent_consumes_tell_each_mark_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = db.start().await;
    let mut quota = client(server.local_addr).await;
    quota
        .set_override(pb::SetOverrideRequest {
            user_id: "erin".into(),
            feature: "agent_creations".into(),
            limit: Some(pb::Limit {
                unlimited: false,
                units: 10,
            }),
        })
        .await
        .unwrap();
    let calls = (0..25).map(|i| {
        let mut quota = quota.clone();
        async move { quota.check_quota(consume(&format!("k{i}"))).await.unwrap() }
    });
    let allowed = join_all(calls)
        .await
        .iter()
        .filter(|r| r.get_ref().allowed)
        .count();
    assert_eq!(allowed, 10);
    // A duplicate tells nothing.
    quota.check_quota(consume("k0")).await.unwrap();
    let events = threshold_events(&db).await;
    let mut percents: Vec<i64> = events
        .iter()
        .map(|e| e["data"]["percent"].as_i64().unwrap())
        .collect();
    percents.sort_unstable();
    assert_eq!(percents, vec![80, 100], "{events:#?}");
    for event in &events {
        assert_eq!(event["data"]["user_id"], "erin");
        assert_eq!(event["data"]["feature"], "agent_creations");
        assert_eq!(event["data"]["limit"], 10);
        assert!(event["id"].as_str().unwrap().starts_with("evt_"));
    }
    // Thirty-one days later the window is empty: the marks are told again.
    db.clock.set(T0 + 31 * 86_400 * SECOND);
    for i in 0..10 {
        assert!(
            quota
                .check_quota(consume(&format!("later{i}")))
                .await
                .unwrap()
                .get_ref()
                .allowed
        );
    }
    assert_eq!(threshold_events(&db).await.len(), 4);
}
