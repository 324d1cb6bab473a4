-- Group commit of check-and-consumes: many of them in one transaction, one round trip,
-- each resolving its own limit (the user's tier, or their override for the feature)
-- and then running quota_consume (migration 2002). The caller passes the registry's
-- limit of each tier for each item's feature (NULL = unlimited).
--
-- Items are taken in (user, feature) order, so two concurrent batches lock counter rows
-- in the same order and cannot deadlock; items of one user and feature keep their
-- request order, so each gets the outcome it would have had alone. One row per item:
-- `idx` is its 1-based position; outcome 'unknown_tier' when the stored tier is not
-- one of free, pro, enterprise (the tiers of quota-svc's registry::TIERS, in order).
-- A lock wait longer than lock_timeout fails the batch, whose items the service then
-- runs one by one, so a stuck row stalls only the calls that need it.
CREATE FUNCTION quota_consume_batch(
    p_user_ids   TEXT[],
    p_features   TEXT[],
    p_keys       TEXT[],
    p_units      BIGINT[],
    p_free       BIGINT[],
    p_pro        BIGINT[],
    p_enterprise BIGINT[],
    p_now_us     BIGINT[],
    p_cutoff_us  BIGINT[]
) RETURNS TABLE (
    idx            INT,
    outcome        TEXT,
    recorded_units BIGINT,
    used           BIGINT,
    oldest_us      BIGINT,
    tier           TEXT,
    limit_units    BIGINT
)
LANGUAGE plpgsql
SET lock_timeout = '2s'
AS $$
DECLARE
    i           INT;
    v_tier      TEXT;
    v_limit     BIGINT;
    v_unlimited BOOLEAN;
    v_units     BIGINT;
BEGIN
    FOR i IN
        SELECT t.ord::INT FROM unnest(p_user_ids, p_features) WITH ORDINALITY AS t(user_id, feature, ord)
        ORDER BY t.user_id, t.feature, t.ord
    LOOP
        v_tier := NULL;
        SELECT qt.tier INTO v_tier FROM quota_tiers qt WHERE qt.user_id = p_user_ids[i];
        v_tier := COALESCE(v_tier, 'free');
        IF v_tier = 'free' THEN
            v_limit := p_free[i];
        ELSIF v_tier = 'pro' THEN
            v_limit := p_pro[i];
        ELSIF v_tier = 'enterprise' THEN
            v_limit := p_enterprise[i];
        ELSE
            idx := i;
            outcome := 'unknown_tier';
            recorded_units := NULL;
            used := 0;
            oldest_us := NULL;
            tier := v_tier;
            limit_units := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
        SELECT o.unlimited, o.limit_units INTO v_unlimited, v_units
            FROM quota_overrides o WHERE o.user_id = p_user_ids[i] AND o.feature = p_features[i];
        IF FOUND THEN
            v_limit := CASE WHEN v_unlimited THEN NULL ELSE v_units END;
        END IF;
        RETURN QUERY
            SELECT i, c.outcome, c.recorded_units, c.used, c.oldest_us, v_tier, v_limit
            FROM quota_consume(p_user_ids[i], p_features[i], p_keys[i], p_units[i], v_limit, p_now_us[i], p_cutoff_us[i]) AS c;
    END LOOP;
END;
$$;
