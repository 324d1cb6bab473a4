-- credits-svc owns these tables. Versions 1xxx belong to credits-svc so that other
-- services can keep their own migrations in the same database file.

CREATE TABLE credit_accounts (
    user_id        TEXT PRIMARY KEY NOT NULL,
    -- Cached sum of the user's ledger entries, moved only with them.
    balance_micros INTEGER NOT NULL,
    updated_at_us  INTEGER NOT NULL
) STRICT;

CREATE TABLE credit_ledger (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id              TEXT    NOT NULL,
    kind                 TEXT    NOT NULL CHECK (kind IN ('deduction', 'purchase', 'grant', 'adjustment')),
    amount_micros        INTEGER NOT NULL CHECK (amount_micros <> 0),
    balance_after_micros INTEGER NOT NULL,
    idempotency_key      TEXT    NOT NULL UNIQUE,
    description          TEXT    NOT NULL DEFAULT '',
    created_at_us        INTEGER NOT NULL
) STRICT;

CREATE INDEX credit_ledger_user_id_id ON credit_ledger (user_id, id DESC);

CREATE TRIGGER credit_ledger_no_update BEFORE UPDATE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only');
END;

CREATE TRIGGER credit_ledger_no_delete BEFORE DELETE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only');
END;
