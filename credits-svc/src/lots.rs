//! Credit lots: every credit is a lot of one category (paid or promotional) with a
//! priority and an optional expiry, and every debit draws from live lots in one fixed
//! order. Rules only, free of I/O: the ledger plan ([`crate::ledger::plan`]) keeps lots
//! and entries moving together, and both stores persist what it decides.
//!
//! A lot is live while it has a remainder and its expiry instant has not come: from
//! `expires_at_us` on it is never spent, whether or not its `expiration` entry has been
//! written yet. This module never reads a clock; the instant is always passed in.

use std::cmp::Ordering;

use reeve_runtime::Micros;

use crate::ledger::EntryKind;

pub const MAX_PRIORITY: i32 = 100;
pub const DEFAULT_PAID_PRIORITY: i32 = 50;
pub const DEFAULT_PROMOTIONAL_PRIORITY: i32 = 10;

/// Paid money (refund liability) or credits given away. Stored as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    Paid,
    Promotional,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Paid => "paid",
            Category::Promotional => "promotional",
        }
    }

    pub fn parse(text: &str) -> Option<Category> {
        match text {
            "paid" => Some(Category::Paid),
            "promotional" => Some(Category::Promotional),
            _ => None,
        }
    }

    pub fn default_priority(self) -> i32 {
        match self {
            Category::Paid => DEFAULT_PAID_PRIORITY,
            Category::Promotional => DEFAULT_PROMOTIONAL_PRIORITY,
        }
    }
}

/// How a credit's lot is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LotTerms {
    pub category: Category,
    /// 0–100, lower is spent first.
    pub priority: i32,
    /// Must be in the future when the lot is made.
    pub expires_at_us: Option<i64>,
}

impl LotTerms {
    /// The terms a credit gets unless it asks otherwise: purchases and adjustments are
    /// paid money, grants are promotional.
    pub fn default_for(kind: EntryKind) -> LotTerms {
        let category = match kind {
            EntryKind::Grant => Category::Promotional,
            _ => Category::Paid,
        };
        LotTerms {
            category,
            priority: category.default_priority(),
            expires_at_us: None,
        }
    }
}

/// One lot as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lot {
    pub id: i64,
    pub user_id: String,
    pub category: Category,
    pub priority: i32,
    pub expires_at_us: Option<i64>,
    /// The payment intent id (purchases) or the idempotency key that made it.
    pub source: String,
    pub original: Micros,
    pub remaining: Micros,
    pub created_at_us: i64,
    /// Reserved by holds in state HELD (as stored: a hold past its instant counts
    /// until it is marked expired).
    pub held: Micros,
    /// What left through expiration entries so far.
    pub expired: Micros,
}

impl Lot {
    /// Spendable at `now_us`: a remainder, and its expiry instant not reached.
    pub fn is_live(&self, now_us: i64) -> bool {
        self.remaining.0 > 0 && !self.is_expired(now_us)
    }

    /// Its expiry instant has come (it may still hold a remainder to expire).
    pub fn is_expired(&self, now_us: i64) -> bool {
        self.expires_at_us.is_some_and(|at| at <= now_us)
    }
}

/// The order deductions draw in: priority ascending, then expiry ascending (lots that
/// never expire last), then promotional before paid, then the oldest lot (`sequence`:
/// the lot id, or a later number for lots made in the same transaction).
pub fn spending_key(
    priority: i32,
    expires_at_us: Option<i64>,
    category: Category,
    sequence: i64,
) -> (i32, i64, u8, i64) {
    let category_rank = match category {
        Category::Promotional => 0,
        Category::Paid => 1,
    };
    (
        priority,
        expires_at_us.unwrap_or(i64::MAX),
        category_rank,
        sequence,
    )
}

pub fn spending_order(a: &Lot, b: &Lot) -> Ordering {
    spending_key(a.priority, a.expires_at_us, a.category, a.id).cmp(&spending_key(
        b.priority,
        b.expires_at_us,
        b.category,
        b.id,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lot(id: i64, category: Category, priority: i32, expires_at_us: Option<i64>) -> Lot {
        Lot {
            id,
            user_id: "u".to_owned(),
            category,
            priority,
            expires_at_us,
            source: format!("k{id}"),
            original: Micros(10),
            remaining: Micros(10),
            created_at_us: 0,
            held: Micros::ZERO,
            expired: Micros::ZERO,
        }
    }

    #[test]
    fn spending_order_table() {
        use Category::*;
        // (lots, expected order of ids)
        let rows: Vec<(Vec<Lot>, Vec<i64>)> = vec![
            // Priority first, whatever the category or expiry.
            (
                vec![lot(1, Paid, 50, None), lot(2, Promotional, 10, None)],
                vec![2, 1],
            ),
            (
                vec![lot(1, Promotional, 60, Some(5)), lot(2, Paid, 50, None)],
                vec![2, 1],
            ),
            // Same priority: the earlier expiry first, never-expiring last.
            (
                vec![
                    lot(1, Paid, 50, None),
                    lot(2, Paid, 50, Some(9)),
                    lot(3, Paid, 50, Some(7)),
                ],
                vec![3, 2, 1],
            ),
            // Same priority and expiry: promotional before paid.
            (
                vec![lot(1, Paid, 10, Some(7)), lot(2, Promotional, 10, Some(7))],
                vec![2, 1],
            ),
            (
                vec![lot(1, Paid, 10, None), lot(2, Promotional, 10, None)],
                vec![2, 1],
            ),
            // All equal: the oldest lot first.
            (
                vec![
                    lot(3, Paid, 50, None),
                    lot(1, Paid, 50, None),
                    lot(2, Paid, 50, None),
                ],
                vec![1, 2, 3],
            ),
            // A mixed wallet.
            (
                vec![
                    lot(1, Paid, 50, None),
                    lot(2, Promotional, 10, Some(100)),
                    lot(3, Promotional, 10, None),
                    lot(4, Paid, 0, None),
                    lot(5, Promotional, 10, Some(50)),
                    lot(6, Paid, 10, Some(50)),
                ],
                vec![4, 5, 6, 2, 3, 1],
            ),
        ];
        for (mut lots, expected) in rows {
            lots.sort_by(spending_order);
            let ids: Vec<i64> = lots.iter().map(|l| l.id).collect();
            assert_eq!(ids, expected);
        }
    }

    #[test]
    fn a_lot_is_spent_until_its_instant_and_never_from_it() {
        let l = lot(1, Category::Promotional, 10, Some(1_000));
        assert!(l.is_live(999));
        assert!(!l.is_live(1_000));
        assert!(l.is_expired(1_000));
        assert!(lot(2, Category::Paid, 50, None).is_live(i64::MAX));
    }
}
