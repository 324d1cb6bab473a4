//! The metrics recorder's memory is bounded without a scraper: histogram samples are
//! folded into buckets by the upkeep thread, not kept until `/metrics` is read.
//! (Before the upkeep thread, 2,000,000 samples held ~33 MB until a scrape.)
//!
//! Its own test binary: it counts every allocation of the process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;
use std::time::{Duration, Instant};

use cap::Cap;
use reeve_runtime::telemetry::{self, METRICS_UPKEEP_INTERVAL};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

const SAMPLES: usize = 2_000_000;
/// What may stay allocated once samples are folded: buckets, not samples.
const SLACK_BYTES: usize = 2 << 20;

#[test]
fn histogram_samples_are_released_without_a_scrape() {
    telemetry::metrics();
    let histogram = metrics::histogram!("reeve_test_request_duration_seconds", "route" => "/x");
    histogram.record(0.001);
    let baseline = ALLOCATOR.allocated();

    for i in 0..SAMPLES {
        histogram.record((i % 1000) as f64 / 1e5);
    }
    let held = ALLOCATOR.allocated().saturating_sub(baseline);
    // The samples are first held raw (8 bytes each): that is what must not last.
    assert!(
        held >= SAMPLES * 4,
        "expected the raw samples to be held before upkeep, held {held} bytes"
    );

    // Nothing scrapes; within a few upkeep intervals the samples must be gone.
    let deadline = Instant::now() + METRICS_UPKEEP_INTERVAL * 3;
    loop {
        // Light traffic goes on, as it does in a server: recording is also what lets the
        // exporter's epoch-based reclamation free the drained blocks.
        for _ in 0..100 {
            histogram.record(0.002);
        }
        let now_held = ALLOCATOR.allocated().saturating_sub(baseline);
        if now_held < SLACK_BYTES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{now_held} bytes still held {:?} after {SAMPLES} samples, with no scrape",
            METRICS_UPKEEP_INTERVAL * 3
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // And the samples were counted, not dropped.
    let text = telemetry::render_metrics();
    let count = text
        .lines()
        .find(|l| l.starts_with("reeve_test_request_duration_seconds_count"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<usize>().ok());
    assert!(count.is_some_and(|n| n > SAMPLES), "{text}");
}
