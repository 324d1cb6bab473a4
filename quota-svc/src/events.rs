//! `quota.threshold_reached`: the outbound event of a consume that takes a user's
//! usage of a feature, in the rolling window, to 80% or to 100% of its limit. Derived
//! here without I/O; the stores write it into reeve-events' outbox in the consume's own
//! transaction, so it exists exactly when the consume does.
//!
//! A mark is reached when the units counted before the consume were below it and the
//! units after are at or above it: each crossing is told once, and again only after
//! usage fell back below the mark (units leaving the window, or released) and rose
//! again. This module must never read or write storage.

use reeve_events::NewEvent;
use serde_json::json;

use crate::registry::Limit;
use crate::rules::Consumed;

pub const QUOTA_THRESHOLD_REACHED: &str = "quota.threshold_reached";

/// The marks told, in percent of the limit.
pub const MARKS_PERCENT: [i64; 2] = [80, 100];

/// What a consume that ended with `consumed`, `used_after` units counted and `limit`
/// tells: one event per mark crossed (none for an unlimited feature, a refusal or a
/// duplicate).
pub fn threshold_events(
    user_id: &str,
    feature: &str,
    tier: &str,
    consumed: &Consumed,
    units: i64,
    used_after: i64,
    limit: Limit,
) -> Vec<NewEvent> {
    let (Consumed::Recorded, Limit::Units(limit_units)) = (consumed, limit) else {
        return Vec::new();
    };
    let before = used_after.saturating_sub(units);
    MARKS_PERCENT
        .iter()
        .filter_map(|&percent| {
            // The smallest usage that is at least `percent` of the limit.
            let mark = (i128::from(limit_units) * i128::from(percent) + 99) / 100;
            let mark = i64::try_from(mark).ok()?;
            (mark > 0 && before < mark && used_after >= mark).then(|| {
                NewEvent::new(
                    QUOTA_THRESHOLD_REACHED,
                    Some(user_id),
                    json!({
                        "user_id": user_id,
                        "feature": feature,
                        "tier": tier,
                        "percent": percent,
                        "limit": limit_units,
                        "used": used_after,
                    }),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn percents(consumed: Consumed, units: i64, used_after: i64, limit: Limit) -> Vec<i64> {
        threshold_events(
            "u",
            "ad_generations",
            "free",
            &consumed,
            units,
            used_after,
            limit,
        )
        .iter()
        .map(|e| e.data["percent"].as_i64().unwrap_or_default())
        .collect()
    }

    #[test]
    fn each_mark_is_told_when_crossed() {
        let limit = Limit::Units(10);
        assert_eq!(percents(Consumed::Recorded, 1, 7, limit), Vec::<i64>::new());
        assert_eq!(percents(Consumed::Recorded, 1, 8, limit), vec![80]);
        assert_eq!(percents(Consumed::Recorded, 1, 9, limit), Vec::<i64>::new());
        assert_eq!(percents(Consumed::Recorded, 1, 10, limit), vec![100]);
        assert_eq!(percents(Consumed::Recorded, 5, 10, limit), vec![80, 100]);
    }

    #[test]
    fn marks_round_up_and_nothing_else_tells() {
        // 80% of 3 is 2.4: reached at 3 units, with 100%.
        assert_eq!(
            percents(Consumed::Recorded, 1, 3, Limit::Units(3)),
            vec![80, 100]
        );
        assert_eq!(
            percents(Consumed::Recorded, 1, 2, Limit::Units(3)),
            Vec::<i64>::new()
        );
        assert!(percents(Consumed::Refused, 1, 10, Limit::Units(10)).is_empty());
        assert!(percents(Consumed::Duplicate, 1, 10, Limit::Units(10)).is_empty());
        assert!(percents(Consumed::Recorded, 1, 10, Limit::Unlimited).is_empty());
        assert!(percents(Consumed::Recorded, 0, 0, Limit::Units(0)).is_empty());
    }
}
