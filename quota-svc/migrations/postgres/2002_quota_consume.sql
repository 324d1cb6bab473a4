-- Check-and-consume in one round trip. The same steps as the SQLite store's
-- transaction (quota-svc/src/store.rs), run inside the calling statement's transaction:
-- lock the counter row, look the key up, prune what left the window, record the units
-- if they fit, move the counter, and answer the usage. p_limit NULL means unlimited.
CREATE FUNCTION quota_consume(
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
    v_counted BIGINT;
    v_earlier BIGINT;
    v_expired BIGINT;
    v_used    BIGINT;
BEGIN
    -- Creates the counter if needed and locks it: concurrent consumes of one user and
    -- feature queue here, on any replica.
    INSERT INTO quota_counters AS c (user_id, feature, used) VALUES (p_user_id, p_feature, 0)
        ON CONFLICT (user_id, feature) DO UPDATE SET used = c.used
        RETURNING c.used INTO v_counted;
    SELECT q.units INTO v_earlier FROM quota_consumptions q
        WHERE q.user_id = p_user_id AND q.feature = p_feature AND q.idempotency_key = p_key;
    WITH gone AS (
        DELETE FROM quota_consumptions q
        WHERE q.user_id = p_user_id AND q.feature = p_feature AND q.consumed_at_us <= p_cutoff_us
        RETURNING q.units, q.released
    )
    SELECT COALESCE(SUM(g.units) FILTER (WHERE NOT g.released), 0) INTO v_expired FROM gone g;
    v_used := v_counted - v_expired;
    IF v_earlier IS NOT NULL THEN
        IF v_earlier = p_units THEN
            outcome := 'duplicate';
        ELSE
            outcome := 'key_reused';
            recorded_units := v_earlier;
        END IF;
    ELSIF p_limit IS NULL OR p_units <= p_limit - v_used THEN
        INSERT INTO quota_consumptions (user_id, feature, idempotency_key, units, consumed_at_us, released)
            VALUES (p_user_id, p_feature, p_key, p_units, p_now_us, false);
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
