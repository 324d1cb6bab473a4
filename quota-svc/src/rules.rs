//! The quota rules, free of I/O: which limit a user has, whether units fit, what a
//! consume does given what its idempotency key left behind, what a release gives
//! back, and where the window's edges fall.
//!
//! The service answers questions with these functions; the SQLite store calls them
//! inside its transaction, after locking the counter row. PostgreSQL's `quota_consume`
//! (migration 2004) restates [`plan_consume`] in plpgsql for one round trip per batch;
//! `tests/store_equivalence.rs` replays random histories on both stores and proves
//! every answer equal. This module never talks to a database, never reads a clock
//! (times come in as arguments) and never allows anything by default.
//!
//! **A key is remembered while its units count.** A consume whose key has a row that
//! is inside the window and not released is that consume again: a duplicate with the
//! same units, `KeyReused` with others, and nothing new is counted. A key whose units
//! no longer count (released, or its row has left the window) is forgotten: a consume
//! with it is a new consume, counted if it fits and refused if not, so no retry is
//! ever allowed without being counted. A release gives back only units that still
//! count.

use crate::registry::{self, Limit};
use crate::window;

/// The tier of a user never given one.
pub use crate::registry::DEFAULT_TIER;

/// What a consume did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumed {
    /// Counted now.
    Recorded,
    /// The key's units still count, with the same units: nothing new counted.
    Duplicate,
    /// Over the limit: nothing counted.
    Refused,
    /// The key's units still count, but they were a different number of units.
    KeyReused { units: i64 },
}

/// What the store holds under a key (a row of `quota_consumptions`), if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRow {
    pub units: i64,
    pub consumed_at_us: i64,
    pub released: bool,
}

/// The window's edge: a unit consumed at `consumed_at_us` counts while it is after
/// `cutoff_us` ([`window::cutoff_us`] of now). At exactly the cutoff it has left.
pub fn counts(consumed_at_us: i64, cutoff_us: i64) -> bool {
    consumed_at_us > cutoff_us
}

/// The units a key holds in the window at `cutoff_us`: `None` when the key is unknown,
/// released or has left the window (a consume with it is then a new one).
pub fn counted_units(row: Option<KeyRow>, cutoff_us: i64) -> Option<i64> {
    row.filter(|row| !row.released && counts(row.consumed_at_us, cutoff_us))
        .map(|row| row.units)
}

/// The limit a user has for a feature: their override, else their tier's entry of
/// `tier_limits` (in [`registry::TIERS`] order). A user with no stored tier is on
/// [`DEFAULT_TIER`]. `Err` names a stored tier the registry does not know: nothing may
/// be consumed then, even when an override would decide.
pub fn resolve_limit(
    stored_tier: Option<&str>,
    override_limit: Option<Limit>,
    tier_limits: &[Limit; 3],
) -> Result<(String, Limit), String> {
    let tier = stored_tier.unwrap_or(DEFAULT_TIER);
    let index = registry::tier_index(tier).map_err(|_| tier.to_owned())?;
    Ok((
        tier.to_owned(),
        override_limit.unwrap_or(tier_limits[index]),
    ))
}

/// Whether `units` more fit under `limit` with `used` counted (never by overflow).
pub fn fits(limit: Limit, used: i64, units: i64) -> bool {
    match limit {
        Limit::Unlimited => true,
        Limit::Units(max) => used.checked_add(units).is_some_and(|after| after <= max),
    }
}

/// A question (consume 0): allowed while one more unit would fit.
pub fn allows_more(limit: Limit, used: i64) -> bool {
    fits(limit, used, 1)
}

/// What a consume of `units` under a key does, given the key's row, the live usage
/// (`used`, at `cutoff_us`) and the user's limit. [`Consumed::Recorded`] means: store
/// the row afresh (units, now, not released), replacing a released or expired one.
pub fn plan_consume(
    key: Option<KeyRow>,
    cutoff_us: i64,
    limit: Limit,
    used: i64,
    units: i64,
) -> Consumed {
    match counted_units(key, cutoff_us) {
        Some(recorded) if recorded == units => Consumed::Duplicate,
        Some(recorded) => Consumed::KeyReused { units: recorded },
        None if fits(limit, used, units) => Consumed::Recorded,
        None => Consumed::Refused,
    }
}

/// The units a release gives back: those the key still counts, once.
pub fn plan_release(key: Option<KeyRow>, cutoff_us: i64) -> Option<i64> {
    counted_units(key, cutoff_us)
}

/// The live usage from the counter (units of the rows present and not released) and
/// the units of the rows that left the window since it was last pruned.
pub fn live_used(counted: i64, expired_units: i64) -> i64 {
    counted - expired_units
}

/// The cutoff of the window at `now_us` (re-exported here so a reader finds every
/// edge in one place).
pub fn cutoff_us(now_us: i64) -> i64 {
    window::cutoff_us(now_us)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::WINDOW_US;

    const NOW: i64 = 1_767_225_600_000_000;
    const LIMITS: [Limit; 3] = [Limit::Units(3), Limit::Units(20), Limit::Unlimited];

    fn row(units: i64, consumed_at_us: i64, released: bool) -> Option<KeyRow> {
        Some(KeyRow {
            units,
            consumed_at_us,
            released,
        })
    }

    #[test]
    fn the_override_decides_and_the_tier_must_be_known() {
        assert_eq!(
            resolve_limit(None, None, &LIMITS),
            Ok(("free".to_owned(), Limit::Units(3)))
        );
        assert_eq!(
            resolve_limit(Some("enterprise"), None, &LIMITS),
            Ok(("enterprise".to_owned(), Limit::Unlimited))
        );
        assert_eq!(
            resolve_limit(Some("pro"), Some(Limit::Units(0)), &LIMITS),
            Ok(("pro".to_owned(), Limit::Units(0)))
        );
        assert_eq!(
            resolve_limit(Some("gold"), Some(Limit::Unlimited), &LIMITS),
            Err("gold".to_owned())
        );
    }

    #[test]
    fn units_fit_up_to_the_limit_and_never_by_overflow() {
        assert!(fits(Limit::Units(3), 2, 1));
        assert!(!fits(Limit::Units(3), 2, 2));
        assert!(!fits(Limit::Units(3), 4, 0));
        assert!(!fits(Limit::Units(i64::MAX), i64::MAX, 1));
        assert!(fits(Limit::Unlimited, i64::MAX, 1));
        assert!(allows_more(Limit::Units(1), 0));
        assert!(!allows_more(Limit::Units(0), 0));
    }

    #[test]
    fn a_counting_key_answers_duplicate_or_key_reused_and_counts_nothing() {
        let cutoff = cutoff_us(NOW);
        let key = row(2, NOW - 1, false);
        assert_eq!(
            plan_consume(key, cutoff, Limit::Units(2), 2, 2),
            Consumed::Duplicate
        );
        assert_eq!(
            plan_consume(key, cutoff, Limit::Units(2), 2, 1),
            Consumed::KeyReused { units: 2 }
        );
    }

    #[test]
    fn a_released_key_is_a_new_consume_counted_or_refused() {
        let cutoff = cutoff_us(NOW);
        let key = row(1, NOW - 1, true);
        assert_eq!(
            plan_consume(key, cutoff, Limit::Units(3), 2, 1),
            Consumed::Recorded
        );
        assert_eq!(
            plan_consume(key, cutoff, Limit::Units(3), 3, 1),
            Consumed::Refused
        );
        assert_eq!(plan_release(key, cutoff), None);
    }

    #[test]
    fn a_key_is_forgotten_exactly_when_its_row_leaves_the_window() {
        let consumed = NOW - WINDOW_US;
        // At NOW the row sits exactly on the cutoff: it has left.
        let cutoff = cutoff_us(NOW);
        assert!(!counts(consumed, cutoff));
        assert!(counts(consumed + 1, cutoff));
        let gone = row(1, consumed, false);
        assert_eq!(
            plan_consume(gone, cutoff, Limit::Units(1), 0, 1),
            Consumed::Recorded
        );
        assert_eq!(
            plan_consume(gone, cutoff, Limit::Units(1), 1, 1),
            Consumed::Refused
        );
        assert_eq!(plan_release(gone, cutoff), None);
        let inside = row(1, consumed + 1, false);
        assert_eq!(
            plan_consume(inside, cutoff, Limit::Units(1), 1, 1),
            Consumed::Duplicate
        );
        assert_eq!(plan_release(inside, cutoff), Some(1));
    }

    #[test]
    fn an_unknown_key_is_counted_if_it_fits() {
        let cutoff = cutoff_us(NOW);
        assert_eq!(
            plan_consume(None, cutoff, Limit::Units(3), 1, 2),
            Consumed::Recorded
        );
        assert_eq!(
            plan_consume(None, cutoff, Limit::Units(3), 1, 3),
            Consumed::Refused
        );
        assert_eq!(plan_release(None, cutoff), None);
        assert_eq!(live_used(5, 2), 3);
    }
}
