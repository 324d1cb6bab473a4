//! The recorder against a real credits-svc on PostgreSQL: every accepted item is in the
//! ledger exactly once, whatever happens to the service meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{CREDIT, Credits};
use reeve_client::{ItemOutcome, Outcome, RecordError, Recorder, RetryPolicy};

fn amount_of(i: u64) -> i64 {
    1_000 + (i % 997) as i64
}

fn collect() -> (
    Arc<Mutex<Vec<ItemOutcome>>>,
    impl Fn(ItemOutcome) + Send + Sync + 'static,
) {
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&outcomes);
    (outcomes, move |o| sink.lock().unwrap().push(o))
}

/// Checks the ledger holds exactly `keys` (key → (user, amount)) as deductions, once
/// each, and that every user's balance is its grant minus its deductions.
async fn assert_ledger_holds_exactly(
    credits: &Credits,
    grant: i64,
    users: u64,
    keys: &HashMap<String, (String, i64)>,
) {
    let in_ledger = credits.deduction_keys().await;
    assert_eq!(
        in_ledger.len(),
        keys.len(),
        "deduction entries in the ledger"
    );
    for (key, count) in &in_ledger {
        assert_eq!(*count, 1, "{key} applied {count} times");
        assert!(keys.contains_key(key), "{key} was never recorded");
    }
    for u in 0..users {
        let user = format!("user-{u}");
        let mine: Vec<i64> = keys
            .values()
            .filter(|(owner, _)| *owner == user)
            .map(|(_, amount)| *amount)
            .collect();
        let (entries, balance) = credits.audit(&user).await;
        assert_eq!(entries, 1 + mine.len() as i64, "{user}: entries");
        assert_eq!(balance, grant - mine.iter().sum::<i64>(), "{user}: balance");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_records_from_256_tasks_are_in_the_ledger_exactly_once() {
    const ITEMS: u64 = 10_000;
    const USERS: u64 = 64;
    let credits = Credits::start().await;
    for u in 0..USERS {
        credits.grant(&format!("user-{u}"), 1_000 * CREDIT).await;
    }
    let (outcomes, handler) = collect();
    let recorder = Recorder::builder(credits.connection().credits())
        .on_outcome(handler)
        .start()
        .unwrap();
    let tasks: Vec<_> = (0..256u64)
        .map(|task| {
            let recorder = recorder.clone();
            tokio::spawn(async move {
                for i in (task..ITEMS).step_by(256) {
                    recorder
                        .record(
                            format!("user-{}", i % USERS),
                            amount_of(i),
                            format!("r-{i}"),
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    recorder.close().await.unwrap();

    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), ITEMS as usize);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o.outcome, Outcome::Applied { .. }))
    );
    let keys = (0..ITEMS)
        .map(|i| {
            (
                format!("r-{i}"),
                (format!("user-{}", i % USERS), amount_of(i)),
            )
        })
        .collect();
    assert_ledger_holds_exactly(&credits, 1_000 * CREDIT, USERS, &keys).await;
    assert!(matches!(
        recorder.record("user-0", 1, "after-close").await,
        Err(RecordError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_svc_down_for_ten_seconds_loses_nothing_and_doubles_nothing() {
    const ITEMS: u64 = 6_000;
    const USERS: u64 = 16;
    let mut credits = Credits::start().await;
    for u in 0..USERS {
        credits.grant(&format!("user-{u}"), 1_000 * CREDIT).await;
    }
    let (outcomes, handler) = collect();
    let recorder = Recorder::builder(credits.connection().credits())
        .batch_items(200)
        .buffer_items(1_000)
        .backoff(RetryPolicy {
            max_attempts: u32::MAX,
            base_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
        })
        .on_outcome(handler)
        .start()
        .unwrap();
    let tasks: Vec<_> = (0..32u64)
        .map(|task| {
            let recorder = recorder.clone();
            tokio::spawn(async move {
                for i in (task..ITEMS).step_by(32) {
                    recorder
                        .record(
                            format!("user-{}", i % USERS),
                            amount_of(i),
                            format!("o-{i}"),
                        )
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    credits.stop().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during_outage = recorder
        .stats()
        .accepted
        .load(std::sync::atomic::Ordering::Relaxed);
    credits.restart().await;
    for task in tasks {
        task.await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), recorder.close())
        .await
        .expect("close drains once the service is back")
        .unwrap();

    assert!(
        recorder
            .stats()
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the outage was seen"
    );
    assert!(
        during_outage < ITEMS,
        "the buffer pushed back during the outage"
    );
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), ITEMS as usize);
    assert!(
        outcomes.iter().all(|o| o.outcome.is_success()),
        "{outcomes:?}"
    );
    let keys = (0..ITEMS)
        .map(|i| {
            (
                format!("o-{i}"),
                (format!("user-{}", i % USERS), amount_of(i)),
            )
        })
        .collect();
    assert_ledger_holds_exactly(&credits, 1_000 * CREDIT, USERS, &keys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insufficient_item_reaches_the_handler_and_does_not_hold_up_the_others() {
    let credits = Credits::start().await;
    credits.grant("user-0", 100 * CREDIT).await;
    credits.grant("poor", CREDIT).await;
    let (outcomes, handler) = collect();
    let recorder = Recorder::builder(credits.connection().credits())
        .batch_items(10)
        .batch_delay(Duration::from_secs(5))
        .on_outcome(handler)
        .start()
        .unwrap();
    for i in 0..10u64 {
        if i == 4 {
            recorder.record("poor", 5 * CREDIT, "poor-1").await.unwrap();
        } else {
            recorder
                .record("user-0", CREDIT, format!("rich-{i}"))
                .await
                .unwrap();
        }
    }
    // The batch of 10 is cut at once; the next item flushes alone.
    tokio::time::timeout(Duration::from_secs(3), async {
        while outcomes.lock().unwrap().len() < 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the full batch was flushed without waiting for the delay");
    recorder.record("poor", CREDIT / 2, "poor-2").await.unwrap();
    recorder.close().await.unwrap();

    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.len(), 11);
    let refused: Vec<_> = outcomes
        .iter()
        .filter(|o| !o.outcome.is_success())
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].charge.idempotency_key(), "poor-1");
    assert_eq!(
        refused[0].outcome,
        Outcome::Insufficient {
            balance_micros: CREDIT,
            required_micros: 5 * CREDIT
        }
    );
    assert_eq!(credits.audit("user-0").await, (10, 91 * CREDIT));
    assert_eq!(credits.audit("poor").await, (2, CREDIT / 2));
    assert_eq!(
        recorder
            .stats()
            .retries
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_makes_try_record_refuse_and_record_wait() {
    let mut credits = Credits::start().await;
    credits.grant("user-0", 100 * CREDIT).await;
    credits.stop().await;
    let recorder = Recorder::builder(credits.connection().credits())
        .batch_items(1)
        .max_in_flight(1)
        .buffer_items(2)
        .start()
        .unwrap();
    // One in flight (failing), then the batcher waits for the slot: two fill the buffer.
    let mut accepted = 0;
    for i in 0..4 {
        match recorder
            .try_record("user-0", CREDIT, format!("f-{i}"))
            .await
        {
            Ok(()) => accepted += 1,
            Err(RecordError::Full) => break,
            Err(other) => panic!("{other}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        recorder.try_record("user-0", CREDIT, "f-full").await,
        Err(RecordError::Full)
    ));
    let waiting = {
        let recorder = recorder.clone();
        tokio::spawn(async move { recorder.record("user-0", CREDIT, "f-waited").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "record waits while the buffer is full"
    );
    credits.restart().await;
    waiting.await.unwrap().unwrap();
    recorder.close().await.unwrap();
    assert_eq!(
        credits.audit("user-0").await,
        (accepted + 2, (100 - accepted - 1) * CREDIT)
    );
}
