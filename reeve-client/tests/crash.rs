//! A process using the recorder, killed: with `kill -9` mid-flush (of deductions, or of
//! hold settles), its write-ahead file brings every accepted item to the ledger exactly
//! once at the next start; with SIGTERM, `close()` drains everything before the
//! process exits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use common::{CREDIT, Credits, TOKEN};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const USERS: u64 = 10;

fn probe(credits: &Credits, mode: &str, prefix: &str, wal: Option<&std::path::Path>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_reeve-recorder-probe"));
    command
        .env("PROBE_ADDR", credits.addr.to_string())
        .env("PROBE_TOKEN", TOKEN)
        .env("PROBE_MODE", mode)
        .env("PROBE_PREFIX", prefix)
        .env("PROBE_ITEMS", "200000")
        .env("PROBE_USERS", USERS.to_string())
        // Slow flushes on purpose, so a backlog is buffered when the process dies.
        .env("PROBE_BATCH_ITEMS", "20")
        .env("PROBE_BATCH_DELAY_MS", "20")
        .env("PROBE_IN_FLIGHT", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(wal) = wal {
        command.env("PROBE_WAL", wal);
    }
    command
}

/// Reads `accepted <key>` lines until `enough` were seen (then calls `stop`), and the
/// rest until the end of the output; the accepted keys and the last line.
async fn accepted_keys(
    child: &mut Child,
    enough: usize,
    stop: impl FnOnce(&mut Child),
) -> (HashSet<String>, String) {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut keys = HashSet::new();
    let mut last = String::new();
    let mut stop = Some(stop);
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the probe keeps talking")
        .unwrap()
    {
        if let Some(key) = line.strip_prefix("accepted ") {
            keys.insert(key.to_owned());
        }
        last = line;
        if keys.len() >= enough
            && let Some(stop) = stop.take()
        {
            stop(child);
        }
    }
    (keys, last)
}

fn index_of(key: &str) -> u64 {
    key.rsplit('-').next().unwrap().parse().unwrap()
}

/// Every key in the ledger was recorded by the probe, once, and every user's balance
/// is its grant minus its entries; returns the keys applied.
async fn audit(credits: &Credits, prefix: &str) -> HashSet<String> {
    let applied = credits.deduction_keys().await;
    let mut per_user = vec![(0i64, 0i64); USERS as usize];
    for (key, count) in &applied {
        assert_eq!(*count, 1, "{key} applied {count} times");
        assert!(key.starts_with(prefix), "{key} was never recorded");
        let i = index_of(key);
        per_user[(i % USERS) as usize].0 += 1;
        per_user[(i % USERS) as usize].1 += 1_000 + (i % 997) as i64;
    }
    for (u, (count, sum)) in per_user.into_iter().enumerate() {
        let (entries, balance) = credits.audit(&format!("user-{u}")).await;
        assert_eq!((entries, balance), (1 + count, 10_000 * CREDIT - sum));
    }
    applied.into_keys().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_flush_then_replay_applies_every_accepted_item_exactly_once() {
    let credits = Credits::start().await;
    for u in 0..USERS {
        credits.grant(&format!("user-{u}"), 10_000 * CREDIT).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("recorder.wal");
    let mut child = probe(&credits, "record", "crash", Some(&wal))
        .spawn()
        .unwrap();
    let (accepted, _) = accepted_keys(&mut child, 3_000, |child| {
        // SIGKILL: no handler, no flush, no close.
        child.start_kill().unwrap();
    })
    .await;
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited: {status:?}");

    let before = credits.deduction_keys().await;
    assert!(
        before.len() < accepted.len(),
        "a backlog was buffered at the kill ({} applied, {} accepted)",
        before.len(),
        accepted.len()
    );
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);

    let mut replay = probe(&credits, "replay", "crash", Some(&wal))
        .spawn()
        .unwrap();
    let (_, last) = accepted_keys(&mut replay, usize::MAX, |_| {}).await;
    assert!(replay.wait().await.unwrap().success());
    assert_eq!(last, "closed");

    let applied = audit(&credits, "crash-").await;
    let missing: Vec<_> = accepted.difference(&applied).collect();
    assert!(
        missing.is_empty(),
        "accepted but never applied: {missing:?}"
    );
    assert!(
        applied.len() > before.len(),
        "the replay applied the backlog"
    );
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        0,
        "nothing left to replay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_recorder_which_drains_before_exit() {
    let credits = Credits::start().await;
    for u in 0..USERS {
        credits.grant(&format!("user-{u}"), 10_000 * CREDIT).await;
    }
    // No write-ahead file: only close() can save the backlog.
    let mut child = probe(&credits, "record", "term", None).spawn().unwrap();
    let pid = child.id().unwrap();
    let (accepted, last) = accepted_keys(&mut child, 3_000, move |_| {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    })
    .await;
    assert!(child.wait().await.unwrap().success());
    assert_eq!(last, "closed");

    let applied = audit(&credits, "term-").await;
    let missing: Vec<_> = accepted.difference(&applied).collect();
    assert!(
        missing.is_empty(),
        "accepted but never applied: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_flush_of_settles_then_replay_applies_each_settle_exactly_once() {
    let credits = Credits::start().await;
    for u in 0..USERS {
        credits.grant(&format!("user-{u}"), 10_000 * CREDIT).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("recorder.wal");
    let mut child = probe(&credits, "record", "hcrash", Some(&wal));
    child.env("PROBE_KIND", "settle");
    let mut child = child.spawn().unwrap();
    let (accepted, _) = accepted_keys(&mut child, 2_000, |child| {
        child.start_kill().unwrap();
    })
    .await;
    assert!(!child.wait().await.unwrap().success());

    let before = credits.settle_entries().await;
    assert!(
        before.len() < accepted.len(),
        "a backlog of settles was buffered at the kill ({} applied, {} accepted)",
        before.len(),
        accepted.len()
    );
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);

    let mut replay = probe(&credits, "replay", "hcrash", Some(&wal));
    replay.env("PROBE_KIND", "settle");
    let mut replay = replay.spawn().unwrap();
    let (_, last) = accepted_keys(&mut replay, usize::MAX, |_| {}).await;
    assert!(replay.wait().await.unwrap().success());
    assert_eq!(last, "closed");
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);

    // Every accepted settle is in the ledger once, at its amount; no other settle is.
    let settled = credits.settle_entries().await;
    let mut per_user = vec![(0i64, 0i64); USERS as usize];
    for (hold_id, (count, micros)) in &settled {
        assert_eq!(*count, 1, "{hold_id} settled {count} times");
        let i = index_of(hold_id);
        assert!(hold_id.starts_with("hcrash-"), "{hold_id} was never held");
        assert_eq!(*micros, 1_000 + (i % 997) as i64, "{hold_id}");
        per_user[(i % USERS) as usize].0 += 1;
        per_user[(i % USERS) as usize].1 += micros;
    }
    let missing: Vec<_> = accepted
        .iter()
        .filter(|key| !settled.contains_key(*key))
        .collect();
    assert!(
        missing.is_empty(),
        "accepted but never settled: {missing:?}"
    );
    assert!(
        settled.len() > before.len(),
        "the replay settled the backlog"
    );
    for (u, (count, sum)) in per_user.into_iter().enumerate() {
        let (entries, balance) = credits.audit(&format!("user-{u}")).await;
        assert_eq!((entries, balance), (1 + count, 10_000 * CREDIT - sum));
    }
    // A settled hold reserves nothing; a hold whose settle was never accepted still
    // reserves (until it expires, charging nothing).
    for key in accepted.iter().take(50) {
        assert_eq!(
            credits.hold(key).await.status(),
            reeve_proto::credits::v1::HoldStatus::Settled
        );
    }
}
