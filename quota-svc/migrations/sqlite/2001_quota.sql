-- quota-svc owns these tables (SQLite). Versions 2xxx belong to quota-svc.

CREATE TABLE quota_tiers (
    user_id       TEXT PRIMARY KEY,
    tier          TEXT   NOT NULL,
    updated_at_us INTEGER NOT NULL
);

CREATE TABLE quota_overrides (
    user_id       TEXT    NOT NULL,
    feature       TEXT    NOT NULL,
    unlimited     INTEGER NOT NULL,
    limit_units   INTEGER  NOT NULL CHECK (limit_units >= 0),
    updated_at_us INTEGER  NOT NULL,
    PRIMARY KEY (user_id, feature)
);

-- Units of the rows below that are present and not released; the lock of a check-and-consume.
CREATE TABLE quota_counters (
    user_id TEXT   NOT NULL,
    feature TEXT   NOT NULL,
    used    INTEGER NOT NULL CHECK (used >= 0),
    PRIMARY KEY (user_id, feature)
);

CREATE TABLE quota_consumptions (
    user_id         TEXT    NOT NULL,
    feature         TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    units           INTEGER  NOT NULL CHECK (units > 0),
    consumed_at_us  INTEGER  NOT NULL,
    released        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, feature, idempotency_key)
);

CREATE INDEX quota_consumptions_window ON quota_consumptions (user_id, feature, consumed_at_us);
