-- Auto top-up (issue 12): each user's settings and saved card, the cards saved (one
-- row per paying payment, so a redelivered webhook saves nothing twice) and the
-- attempts to charge the card off-session. Attempts are created in the transaction of
-- the ledger write that takes the available balance below the threshold; at most one
-- is in flight per user, whatever the concurrency (the partial unique index).

CREATE TABLE credit_topup_settings (
    user_id              TEXT PRIMARY KEY,
    -- Settings; NULL until the user sets them (a card may be saved first).
    enabled              BOOLEAN NOT NULL DEFAULT FALSE,
    threshold_micros     BIGINT CHECK (threshold_micros > 0),
    amount_micros        BIGINT CHECK (amount_micros > 0),
    monthly_cap_micros   BIGINT CHECK (monthly_cap_micros > 0),
    -- The saved card.
    customer_id          TEXT,
    payment_method_id    TEXT,
    -- Declines in a row, the back-off they set, and the suspension three of them make.
    consecutive_failures INTEGER NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    retry_after_us       BIGINT NOT NULL DEFAULT 0,
    suspended_reason     TEXT CHECK (suspended_reason IN ('card_declined')),
    updated_at_us        BIGINT NOT NULL,
    CONSTRAINT credit_topup_settings_complete CHECK (
        NOT enabled OR (threshold_micros IS NOT NULL AND amount_micros IS NOT NULL
                        AND monthly_cap_micros IS NOT NULL)),
    CONSTRAINT credit_topup_settings_card CHECK (
        (customer_id IS NULL) = (payment_method_id IS NULL))
);

CREATE TABLE credit_topup_cards (
    -- The payment intent that saved the card.
    payment_id        TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL,
    customer_id       TEXT NOT NULL,
    payment_method_id TEXT NOT NULL,
    saved_at_us       BIGINT NOT NULL
);

CREATE TABLE credit_topup_attempts (
    -- Also the Idempotency-Key of the attempt's PaymentIntent at Stripe.
    attempt_id        TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL,
    amount_micros     BIGINT NOT NULL CHECK (amount_micros > 0),
    state             TEXT NOT NULL CHECK (state IN
                          ('pending', 'processing', 'requires_action', 'succeeded', 'failed')),
    customer_id       TEXT NOT NULL,
    payment_method_id TEXT NOT NULL,
    payment_intent_id TEXT,
    failure_code      TEXT,
    action_url        TEXT,
    -- A claimed ('processing') attempt whose lease ran out is claimed again and sent
    -- with the same key: Stripe answers the first PaymentIntent, charging nothing new.
    lease_until_us    BIGINT NOT NULL DEFAULT 0,
    claims            INTEGER NOT NULL DEFAULT 0,
    created_at_us     BIGINT NOT NULL,
    updated_at_us     BIGINT NOT NULL
);

CREATE UNIQUE INDEX credit_topup_attempts_one_in_flight ON credit_topup_attempts (user_id)
    WHERE state IN ('pending', 'processing', 'requires_action');

CREATE INDEX credit_topup_attempts_user_created ON credit_topup_attempts (user_id, created_at_us);

CREATE INDEX credit_topup_attempts_due ON credit_topup_attempts (lease_until_us)
    WHERE state IN ('pending', 'processing');
