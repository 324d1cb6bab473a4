-- Every verified Stripe event the bridge received, kept for audit, with what was done
-- about it. One row per event id, however many times Stripe delivered it.
CREATE TABLE stripe_events (
    event_id            TEXT PRIMARY KEY,
    event_type          TEXT NOT NULL,
    -- The body exactly as Stripe sent it.
    payload             TEXT NOT NULL,
    received_at_us      BIGINT NOT NULL,
    last_received_at_us BIGINT NOT NULL,
    deliveries          BIGINT NOT NULL DEFAULT 1,
    -- Set once a final outcome is recorded.
    processed_at_us     BIGINT,
    -- received | failed (retryable) | credited | debited | ignored | ignored_currency | needs_attention
    outcome             TEXT NOT NULL DEFAULT 'received',
    detail              TEXT NOT NULL DEFAULT '',
    -- Who paid what: lets a refund or dispute find the user of its payment.
    payment_intent_id   TEXT,
    charge_id           TEXT,
    user_id             TEXT
);

CREATE INDEX stripe_events_by_payment_intent ON stripe_events (payment_intent_id) WHERE user_id IS NOT NULL;
CREATE INDEX stripe_events_by_charge ON stripe_events (charge_id) WHERE user_id IS NOT NULL;
CREATE INDEX stripe_events_needing_attention ON stripe_events (outcome) WHERE outcome IN ('needs_attention', 'failed', 'ignored_currency');
