-- Low-balance alerts (one threshold per user) and the lots already warned of their
-- coming expiry: what credits-svc needs to emit credits.balance_low and lot.expiring
-- exactly once (events themselves go to reeve-events' outbox, 4xxx).

CREATE TABLE credit_balance_alerts (
    user_id TEXT PRIMARY KEY,
    threshold_micros INTEGER NOT NULL CHECK (threshold_micros > 0),
    -- Fires when the available balance is below the threshold while armed; re-armed
    -- once it is back at or above.
    armed INTEGER NOT NULL DEFAULT 1,
    updated_at_us INTEGER NOT NULL
);

CREATE TABLE credit_lot_warnings (
    lot_id INTEGER PRIMARY KEY,
    warned_at_us INTEGER NOT NULL
);
