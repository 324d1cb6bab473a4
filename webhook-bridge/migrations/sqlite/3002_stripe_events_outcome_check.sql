-- Outcomes are one enum (webhook_bridge::stripe::events::Outcome), kept to its values
-- by a CHECK constraint. SQLite adds a CHECK only by rebuilding the table. The bridge
-- never wrote another value; should a row hold one, it is kept for a person rather
-- than refused by the constraint.
UPDATE stripe_events
SET detail = 'unknown outcome ' || outcome || ': ' || detail, outcome = 'needs_attention'
WHERE outcome NOT IN ('received', 'failed', 'credited', 'debited', 'unchanged', 'ignored',
                      'ignored_currency', 'needs_attention');

CREATE TABLE stripe_events_checked (
    event_id            TEXT PRIMARY KEY,
    event_type          TEXT NOT NULL,
    payload             TEXT NOT NULL,
    received_at_us      INTEGER NOT NULL,
    last_received_at_us INTEGER NOT NULL,
    deliveries          INTEGER NOT NULL DEFAULT 1,
    processed_at_us     INTEGER,
    outcome             TEXT NOT NULL DEFAULT 'received'
        CONSTRAINT stripe_events_outcome_known CHECK (
            outcome IN ('received', 'failed', 'credited', 'debited', 'unchanged', 'ignored',
                        'ignored_currency', 'needs_attention')),
    detail              TEXT NOT NULL DEFAULT '',
    payment_intent_id   TEXT,
    charge_id           TEXT,
    user_id             TEXT
);

INSERT INTO stripe_events_checked
    (event_id, event_type, payload, received_at_us, last_received_at_us, deliveries,
     processed_at_us, outcome, detail, payment_intent_id, charge_id, user_id)
SELECT event_id, event_type, payload, received_at_us, last_received_at_us, deliveries,
       processed_at_us, outcome, detail, payment_intent_id, charge_id, user_id
FROM stripe_events;

DROP TABLE stripe_events;
ALTER TABLE stripe_events_checked RENAME TO stripe_events;

CREATE INDEX stripe_events_by_payment_intent ON stripe_events (payment_intent_id) WHERE user_id IS NOT NULL;
CREATE INDEX stripe_events_by_charge ON stripe_events (charge_id) WHERE user_id IS NOT NULL;
CREATE INDEX stripe_events_needing_attention ON stripe_events (outcome) WHERE outcome IN ('needs_attention', 'failed', 'ignored_currency');
-- Events without a final outcome, retried by the bridge and listed for attention.
CREATE INDEX stripe_events_unfinished ON stripe_events (last_received_at_us) WHERE outcome IN ('received', 'failed');
-- A refund or dispute finds its payment (and waiting ones are found by it) whoever
-- the event named.
CREATE INDEX stripe_events_payment_intent ON stripe_events (payment_intent_id);
CREATE INDEX stripe_events_charge ON stripe_events (charge_id);
