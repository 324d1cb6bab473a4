-- Group commit of check-and-consumes, set-based: three statements for a batch's items
-- instead of about seven per item (migration 2003 ran quota_consume, 2004, once per
-- item). Same signature, same answers, same rules (quota-svc/src/rules.rs,
-- plan_consume), same lock order.
--
-- Items of one (user, feature) depend on each other in request order, so the batch is
-- taken in two parts: the first item of each pair, set-based (quota_consume_set_based
-- below), then the pairs' later items through the item loop of 2003, kept as
-- quota_consume_each, in request order. The first part locks every counter the
-- second needs, in (user, feature) order, as 2003 does: no two batches deadlock (a
-- pair whose tier the first part found unknown, and so did not lock, keeps that
-- answer for its later items rather than lock late). Under six distinct pairs the
-- whole batch takes the loop, which is cheaper there.
ALTER FUNCTION quota_consume_batch(TEXT[], TEXT[], TEXT[], BIGINT[], BIGINT[], BIGINT[], BIGINT[], BIGINT[], BIGINT[])
    RENAME TO quota_consume_each;

-- The items at the positions p_pick (1-based; no (user, feature) twice) of the arrays:
--   1. resolve each item's tier and limit (an override wins; an unknown stored tier is
--      'unknown_tier' and locks nothing), then create-or-lock the counters of the
--      others in (user, feature) order;
--   2. after the locks (a statement of its own, so it sees what the transactions it
--      waited for wrote): read each item's key, prune what left the window and find
--      the oldest unit that stays, in one snapshot (the key as it was before the prune);
--   3. decide each item, record the units that fit, move the counters, answer (idx is
--      the item's position in the arrays).
CREATE FUNCTION quota_consume_set_based(
    p_user_ids   TEXT[],
    p_features   TEXT[],
    p_keys       TEXT[],
    p_units      BIGINT[],
    p_free       BIGINT[],
    p_pro        BIGINT[],
    p_enterprise BIGINT[],
    p_now_us     BIGINT[],
    p_cutoff_us  BIGINT[],
    p_pick       INT[]
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
-- Planned once: a custom plan for each call's arrays (plpgsql's default while a
-- generic plan looks costlier) spent ~0.5 ms planning these statements, more than
-- running them; the generic plans are the index lookups a batch wants.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    -- Per item, by its place in p_pick: tier, limit (NULL: unlimited), the counter's
    -- units when locked (NULL: unknown tier, nothing locked), the key's row if any,
    -- the units pruned and the oldest unpruned unit not released.
    v_tiers    TEXT[];
    v_limits   BIGINT[];
    v_counted  BIGINT[];
    v_earlier  BIGINT[];
    v_at_us    BIGINT[];
    v_released BOOLEAN[];
    v_expired  BIGINT[];
    v_oldest   BIGINT[];
BEGIN
    WITH item AS (
        SELECT t.n, t.ord, t.u, t.f, COALESCE(qt.tier, 'free') AS t_tier
        FROM (
            SELECT s.n::INT AS n, s.ord, p_user_ids[s.ord] AS u, p_features[s.ord] AS f
            FROM unnest(p_pick) WITH ORDINALITY AS s(ord, n)
        ) AS t
        LEFT JOIN quota_tiers qt ON qt.user_id = t.u
    ), limited AS (
        SELECT i.n, i.ord, i.u, i.f, i.t_tier,
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
    SELECT array_agg(l.t_tier ORDER BY l.n),
           array_agg(l.t_limit ORDER BY l.n),
           array_agg(k.used ORDER BY l.n)
    INTO v_tiers, v_limits, v_counted
    FROM limited l
    LEFT JOIN locked k ON k.user_id = l.u AND k.feature = l.f;

    -- One snapshot: the key's row as it was before the prune, which runs beside it.
    WITH item AS (
        SELECT s.n::INT AS n, p_user_ids[s.ord] AS u, p_features[s.ord] AS f, p_keys[s.ord] AS k,
               p_cutoff_us[s.ord] AS cutoff
        FROM unnest(p_pick) WITH ORDINALITY AS s(ord, n)
        WHERE v_counted[s.n] IS NOT NULL
    ), gone AS (
        DELETE FROM quota_consumptions q
        USING item i
        WHERE q.user_id = i.u AND q.feature = i.f AND q.consumed_at_us <= i.cutoff
        RETURNING i.n, q.units, q.released
    ), pruned AS (
        SELECT g.n, COALESCE(SUM(g.units) FILTER (WHERE NOT g.released), 0)::BIGINT AS units
        FROM gone g GROUP BY g.n
    )
    SELECT array_agg(e.units ORDER BY s.n),
           array_agg(e.consumed_at_us ORDER BY s.n),
           array_agg(e.released ORDER BY s.n),
           array_agg(COALESCE(p.units, 0) ORDER BY s.n),
           array_agg(m.oldest ORDER BY s.n)
    INTO v_earlier, v_at_us, v_released, v_expired, v_oldest
    FROM generate_series(1, cardinality(p_pick)) AS s(n)
    LEFT JOIN item i ON i.n = s.n
    LEFT JOIN quota_consumptions e
        ON e.user_id = i.u AND e.feature = i.f AND e.idempotency_key = i.k
    LEFT JOIN pruned p ON p.n = s.n
    LEFT JOIN LATERAL (
        SELECT MIN(q.consumed_at_us) AS oldest FROM quota_consumptions q
        WHERE q.user_id = i.u AND q.feature = i.f AND NOT q.released AND q.consumed_at_us > i.cutoff
    ) AS m ON true;

    RETURN QUERY
    WITH item AS (
        SELECT s.n::INT AS n, s.ord::INT AS ord,
               p_user_ids[s.ord] AS u, p_features[s.ord] AS f, p_keys[s.ord] AS k,
               p_units[s.ord] AS units, p_now_us[s.ord] AS now_us, p_cutoff_us[s.ord] AS cutoff,
               v_counted[s.n] AS counted,
               v_counted[s.n] - v_expired[s.n] AS kept,
               v_limits[s.n] AS lim
        FROM unnest(p_pick) WITH ORDINALITY AS s(ord, n)
    ), plan AS (
        SELECT i.*,
               CASE
                   WHEN i.counted IS NULL THEN 'unknown_tier'
                   -- rules::counted_units: the key counts only if present, not
                   -- released, and after the cutoff.
                   WHEN v_earlier[i.n] IS NOT NULL AND NOT v_released[i.n] AND v_at_us[i.n] > i.cutoff THEN
                       CASE WHEN v_earlier[i.n] = i.units THEN 'duplicate' ELSE 'key_reused' END
                   -- rules::fits, without overflow: units <= limit - used.
                   WHEN i.lim IS NULL OR i.units <= i.lim - i.kept THEN 'recorded'
                   ELSE 'refused'
               END AS verdict
        FROM item i
    ), after AS (
        SELECT p.*, CASE WHEN p.verdict = 'recorded' THEN p.kept + p.units ELSE p.kept END AS now_used
        FROM plan p
    ), recorded AS (
        INSERT INTO quota_consumptions AS q (user_id, feature, idempotency_key, units, consumed_at_us, released)
        SELECT a.u, a.f, a.k, a.units, a.now_us, false FROM after a WHERE a.verdict = 'recorded'
        ON CONFLICT (user_id, feature, idempotency_key) DO UPDATE SET
            units = EXCLUDED.units, consumed_at_us = EXCLUDED.consumed_at_us, released = false
    ), moved AS (
        UPDATE quota_counters AS c SET used = a.now_used
        FROM after a
        WHERE c.user_id = a.u AND c.feature = a.f AND a.counted IS NOT NULL AND a.now_used <> a.counted
    )
    SELECT a.ord,
           a.verdict,
           CASE WHEN a.verdict = 'key_reused' THEN v_earlier[a.n] END,
           CASE WHEN a.counted IS NULL THEN 0 ELSE a.now_used END,
           CASE
               WHEN a.counted IS NULL THEN NULL
               WHEN a.verdict = 'recorded' THEN LEAST(v_oldest[a.n], a.now_us)
               ELSE v_oldest[a.n]
           END,
           v_tiers[a.n],
           CASE WHEN a.counted IS NULL THEN NULL ELSE a.lim END
    FROM after a
    ORDER BY a.ord;
END;
$$;

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
    v_first    INT[];
    v_rest     INT[];
    -- By position: the position of the first item of the same pair; for a first item
    -- answered 'unknown_tier', the tier it saw.
    v_first_of INT[];
    v_unknown  TEXT[] := '{}';
    v_row      RECORD;
BEGIN
    SELECT array_agg(t.ord ORDER BY t.ord) FILTER (WHERE t.first_ord = t.ord),
           array_agg(t.ord ORDER BY t.ord) FILTER (WHERE t.first_ord < t.ord),
           array_agg(t.first_ord ORDER BY t.ord)
    INTO v_first, v_rest, v_first_of
    FROM (
        SELECT s.ord::INT AS ord,
               (min(s.ord) OVER (PARTITION BY s.u, s.f))::INT AS first_ord
        FROM unnest(p_user_ids, p_features) WITH ORDINALITY AS s(u, f, ord)
    ) AS t;
    -- Below six pairs the loop is cheaper (the set-based statements cost ~0.1 ms to
    -- start whatever their size; measured in BENCHMARKS.md).
    IF COALESCE(cardinality(v_first), 0) < 6 THEN
        RETURN QUERY SELECT * FROM quota_consume_each(
            p_user_ids, p_features, p_keys, p_units, p_free, p_pro, p_enterprise, p_now_us, p_cutoff_us);
        RETURN;
    END IF;
    FOR v_row IN SELECT * FROM quota_consume_set_based(
        p_user_ids, p_features, p_keys, p_units, p_free, p_pro, p_enterprise, p_now_us, p_cutoff_us, v_first)
    LOOP
        IF v_row.outcome = 'unknown_tier' THEN
            v_unknown[v_row.idx] := v_row.tier;
        END IF;
        idx := v_row.idx;
        outcome := v_row.outcome;
        recorded_units := v_row.recorded_units;
        used := v_row.used;
        oldest_us := v_row.oldest_us;
        tier := v_row.tier;
        limit_units := v_row.limit_units;
        RETURN NEXT;
    END LOOP;
    IF v_rest IS NULL THEN
        RETURN;
    END IF;
    -- A pair whose first item found its tier unknown locked nothing: its later items get
    -- the same answer. Reading the tier again could find it known now and lock that
    -- counter after others that sort later, out of order (a deadlock with a batch
    -- taking them in order).
    RETURN QUERY
    SELECT r.o, 'unknown_tier'::TEXT, NULL::BIGINT, 0::BIGINT, NULL::BIGINT, v_unknown[v_first_of[r.o]], NULL::BIGINT
    FROM unnest(v_rest) AS r(o)
    WHERE v_unknown[v_first_of[r.o]] IS NOT NULL;
    SELECT array_agg(r.o ORDER BY r.o) INTO v_rest
    FROM unnest(v_rest) AS r(o)
    WHERE v_unknown[v_first_of[r.o]] IS NULL;
    IF v_rest IS NOT NULL THEN
        -- v_rest is in request order, so ordering by position keeps it.
        RETURN QUERY
        SELECT v_rest[e.idx], e.outcome, e.recorded_units, e.used, e.oldest_us, e.tier, e.limit_units
        FROM quota_consume_each(
            ARRAY(SELECT p_user_ids[r.o] FROM unnest(v_rest) AS r(o) ORDER BY r.o),
            ARRAY(SELECT p_features[r.o] FROM unnest(v_rest) AS r(o) ORDER BY r.o),
            ARRAY(SELECT p_keys[r.o] FROM unnest(v_rest) AS r(o) ORDER BY r.o),
            ARRAY(SELECT p_units[r.o] FROM unnest(v_rest) AS r(o) ORDER BY r.o),
            ARRAY(SELECT p_free[r.o] FROM unnest(v_rest) AS r(o) ORDER BY r.o),
            ARRAY(SELECT p_pro[r.o] FROM unnest(v_rest) AS r(o) ORDER BY r.o),
            ARRAY(SELECT p_enterprise[r.o] FROM unnest(v_rest) AS r(o) ORDER BY r.o),
            ARRAY(SELECT p_now_us[r.o] FROM unnest(v_rest) AS r(o) ORDER BY r.o),
            ARRAY(SELECT p_cutoff_us[r.o] FROM unnest(v_rest) AS r(o) ORDER BY r.o)
        ) AS e;
    END IF;
END;
$$;
