//! When a failed delivery is tried again: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h
//! after each failure (eight attempts over 27 h 35 min), then the delivery is failed
//! (an operator can still redeliver it by hand).

/// The waits after the 1st, 2nd, … failed attempt.
pub const RETRY_DELAYS_SECS: [i64; 7] =
    [5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600];

/// The wait after the `attempt`-th attempt (1-based) failed, or `None` when it was the
/// last.
pub fn retry_delay_us(attempt: i64) -> Option<i64> {
    let index = usize::try_from(attempt.checked_sub(1)?).ok()?;
    RETRY_DELAYS_SECS.get(index).map(|secs| secs * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_span_more_than_a_day_then_stop() {
        let total: i64 = (1..=7).filter_map(retry_delay_us).sum();
        assert!(total >= 24 * 3600 * 1_000_000, "{total}");
        assert_eq!(retry_delay_us(1), Some(5_000_000));
        assert_eq!(retry_delay_us(8), None);
        assert_eq!(retry_delay_us(0), None);
    }
}
