-- A key is remembered while its units count (quota-svc/src/rules.rs, plan_consume).
-- Before: a consume whose key had been released, or whose row had left the window but
-- was not yet pruned, answered 'duplicate' and counted nothing, so work could be done
-- again without being counted. Now such a key is forgotten: the consume is a new one,
-- 'recorded' (replacing the old row) if it fits, else 'refused'.
--
-- The same steps as the SQLite store's transaction (quota-svc/src/store/sqlite.rs):
-- lock the counter row, read the key's row, prune what left the window, plan, record,
-- move the counter, answer the usage. p_limit NULL means unlimited. Same signature as
-- migration 2002, so quota_consume_batch (2003) calls this version unchanged.
CREATE OR REPLACE FUNCTION quota_consume(
    p_user_id   TEXT,
    p_feature   TEXT,
    p_key       TEXT,
    p_units     BIGINT,
    p_limit     BIGINT,
    p_now_us    BIGINT,
    p_cutoff_us BIGINT
) RETURNS TABLE (outcome TEXT, recorded_units BIGINT, used BIGINT, oldest_us BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_counted  BIGINT;
    v_earlier  BIGINT;
    v_at_us    BIGINT;
    v_released BOOLEAN;
    v_expired  BIGINT;
    v_used     BIGINT;
BEGIN
    -- Creates the counter if needed and locks it: concurrent consumes of one user and
    -- feature queue here, on any replica.
    INSERT INTO quota_counters AS c (user_id, feature, used) VALUES (p_user_id, p_feature, 0)
        ON CONFLICT (user_id, feature) DO UPDATE SET used = c.used
        RETURNING c.used INTO v_counted;
    SELECT q.units, q.consumed_at_us, q.released INTO v_earlier, v_at_us, v_released
        FROM quota_consumptions q
        WHERE q.user_id = p_user_id AND q.feature = p_feature AND q.idempotency_key = p_key;
    WITH gone AS (
        DELETE FROM quota_consumptions q
        WHERE q.user_id = p_user_id AND q.feature = p_feature AND q.consumed_at_us <= p_cutoff_us
        RETURNING q.units, q.released
    )
    SELECT COALESCE(SUM(g.units) FILTER (WHERE NOT g.released), 0) INTO v_expired FROM gone g;
    v_used := v_counted - v_expired;
    recorded_units := NULL;
    -- rules::counted_units: the key counts only if present, not released, and after
    -- the cutoff.
    IF v_earlier IS NOT NULL AND NOT v_released AND v_at_us > p_cutoff_us THEN
        IF v_earlier = p_units THEN
            outcome := 'duplicate';
        ELSE
            outcome := 'key_reused';
            recorded_units := v_earlier;
        END IF;
    -- rules::fits, without overflow: p_units <= p_limit - v_used.
    ELSIF p_limit IS NULL OR p_units <= p_limit - v_used THEN
        INSERT INTO quota_consumptions AS q (user_id, feature, idempotency_key, units, consumed_at_us, released)
            VALUES (p_user_id, p_feature, p_key, p_units, p_now_us, false)
            ON CONFLICT (user_id, feature, idempotency_key) DO UPDATE SET
                units = EXCLUDED.units, consumed_at_us = EXCLUDED.consumed_at_us, released = false;
        v_used := v_used + p_units;
        outcome := 'recorded';
    ELSE
        outcome := 'refused';
    END IF;
    IF v_used <> v_counted THEN
        UPDATE quota_counters c SET used = v_used WHERE c.user_id = p_user_id AND c.feature = p_feature;
    END IF;
    used := v_used;
    SELECT MIN(q.consumed_at_us) INTO oldest_us FROM quota_consumptions q
        WHERE q.user_id = p_user_id AND q.feature = p_feature AND NOT q.released;
    RETURN NEXT;
END;
$$;
