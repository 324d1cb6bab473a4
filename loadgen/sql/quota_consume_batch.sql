-- Per-item cost of quota_consume_batch's two paths (migration 2005): the set-based
-- statements against the item loop (quota_consume_each), by batch size, inside one
-- transaction of one session (no commit, no client): PostgreSQL's side alone. Seeds
-- 20,000 users with two usage rows each in a scratch schema, dropped at the end.
-- Prints µs per item; each size runs twice, the second run after plans are cached.
-- `batch` is quota_consume_batch itself: under six items it takes the loop too.
--
--   cd quota-svc/migrations/postgres && \
--     psql -h 127.0.0.1 -U postgres -d test -q -t -f ../../../loadgen/sql/quota_consume_batch.sql
DROP SCHEMA IF EXISTS quota_batch_bench CASCADE;
CREATE SCHEMA quota_batch_bench;
SET search_path = quota_batch_bench;
\i 2001_quota.sql
\i 2002_quota_consume.sql
\i 2003_quota_consume_batch.sql
\i 2004_quota_consume_forgets_spent_keys.sql
\i 2005_quota_consume_batch_set_based.sql
INSERT INTO quota_counters SELECT 'u'||u, 'f', 2 FROM generate_series(1,20000) u;
INSERT INTO quota_consumptions SELECT 'u'||u, 'f', 'seed'||r, 1, 1000000 + r FROM generate_series(1,20000) u, generate_series(1,2) r;
ANALYZE;
CREATE FUNCTION bench(which TEXT, rounds INT, size INT) RETURNS DOUBLE PRECISION LANGUAGE plpgsql AS $$
DECLARE t0 TIMESTAMPTZ; r INT; users TEXT[]; keys TEXT[];
BEGIN
  t0 := clock_timestamp();
  FOR r IN 1..rounds LOOP
    SELECT array_agg('u'||(1 + ((r*size + s) % 20000))), array_agg(which||'-'||r||'-'||s) INTO users, keys FROM generate_series(1,size) s;
    IF which = 'batch' THEN
      PERFORM * FROM quota_consume_batch(users, array_fill('f'::text, ARRAY[size]), keys, array_fill(1::int8, ARRAY[size]), array_fill(1000::int8, ARRAY[size]), array_fill(1000::int8, ARRAY[size]), array_fill(NULL::int8, ARRAY[size]), array_fill(2000000::int8, ARRAY[size]), array_fill(500000::int8, ARRAY[size]));
    ELSE
      PERFORM * FROM quota_consume_each(users, array_fill('f'::text, ARRAY[size]), keys, array_fill(1::int8, ARRAY[size]), array_fill(1000::int8, ARRAY[size]), array_fill(1000::int8, ARRAY[size]), array_fill(NULL::int8, ARRAY[size]), array_fill(2000000::int8, ARRAY[size]), array_fill(500000::int8, ARRAY[size]));
    END IF;
  END LOOP;
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1e6 / (rounds * size);
END $$;
-- One pass over the sizes, loop first at each size; run twice (the second after
-- every plan is cached): one row per size and function.
\set pass 'SELECT s.size, w.which, round(bench(w.which, greatest(100, 2000 / s.size), s.size)::numeric, 1) AS us_per_item FROM unnest(''{1,2,4,6,8,16,32}''::int[]) WITH ORDINALITY AS s(size, o) CROSS JOIN (VALUES (1, ''each''), (2, ''batch'')) AS w(n, which) ORDER BY s.o, w.n'
:pass;
:pass;
DROP SCHEMA quota_batch_bench CASCADE;
