//! Holds through the client against a real credits-svc on PostgreSQL: the metered call
//! settles a call's cost once through the recorder's SettleHoldBatch flush, releases
//! on error and on drop, and nothing (a resend, a retry, a replay, a reused hold id)
//! charges a call twice; a settle the hold's stored outcome refuses reaches the
//! outcome handler and is not retried.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{CREDIT, Credits};
use reeve_client::{ItemOutcome, Meter, MeteredError, Outcome, Recorder, Reservation, RetryPolicy};
use reeve_proto::credits::v1 as pb;

fn collect() -> (
    Arc<Mutex<Vec<ItemOutcome>>>,
    impl Fn(ItemOutcome) + Send + Sync + 'static,
) {
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&outcomes);
    (outcomes, move |o| sink.lock().unwrap().push(o))
}

fn cost_of(i: i64) -> i64 {
    1_000 + i * 7
}

async fn hold(credits: &Credits, user_id: &str, hold_id: &str, amount_micros: i64) {
    credits
        .connection()
        .credits()
        .hold(pb::HoldRequest {
            user_id: user_id.to_owned(),
            hold_id: hold_id.to_owned(),
            amount_micros,
            ttl_seconds: 600,
            description: String::new(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metered_call_settles_the_reported_cost_once_through_settle_hold_batch() {
    const CALLS: i64 = 60;
    let credits = Credits::start().await;
    credits.grant("alice", 10 * CREDIT).await;
    let (outcomes, handler) = collect();
    let recorder = Recorder::builder(credits.connection().credits())
        .batch_items(25)
        .on_outcome(handler)
        .start()
        .unwrap();
    let meter = Meter::new(credits.connection().credits(), recorder.clone());
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let meter = meter.clone();
            tokio::spawn(async move {
                meter
                    .call(
                        Reservation::new("alice", format!("call-{i}"), CREDIT / 10),
                        |held| async move {
                            assert_eq!(held.amount_micros(), CREDIT / 10);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Ok::<_, String>((i, cost_of(i)))
                        },
                    )
                    .await
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), i as i64);
    }
    recorder.close().await.unwrap();

    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), CALLS as usize, "one outcome per call");
    for item in &outcomes {
        assert!(
            matches!(
                item.outcome,
                Outcome::Settled {
                    duplicate: false,
                    shortfall_micros: 0,
                    late: false,
                    ..
                }
            ),
            "{item:?}"
        );
    }
    assert!(recorder.stats().batches.load(Ordering::Relaxed) >= 3);
    let entries = credits.settle_entries().await;
    assert_eq!(entries.len(), CALLS as usize);
    let mut charged = 0;
    for i in 0..CALLS {
        assert_eq!(entries[&format!("call-{i}")], (1, cost_of(i)), "call-{i}");
        charged += cost_of(i);
        let hold = credits.hold(&format!("call-{i}")).await;
        assert_eq!(hold.status(), pb::HoldStatus::Settled);
        assert_eq!(hold.settled_micros, cost_of(i));
    }
    assert_eq!(
        credits.balance("alice").await,
        (10 * CREDIT - charged, 0, 10 * CREDIT - charged),
        "the rest of every hold was freed"
    );
    assert_eq!(
        credits.audit("alice").await,
        (1 + CALLS, 10 * CREDIT - charged)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_releases_its_hold_a_dropped_one_too_and_neither_charges() {
    let credits = Credits::start().await;
    credits.grant("bob", CREDIT).await;
    let recorder = Recorder::builder(credits.connection().credits())
        .start()
        .unwrap();
    let meter = Meter::new(credits.connection().credits(), recorder.clone());

    // The work (a long stream) extends its hold, then fails: released before the
    // error is returned.
    let failed = meter
        .call(
            Reservation::new("bob", "failing", CREDIT / 2),
            |held| async move {
                let granted = held.hold().expires_at.unwrap().seconds;
                let extended = held.extend(Duration::from_secs(3_600)).await.unwrap();
                assert!(extended.expires_at.unwrap().seconds >= granted + 2_900);
                Err::<((), i64), _>("model down")
            },
        )
        .await;
    assert!(matches!(failed, Err(MeteredError::Work("model down"))));
    assert_eq!(
        credits.hold("failing").await.status(),
        pb::HoldStatus::Released
    );

    // The caller's future is dropped while the work runs (a client hung up).
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let call = {
        let meter = meter.clone();
        tokio::spawn(async move {
            meter
                .call(
                    Reservation::new("bob", "dropped", CREDIT / 2),
                    |_| async move {
                        started_tx.send(()).unwrap();
                        std::future::pending::<Result<((), i64), String>>().await
                    },
                )
                .await
        })
    };
    started.await.unwrap();
    assert_eq!(
        credits.balance("bob").await,
        (CREDIT, CREDIT / 2, CREDIT / 2)
    );
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    let mut status = pb::HoldStatus::Held;
    for _ in 0..100 {
        status = credits.hold("dropped").await.status();
        if status != pb::HoldStatus::Held {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, pb::HoldStatus::Released);

    // More than available: refused before the work runs.
    let ran = AtomicBool::new(false);
    let refused = meter
        .call(Reservation::new("bob", "too-big", 2 * CREDIT), |_| async {
            ran.store(true, Ordering::SeqCst);
            Ok::<_, String>(((), 1))
        })
        .await;
    assert!(
        matches!(
            refused,
            Err(MeteredError::Insufficient {
                balance_micros: CREDIT,
                held_micros: 0,
                required_micros,
            }) if required_micros == 2 * CREDIT
        ),
        "{refused:?}"
    );
    assert!(!ran.load(Ordering::SeqCst));

    recorder.close().await.unwrap();
    assert_eq!(recorder.stats().accepted.load(Ordering::Relaxed), 0);
    assert!(credits.settle_entries().await.is_empty());
    assert_eq!(credits.balance("bob").await, (CREDIT, 0, CREDIT));
    assert_eq!(credits.audit("bob").await, (1, CREDIT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_retried_replayed_and_reused_settles_never_charge_twice() {
    const HELD: i64 = 150;
    let mut credits = Credits::start().await;
    credits.grant("carol", 100 * CREDIT).await;
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("recorder.wal");
    let (outcomes, handler) = collect();
    let recorder = Recorder::builder(credits.connection().credits())
        .batch_items(50)
        .backoff(RetryPolicy {
            max_attempts: u32::MAX,
            base_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
        })
        .write_ahead_file(&wal)
        .on_outcome(handler)
        .start()
        .unwrap();
    let meter = Meter::new(credits.connection().credits(), recorder.clone());

    // One call, then its settle recorded twice more and sent once directly.
    meter
        .call(Reservation::new("carol", "once", CREDIT), |_| async {
            Ok::<_, String>(((), 3_000))
        })
        .await
        .unwrap();
    recorder.settle("once", "carol", 3_000).await.unwrap();
    recorder.settle("once", "carol", 3_000).await.unwrap();
    let direct = credits
        .connection()
        .credits()
        .settle_hold(pb::SettleHoldRequest {
            hold_id: "once".to_owned(),
            amount_micros: 3_000,
            description: String::new(),
        })
        .await
        .unwrap();

    // The same hold id again: the call has ended, so the work does not run again.
    let ran = AtomicBool::new(false);
    let reused = meter
        .call(Reservation::new("carol", "once", CREDIT), |_| async {
            ran.store(true, Ordering::SeqCst);
            Ok::<_, String>(((), 3_000))
        })
        .await;
    assert!(
        matches!(
            reused,
            Err(MeteredError::AlreadyResolved {
                status: pb::HoldStatus::Settled,
                ..
            })
        ),
        "{reused:?}"
    );
    assert!(!ran.load(Ordering::SeqCst));

    // Settles accepted while credits-svc is down: resent with the same hold ids.
    for i in 0..HELD {
        hold(&credits, "carol", &format!("outage-{i}"), 10_000).await;
    }
    credits.stop().await;
    for i in 0..HELD {
        recorder
            .settle(format!("outage-{i}"), "carol", cost_of(i))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    credits.restart().await;
    recorder.close().await.unwrap();
    assert!(recorder.stats().retries.load(Ordering::Relaxed) > 0);
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);

    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len() as i64, 3 + HELD);
    assert!(outcomes.iter().all(|o| o.outcome.is_success()));
    let fresh = |once: bool| {
        outcomes
            .iter()
            .filter(|o| (o.charge.idempotency_key() == "once") == once)
            .filter(|o| {
                matches!(
                    o.outcome,
                    Outcome::Settled {
                        duplicate: false,
                        ..
                    }
                )
            })
            .count() as i64
    };
    // Of the four settles of "once" (three recorded, one direct, in whatever order
    // they reached the server), exactly one applied.
    assert_eq!(fresh(true) + i64::from(!direct.duplicate), 1);
    assert_eq!(fresh(false), HELD);

    // A write-ahead file replaying settles already applied (a crash after the flush,
    // before its done marks): answered as duplicates, nothing written.
    let mut lines = String::new();
    for (seq, i) in (1..).zip(0..HELD) {
        lines.push_str(&format!(
            "{{\"op\":\"settle_hold\",\"seq\":{seq},\"hold_id\":\"outage-{i}\",\"user_id\":\"carol\",\"amount_micros\":{}}}\n",
            cost_of(i)
        ));
    }
    std::fs::write(&wal, lines).unwrap();
    let (replayed, handler) = collect();
    let replay = Recorder::builder(credits.connection().credits())
        .write_ahead_file(&wal)
        .on_outcome(handler)
        .start()
        .unwrap();
    replay.close().await.unwrap();
    let replayed = replayed.lock().unwrap().clone();
    assert_eq!(replayed.len() as i64, HELD);
    assert!(replayed.iter().all(|o| matches!(
        o.outcome,
        Outcome::Settled {
            duplicate: true,
            ..
        }
    )));

    let entries = credits.settle_entries().await;
    assert_eq!(entries.len() as i64, 1 + HELD);
    assert_eq!(entries["once"], (1, 3_000));
    let mut charged = 3_000;
    for i in 0..HELD {
        assert_eq!(entries[&format!("outage-{i}")], (1, cost_of(i)));
        charged += cost_of(i);
    }
    assert_eq!(
        credits.audit("carol").await,
        (2 + HELD, 100 * CREDIT - charged)
    );
    assert_eq!(credits.balance("carol").await.1, 0, "nothing held any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_of_a_resolved_hold_reaches_the_handler_and_is_not_retried() {
    let credits = Credits::start().await;
    credits.grant("dave", 10 * CREDIT).await;
    let client = credits.connection().credits();
    hold(&credits, "dave", "released", CREDIT).await;
    client
        .release_hold(pb::ReleaseHoldRequest {
            hold_id: "released".to_owned(),
        })
        .await
        .unwrap();
    hold(&credits, "dave", "settled", CREDIT).await;
    client
        .settle_hold(pb::SettleHoldRequest {
            hold_id: "settled".to_owned(),
            amount_micros: 5_000,
            description: String::new(),
        })
        .await
        .unwrap();
    hold(&credits, "dave", "fine", CREDIT).await;

    let (outcomes, handler) = collect();
    let recorder = Recorder::builder(client.clone())
        .batch_delay(Duration::from_millis(50))
        .on_outcome(handler)
        .start()
        .unwrap();
    recorder.settle("released", "dave", 1_000).await.unwrap();
    recorder.settle("settled", "dave", 3_000).await.unwrap();
    recorder
        .settle("no-such-hold", "dave", 1_000)
        .await
        .unwrap();
    recorder.settle("fine", "dave", 2_000).await.unwrap();
    recorder.close().await.unwrap();

    let outcomes = outcomes.lock().unwrap().clone();
    let of = |key: &str| {
        outcomes
            .iter()
            .find(|o| o.charge.idempotency_key() == key)
            .unwrap()
            .outcome
            .clone()
    };
    assert_eq!(
        of("released"),
        Outcome::AlreadyResolved {
            status: pb::HoldStatus::Released,
            settled_micros: 0,
            entry_id: 0,
        }
    );
    assert!(matches!(
        of("settled"),
        Outcome::AlreadyResolved {
            status: pb::HoldStatus::Settled,
            settled_micros: 5_000,
            entry_id,
        } if entry_id > 0
    ));
    assert!(
        matches!(of("no-such-hold"), Outcome::Invalid { code, .. } if code == "hold_not_found")
    );
    assert!(matches!(
        of("fine"),
        Outcome::Settled {
            duplicate: false,
            ..
        }
    ));
    let stats = recorder.stats();
    assert_eq!(stats.retries.load(Ordering::Relaxed), 0, "never resent");
    assert_eq!(
        stats.batches.load(Ordering::Relaxed),
        1,
        "one SettleHoldBatch"
    );
    assert_eq!(
        (
            stats.succeeded.load(Ordering::Relaxed),
            stats.refused.load(Ordering::Relaxed)
        ),
        (1, 3)
    );
    let entries = credits.settle_entries().await;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries["settled"], (1, 5_000));
    assert_eq!(entries["fine"], (1, 2_000));
    assert_eq!(credits.audit("dave").await, (3, 10 * CREDIT - 7_000));
}
