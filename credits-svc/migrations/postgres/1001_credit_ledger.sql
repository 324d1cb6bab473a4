-- credits-svc owns these tables. Versions 1xxx belong to credits-svc so that other
-- services can keep their own migrations in the same database.

CREATE TABLE credit_accounts (
    user_id        TEXT PRIMARY KEY,
    -- Cached sum of the user's ledger entries, moved only with them.
    balance_micros BIGINT NOT NULL,
    updated_at_us  BIGINT NOT NULL
);

CREATE TABLE credit_ledger (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id              TEXT   NOT NULL,
    kind                 TEXT   NOT NULL CHECK (kind IN ('deduction', 'purchase', 'grant', 'adjustment')),
    amount_micros        BIGINT NOT NULL CHECK (amount_micros <> 0),
    balance_after_micros BIGINT NOT NULL,
    idempotency_key      TEXT   NOT NULL,
    description          TEXT   NOT NULL DEFAULT '',
    created_at_us        BIGINT NOT NULL,
    CONSTRAINT credit_ledger_idempotency_key UNIQUE (idempotency_key)
);

CREATE INDEX credit_ledger_user_id_id ON credit_ledger (user_id, id DESC);

CREATE FUNCTION credit_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit_ledger is append-only';
END
$$;

CREATE TRIGGER credit_ledger_no_update_or_delete
    BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_ledger_append_only();

CREATE TRIGGER credit_ledger_no_truncate
    BEFORE TRUNCATE ON credit_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION credit_ledger_append_only();
