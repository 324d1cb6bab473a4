-- Group commit of check-and-consumes: many quota_consume calls in one transaction,
-- one round trip. Items are taken in (user, feature) order, so two concurrent batches
-- lock counter rows in the same order and cannot deadlock; items of one user and
-- feature keep their request order, so each gets the outcome it would have had alone.
-- Answers one row per item, `idx` being its 1-based position in the arrays.
CREATE FUNCTION quota_consume_batch(
    p_user_ids  TEXT[],
    p_features  TEXT[],
    p_keys      TEXT[],
    p_units     BIGINT[],
    p_limits    BIGINT[],
    p_now_us    BIGINT[],
    p_cutoff_us BIGINT[]
) RETURNS TABLE (idx INT, outcome TEXT, recorded_units BIGINT, used BIGINT, oldest_us BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    i INT;
BEGIN
    FOR i IN
        SELECT t.ord::INT FROM unnest(p_user_ids, p_features) WITH ORDINALITY AS t(user_id, feature, ord)
        ORDER BY t.user_id, t.feature, t.ord
    LOOP
        RETURN QUERY
            SELECT i, c.outcome, c.recorded_units, c.used, c.oldest_us
            FROM quota_consume(p_user_ids[i], p_features[i], p_keys[i], p_units[i], p_limits[i], p_now_us[i], p_cutoff_us[i]) AS c;
    END LOOP;
END;
$$;
