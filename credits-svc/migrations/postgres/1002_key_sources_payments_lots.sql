-- Key sources: an idempotency key is unique per source, so no key a caller chooses can
-- collide with one credits-svc derives from Stripe's ids or writes for its own jobs.
-- Existing entries keep their keys: purchases (keyed by the payment intent id) and the
-- bridge's refund and dispute adjustments (keyed `stripe:…`) become source 'stripe',
-- everything else stays 'caller', so retries of either keep deduplicating.

ALTER TABLE credit_ledger
    ADD COLUMN key_source TEXT NOT NULL DEFAULT 'caller'
        CONSTRAINT credit_ledger_key_source CHECK (key_source IN ('caller', 'stripe', 'system')),
    -- The Stripe payment intent an entry belongs to (purchases, refunds, disputes).
    ADD COLUMN payment_id TEXT,
    -- The lot an expiration or revocation removed.
    ADD COLUMN target_lot_id BIGINT,
    -- What the entry took from each lot, in the order drawn: a JSON array of
    -- [lot_id, amount_micros] pairs; NULL when it drew nothing.
    ADD COLUMN draws TEXT;

ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_kind_check;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_kind_check
    CHECK (kind IN ('deduction', 'purchase', 'grant', 'adjustment', 'expiration', 'revocation'));

ALTER TABLE credit_ledger DISABLE TRIGGER credit_ledger_no_update_or_delete;
UPDATE credit_ledger
SET key_source = 'stripe',
    payment_id = CASE WHEN kind = 'purchase' THEN idempotency_key END
WHERE kind = 'purchase' OR (kind = 'adjustment' AND idempotency_key LIKE 'stripe:%');
ALTER TABLE credit_ledger ENABLE TRIGGER credit_ledger_no_update_or_delete;

ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_idempotency_key;
-- Key first: a lookup by key alone still uses the index.
ALTER TABLE credit_ledger
    ADD CONSTRAINT credit_ledger_idempotency_key UNIQUE (idempotency_key, key_source);
CREATE INDEX credit_ledger_payment_id ON credit_ledger (payment_id) WHERE payment_id IS NOT NULL;

-- One row per credited Stripe payment: who it credited and what refunds and disputes
-- took back, so they follow the ledger (not the event) and never take more than it gave.
-- Changed only under the lock of its user's credit_accounts row.
CREATE TABLE credit_payments (
    payment_id                TEXT PRIMARY KEY,
    user_id                   TEXT   NOT NULL,
    credited_micros           BIGINT NOT NULL CHECK (credited_micros > 0),
    refunded_micros           BIGINT NOT NULL DEFAULT 0 CHECK (refunded_micros >= 0),
    refund_debits_total_micros BIGINT NOT NULL DEFAULT 0 CHECK (refund_debits_total_micros >= 0),
    disputed_micros           BIGINT NOT NULL DEFAULT 0 CHECK (disputed_micros >= 0),
    created_at_us             BIGINT NOT NULL,
    CONSTRAINT credit_payments_cap CHECK (refunded_micros + disputed_micros <= credited_micros)
);

INSERT INTO credit_payments (payment_id, user_id, credited_micros, created_at_us)
SELECT idempotency_key, user_id, amount_micros, created_at_us
FROM credit_ledger WHERE kind = 'purchase';

-- One row per dispute seen: what its debit took and whether it was won.
CREATE TABLE credit_disputes (
    dispute_id     TEXT PRIMARY KEY,
    payment_id     TEXT,
    debited_micros BIGINT  NOT NULL CHECK (debited_micros >= 0),
    reinstated     BOOLEAN NOT NULL
);

INSERT INTO credit_disputes (dispute_id, payment_id, debited_micros, reinstated)
SELECT substr(d.idempotency_key, length('stripe:dispute:') + 1), NULL, -d.amount_micros,
       EXISTS (SELECT 1 FROM credit_ledger r
               WHERE r.key_source = 'stripe'
                 AND r.idempotency_key = 'stripe:dispute-reinstated:' || substr(d.idempotency_key, length('stripe:dispute:') + 1))
FROM credit_ledger d
WHERE d.key_source = 'stripe' AND d.idempotency_key LIKE 'stripe:dispute:%';

-- Refunds debited before payments were tracked, by charge (their key named only the
-- charge): added to the payment's refund tally by the first refund event of that charge.
CREATE TABLE credit_legacy_refunds (
    charge_id      TEXT PRIMARY KEY,
    debited_micros BIGINT NOT NULL
);

INSERT INTO credit_legacy_refunds (charge_id, debited_micros)
SELECT split_part(idempotency_key, ':', 3), -SUM(amount_micros)
FROM credit_ledger
WHERE key_source = 'stripe' AND idempotency_key LIKE 'stripe:refund:%'
GROUP BY 1;

-- Lots: every credit is a lot (paid or promotional, a priority, an optional expiry);
-- debits draw from live lots in spending order. Balance = sum of live remainders − debt.
-- A lot row changes only in the transaction that appends the entries moving it.
CREATE TABLE credit_lots (
    id               BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id          TEXT    NOT NULL,
    category         TEXT    NOT NULL CHECK (category IN ('paid', 'promotional')),
    priority         INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 100),
    expires_at_us    BIGINT,
    -- The payment intent id (purchases) or the idempotency key of the credit.
    source           TEXT    NOT NULL,
    original_micros  BIGINT  NOT NULL CHECK (original_micros > 0),
    remaining_micros BIGINT  NOT NULL CHECK (remaining_micros >= 0 AND remaining_micros <= original_micros),
    -- Reserved by holds in state HELD (those past their instant included until marked).
    held_micros      BIGINT  NOT NULL DEFAULT 0 CHECK (held_micros >= 0 AND held_micros <= remaining_micros),
    -- Left through expiration entries so far.
    expired_micros   BIGINT  NOT NULL DEFAULT 0 CHECK (expired_micros >= 0),
    -- The credit entry that made it; NULL for the lots this migration makes.
    entry_id         BIGINT,
    created_at_us    BIGINT  NOT NULL
);

CREATE INDEX credit_lots_live ON credit_lots (user_id) WHERE remaining_micros > 0;
CREATE INDEX credit_lots_due ON credit_lots (expires_at_us)
    WHERE remaining_micros > 0 AND expires_at_us IS NOT NULL;

-- Existing balances: each user's positive balance becomes one paid lot without expiry.
INSERT INTO credit_lots
    (user_id, category, priority, expires_at_us, source, original_micros, remaining_micros, entry_id, created_at_us)
SELECT user_id, 'paid', 50, NULL, 'migration', balance_micros, balance_micros, NULL, updated_at_us
FROM credit_accounts WHERE balance_micros > 0 ORDER BY user_id;
