-- Holds: credits reserved before an LLM call, settled with the real cost after (or
-- released, or expired). A hold reserves from specific lots (credit_hold_reservations);
-- credit_lots.held_micros is their sum over holds in state 'held', moved in the same
-- transaction. A hold stops reserving at expires_at_us exactly, marked or not.
CREATE TABLE credit_holds (
    hold_id          TEXT PRIMARY KEY,
    user_id          TEXT    NOT NULL,
    amount_micros    BIGINT  NOT NULL CHECK (amount_micros > 0),
    status           TEXT    NOT NULL CHECK (status IN ('held', 'settled', 'released', 'expired')),
    settled_micros   BIGINT  CHECK (settled_micros >= 0),
    entry_id         BIGINT,
    shortfall_micros BIGINT  NOT NULL DEFAULT 0 CHECK (shortfall_micros >= 0),
    late             BOOLEAN NOT NULL DEFAULT false,
    description      TEXT    NOT NULL DEFAULT '',
    created_at_us    BIGINT  NOT NULL,
    expires_at_us    BIGINT  NOT NULL,
    resolved_at_us   BIGINT
);

CREATE INDEX credit_holds_user_held ON credit_holds (user_id) WHERE status = 'held';
CREATE INDEX credit_holds_due ON credit_holds (expires_at_us) WHERE status = 'held';
CREATE INDEX credit_holds_user_id ON credit_holds (user_id, created_at_us DESC);

CREATE TABLE credit_hold_reservations (
    hold_id       TEXT   NOT NULL,
    lot_id        BIGINT NOT NULL,
    amount_micros BIGINT NOT NULL CHECK (amount_micros > 0),
    position      INTEGER NOT NULL,
    PRIMARY KEY (hold_id, lot_id)
);

CREATE INDEX credit_hold_reservations_lot ON credit_hold_reservations (lot_id);
