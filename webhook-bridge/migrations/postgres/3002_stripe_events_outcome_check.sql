-- Outcomes are one enum (webhook_bridge::stripe::events::Outcome), kept to its values
-- by a CHECK constraint. The bridge never wrote another value; should a row hold one,
-- it is kept for a person rather than refused by the constraint.
UPDATE stripe_events
SET detail = 'unknown outcome ' || outcome || ': ' || detail, outcome = 'needs_attention'
WHERE outcome NOT IN ('received', 'failed', 'credited', 'debited', 'unchanged', 'ignored',
                      'ignored_currency', 'needs_attention');

ALTER TABLE stripe_events ADD CONSTRAINT stripe_events_outcome_known CHECK (
    outcome IN ('received', 'failed', 'credited', 'debited', 'unchanged', 'ignored',
                'ignored_currency', 'needs_attention')
);

-- Events without a final outcome, retried by the bridge and listed for attention.
CREATE INDEX stripe_events_unfinished ON stripe_events (last_received_at_us)
    WHERE outcome IN ('received', 'failed');
-- A refund or dispute finds its payment (and waiting ones are found by it) whoever
-- the event named.
CREATE INDEX stripe_events_payment_intent ON stripe_events (payment_intent_id);
CREATE INDEX stripe_events_charge ON stripe_events (charge_id);
