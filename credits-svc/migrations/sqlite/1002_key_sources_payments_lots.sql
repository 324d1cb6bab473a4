-- Key sources, payments and lots (see the PostgreSQL migration of the same number).
-- SQLite cannot change a UNIQUE constraint in place: the ledger is rebuilt, ids kept.

CREATE TABLE credit_ledger_v2 (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id              TEXT    NOT NULL,
    kind                 TEXT    NOT NULL CHECK (kind IN ('deduction', 'purchase', 'grant', 'adjustment', 'expiration', 'revocation')),
    amount_micros        INTEGER NOT NULL CHECK (amount_micros <> 0),
    balance_after_micros INTEGER NOT NULL,
    idempotency_key      TEXT    NOT NULL,
    description          TEXT    NOT NULL DEFAULT '',
    created_at_us        INTEGER NOT NULL,
    key_source           TEXT    NOT NULL DEFAULT 'caller' CHECK (key_source IN ('caller', 'stripe', 'system')),
    payment_id           TEXT,
    target_lot_id        INTEGER,
    draws                TEXT,
    UNIQUE (idempotency_key, key_source)
) STRICT;

INSERT INTO credit_ledger_v2
    (id, user_id, kind, amount_micros, balance_after_micros, idempotency_key, description,
     created_at_us, key_source, payment_id)
SELECT id, user_id, kind, amount_micros, balance_after_micros, idempotency_key, description,
       created_at_us,
       CASE WHEN kind = 'purchase' OR (kind = 'adjustment' AND substr(idempotency_key, 1, 7) = 'stripe:')
            THEN 'stripe' ELSE 'caller' END,
       CASE WHEN kind = 'purchase' THEN idempotency_key END
FROM credit_ledger ORDER BY id;

DROP TABLE credit_ledger;
ALTER TABLE credit_ledger_v2 RENAME TO credit_ledger;

CREATE INDEX credit_ledger_user_id_id ON credit_ledger (user_id, id DESC);
CREATE INDEX credit_ledger_payment_id ON credit_ledger (payment_id) WHERE payment_id IS NOT NULL;

CREATE TRIGGER credit_ledger_no_update BEFORE UPDATE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only');
END;

CREATE TRIGGER credit_ledger_no_delete BEFORE DELETE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only');
END;

CREATE TABLE credit_payments (
    payment_id                 TEXT PRIMARY KEY NOT NULL,
    user_id                    TEXT    NOT NULL,
    credited_micros            INTEGER NOT NULL CHECK (credited_micros > 0),
    refunded_micros            INTEGER NOT NULL DEFAULT 0 CHECK (refunded_micros >= 0),
    refund_debits_total_micros INTEGER NOT NULL DEFAULT 0 CHECK (refund_debits_total_micros >= 0),
    disputed_micros            INTEGER NOT NULL DEFAULT 0 CHECK (disputed_micros >= 0),
    created_at_us              INTEGER NOT NULL,
    CHECK (refunded_micros + disputed_micros <= credited_micros)
) STRICT;

INSERT INTO credit_payments (payment_id, user_id, credited_micros, created_at_us)
SELECT idempotency_key, user_id, amount_micros, created_at_us
FROM credit_ledger WHERE kind = 'purchase';

CREATE TABLE credit_disputes (
    dispute_id     TEXT PRIMARY KEY NOT NULL,
    payment_id     TEXT,
    debited_micros INTEGER NOT NULL CHECK (debited_micros >= 0),
    reinstated     INTEGER NOT NULL CHECK (reinstated IN (0, 1))
) STRICT;

INSERT INTO credit_disputes (dispute_id, payment_id, debited_micros, reinstated)
SELECT substr(d.idempotency_key, 16), NULL, -d.amount_micros,
       EXISTS (SELECT 1 FROM credit_ledger r
               WHERE r.key_source = 'stripe'
                 AND r.idempotency_key = 'stripe:dispute-reinstated:' || substr(d.idempotency_key, 16))
FROM credit_ledger d
WHERE d.key_source = 'stripe' AND substr(d.idempotency_key, 1, 15) = 'stripe:dispute:';

CREATE TABLE credit_legacy_refunds (
    charge_id      TEXT PRIMARY KEY NOT NULL,
    debited_micros INTEGER NOT NULL
) STRICT;

INSERT INTO credit_legacy_refunds (charge_id, debited_micros)
SELECT substr(rest, 1, instr(rest, ':') - 1), -SUM(amount_micros)
FROM (SELECT substr(idempotency_key, 15) AS rest, amount_micros
      FROM credit_ledger
      WHERE key_source = 'stripe' AND substr(idempotency_key, 1, 14) = 'stripe:refund:')
GROUP BY 1;

CREATE TABLE credit_lots (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id          TEXT    NOT NULL,
    category         TEXT    NOT NULL CHECK (category IN ('paid', 'promotional')),
    priority         INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 100),
    expires_at_us    INTEGER,
    source           TEXT    NOT NULL,
    original_micros  INTEGER NOT NULL CHECK (original_micros > 0),
    remaining_micros INTEGER NOT NULL CHECK (remaining_micros >= 0 AND remaining_micros <= original_micros),
    -- Reserved by holds in state HELD (those past their instant included until marked).
    held_micros      INTEGER NOT NULL DEFAULT 0 CHECK (held_micros >= 0 AND held_micros <= remaining_micros),
    -- Left through expiration entries so far.
    expired_micros   INTEGER NOT NULL DEFAULT 0 CHECK (expired_micros >= 0),
    entry_id         INTEGER,
    created_at_us    INTEGER NOT NULL
) STRICT;

CREATE INDEX credit_lots_live ON credit_lots (user_id) WHERE remaining_micros > 0;
CREATE INDEX credit_lots_due ON credit_lots (expires_at_us)
    WHERE remaining_micros > 0 AND expires_at_us IS NOT NULL;

INSERT INTO credit_lots
    (user_id, category, priority, expires_at_us, source, original_micros, remaining_micros, entry_id, created_at_us)
SELECT user_id, 'paid', 50, NULL, 'migration', balance_micros, balance_micros, NULL, updated_at_us
FROM credit_accounts WHERE balance_micros > 0 ORDER BY user_id;
