-- reeve-events: the outbox written inside the transactions of the services that emit
-- events, the operator's webhook endpoints, one delivery per event and endpoint, and
-- the log of every attempt.

CREATE TABLE outbox_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    user_id TEXT,
    -- The JSON body sent to every endpoint, byte for byte on every attempt.
    payload TEXT NOT NULL,
    created_at_us INTEGER NOT NULL,
    -- Set once the dispatcher has made the event's deliveries.
    fanned_out_at_us INTEGER
);
CREATE INDEX outbox_events_to_fan_out ON outbox_events (seq) WHERE fanned_out_at_us IS NULL;

CREATE TABLE webhook_endpoints (
    endpoint_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    -- During a rotation the old secret signs too, until this instant.
    previous_secret TEXT,
    previous_secret_until_us INTEGER,
    -- Comma-separated event types; empty: every type.
    event_types TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled')),
    disabled_reason TEXT,
    -- First failed attempt since the last success (NULL: healthy).
    failing_since_us INTEGER,
    created_at_us INTEGER NOT NULL
);

CREATE TABLE webhook_deliveries (
    delivery_id TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    -- While pending: when the next attempt is due (a claimed delivery's lease end).
    next_attempt_at_us INTEGER NOT NULL,
    created_at_us INTEGER NOT NULL,
    UNIQUE (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at_us) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id);

CREATE TABLE webhook_attempts (
    delivery_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    attempted_at_us INTEGER NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed')),
    status_code INTEGER,
    error TEXT,
    latency_ms INTEGER NOT NULL,
    response_excerpt TEXT NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
CREATE INDEX webhook_attempts_time ON webhook_attempts (attempted_at_us);
