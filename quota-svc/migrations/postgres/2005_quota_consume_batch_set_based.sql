-- Group commit of check-and-consumes, set-based: three statements for the whole batch
-- instead of about seven per item (migration 2003 ran quota_consume, 2004, once per
-- item). Same signature, same answers, same rules (quota-svc/src/rules.rs,
-- plan_consume), same lock order:
--   1. resolve each item's tier and limit (an override wins; an unknown stored tier is
--      'unknown_tier' and locks nothing), then create-or-lock the counters of the
--      others in (user, feature) order, as 2003 does, so no two batches deadlock;
--   2. after the locks (a statement of its own, so it sees what the transactions it
--      waited for wrote): read each item's key, prune what left the window and find
--      the oldest unit that stays;
--   3. decide each item, record the units that fit, move the counters, answer.
-- Items of one (user, feature) depend on each other in request order: a batch that
-- names a pair more than once runs the item loop of 2003, kept as quota_consume_each,
-- and so does a batch of fewer than four items, for which the loop is cheaper.
ALTER FUNCTION quota_consume_batch(TEXT[], TEXT[], TEXT[], BIGINT[], BIGINT[], BIGINT[], BIGINT[], BIGINT[], BIGINT[])
    RENAME TO quota_consume_each;

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
-- Planned once: a custom plan for each call's arrays (plpgsql's default while a
-- generic plan looks costlier) spent ~0.5 ms planning these statements, more than
-- running them; the generic plans are the index lookups a batch wants.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    -- Per item, by position: tier, limit (NULL: unlimited), the counter's units when
    -- locked (NULL: unknown tier, nothing locked), the key's row if any, the units
    -- pruned and the oldest unpruned unit not released.
    v_tiers    TEXT[];
    v_limits   BIGINT[];
    v_counted  BIGINT[];
    v_earlier  BIGINT[];
    v_at_us    BIGINT[];
    v_released BOOLEAN[];
    v_expired  BIGINT[];
    v_oldest   BIGINT[];
BEGIN
    -- Below four items the loop is cheaper (the set-based statements cost ~0.1 ms to
    -- start whatever their size; measured in BENCHMARKS.md).
    IF COALESCE(cardinality(p_user_ids), 0) < 4 OR EXISTS (
        SELECT 1 FROM unnest(p_user_ids, p_features) AS t(u, f) GROUP BY t.u, t.f HAVING count(*) > 1
    ) THEN
        RETURN QUERY SELECT * FROM quota_consume_each(
            p_user_ids, p_features, p_keys, p_units, p_free, p_pro, p_enterprise, p_now_us, p_cutoff_us);
        RETURN;
    END IF;

    WITH item AS (
        SELECT t.ord::INT AS ord, t.u, t.f, COALESCE(qt.tier, 'free') AS t_tier
        FROM unnest(p_user_ids, p_features) WITH ORDINALITY AS t(u, f, ord)
        LEFT JOIN quota_tiers qt ON qt.user_id = t.u
    ), limited AS (
        SELECT i.ord, i.u, i.f, i.t_tier,
               i.t_tier IN ('free', 'pro', 'enterprise') AS known,
               CASE
                   WHEN o.user_id IS NOT NULL THEN CASE WHEN o.unlimited THEN NULL ELSE o.limit_units END
                   WHEN i.t_tier = 'free' THEN p_free[i.ord]
                   WHEN i.t_tier = 'pro' THEN p_pro[i.ord]
                   WHEN i.t_tier = 'enterprise' THEN p_enterprise[i.ord]
               END AS t_limit
        FROM item i
        LEFT JOIN quota_overrides o ON o.user_id = i.u AND o.feature = i.f
    ), locked AS (
        INSERT INTO quota_counters AS c (user_id, feature, used)
        SELECT l.u, l.f, 0 FROM limited l WHERE l.known ORDER BY l.u, l.f
        ON CONFLICT (user_id, feature) DO UPDATE SET used = c.used
        RETURNING c.user_id, c.feature, c.used
    )
    SELECT array_agg(l.t_tier ORDER BY l.ord),
           array_agg(l.t_limit ORDER BY l.ord),
           array_agg(k.used ORDER BY l.ord)
    INTO v_tiers, v_limits, v_counted
    FROM limited l
    LEFT JOIN locked k ON k.user_id = l.u AND k.feature = l.f;

    -- One snapshot: the key's row as it was before the prune, which runs beside it.
    WITH item AS (
        SELECT t.ord::INT AS ord, t.u, t.f, t.k, t.cutoff
        FROM unnest(p_user_ids, p_features, p_keys, p_cutoff_us) WITH ORDINALITY AS t(u, f, k, cutoff, ord)
        WHERE v_counted[t.ord] IS NOT NULL
    ), gone AS (
        DELETE FROM quota_consumptions q
        USING item i
        WHERE q.user_id = i.u AND q.feature = i.f AND q.consumed_at_us <= i.cutoff
        RETURNING i.ord, q.units, q.released
    ), pruned AS (
        SELECT g.ord, COALESCE(SUM(g.units) FILTER (WHERE NOT g.released), 0)::BIGINT AS units
        FROM gone g GROUP BY g.ord
    )
    SELECT array_agg(e.units ORDER BY s.ord),
           array_agg(e.consumed_at_us ORDER BY s.ord),
           array_agg(e.released ORDER BY s.ord),
           array_agg(COALESCE(p.units, 0) ORDER BY s.ord),
           array_agg(m.oldest ORDER BY s.ord)
    INTO v_earlier, v_at_us, v_released, v_expired, v_oldest
    FROM generate_series(1, cardinality(p_user_ids)) AS s(ord)
    LEFT JOIN item i ON i.ord = s.ord
    LEFT JOIN quota_consumptions e
        ON e.user_id = i.u AND e.feature = i.f AND e.idempotency_key = i.k
    LEFT JOIN pruned p ON p.ord = s.ord
    LEFT JOIN LATERAL (
        SELECT MIN(q.consumed_at_us) AS oldest FROM quota_consumptions q
        WHERE q.user_id = i.u AND q.feature = i.f AND NOT q.released AND q.consumed_at_us > i.cutoff
    ) AS m ON true;

    RETURN QUERY
    WITH item AS (
        SELECT t.ord::INT AS ord, t.u, t.f, t.k, t.n, t.now_us, t.cutoff,
               v_counted[t.ord] AS counted,
               v_counted[t.ord] - v_expired[t.ord] AS kept,
               v_limits[t.ord] AS lim
        FROM unnest(p_user_ids, p_features, p_keys, p_units, p_now_us, p_cutoff_us)
            WITH ORDINALITY AS t(u, f, k, n, now_us, cutoff, ord)
    ), plan AS (
        SELECT i.*,
               CASE
                   WHEN i.counted IS NULL THEN 'unknown_tier'
                   -- rules::counted_units: the key counts only if present, not
                   -- released, and after the cutoff.
                   WHEN v_earlier[i.ord] IS NOT NULL AND NOT v_released[i.ord] AND v_at_us[i.ord] > i.cutoff THEN
                       CASE WHEN v_earlier[i.ord] = i.n THEN 'duplicate' ELSE 'key_reused' END
                   -- rules::fits, without overflow: units <= limit - used.
                   WHEN i.lim IS NULL OR i.n <= i.lim - i.kept THEN 'recorded'
                   ELSE 'refused'
               END AS verdict
        FROM item i
    ), after AS (
        SELECT p.*, CASE WHEN p.verdict = 'recorded' THEN p.kept + p.n ELSE p.kept END AS now_used
        FROM plan p
    ), recorded AS (
        INSERT INTO quota_consumptions AS q (user_id, feature, idempotency_key, units, consumed_at_us, released)
        SELECT a.u, a.f, a.k, a.n, a.now_us, false FROM after a WHERE a.verdict = 'recorded'
        ON CONFLICT (user_id, feature, idempotency_key) DO UPDATE SET
            units = EXCLUDED.units, consumed_at_us = EXCLUDED.consumed_at_us, released = false
    ), moved AS (
        UPDATE quota_counters AS c SET used = a.now_used
        FROM after a
        WHERE c.user_id = a.u AND c.feature = a.f AND a.counted IS NOT NULL AND a.now_used <> a.counted
    )
    SELECT a.ord,
           a.verdict,
           CASE WHEN a.verdict = 'key_reused' THEN v_earlier[a.ord] END,
           CASE WHEN a.counted IS NULL THEN 0 ELSE a.now_used END,
           CASE
               WHEN a.counted IS NULL THEN NULL
               WHEN a.verdict = 'recorded' THEN LEAST(v_oldest[a.ord], a.now_us)
               ELSE v_oldest[a.ord]
           END,
           v_tiers[a.ord],
           CASE WHEN a.counted IS NULL THEN NULL ELSE a.lim END
    FROM after a
    ORDER BY a.ord;
END;
$$;
