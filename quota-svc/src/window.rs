//! The rolling window: a unit consumed at T counts while now < T + 30 days, to the
//! second: at T + 30 days − 1 s it still counts, at T + 30 days it does not.
//! Times are microseconds since the Unix epoch, from the injected clock.

/// Length of the window.
pub const WINDOW_DAYS: i64 = 30;
pub const WINDOW_US: i64 = WINDOW_DAYS * 24 * 60 * 60 * 1_000_000;

/// Units consumed at or before this instant no longer count at `now_us`.
pub fn cutoff_us(now_us: i64) -> i64 {
    now_us.saturating_sub(WINDOW_US)
}

/// When a unit consumed at `consumed_at_us` stops counting.
pub fn frees_at_us(consumed_at_us: i64) -> i64 {
    consumed_at_us.saturating_add(WINDOW_US)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_counts_until_exactly_thirty_days_later() {
        let consumed = 1_700_000_000_000_000;
        let counts_at = |now: i64| consumed > cutoff_us(now);
        assert!(counts_at(consumed));
        assert!(counts_at(consumed + WINDOW_US - 1_000_000));
        assert!(!counts_at(consumed + WINDOW_US));
        assert_eq!(frees_at_us(consumed), consumed + WINDOW_US);
    }
}
