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
SELECT 'each 1', bench('each', 2000, 1);
SELECT 'batch 1', bench('batch', 2000, 1);
SELECT 'each 2', bench('each', 1000, 2);
SELECT 'batch 2', bench('batch', 1000, 2);
SELECT 'each 4', bench('each', 500, 4);
SELECT 'batch 4', bench('batch', 500, 4);
SELECT 'each 6', bench('each', 400, 6);
SELECT 'batch 6', bench('batch', 400, 6);
SELECT 'each 8', bench('each', 300, 8);
SELECT 'batch 8', bench('batch', 300, 8);
SELECT 'each 16', bench('each', 200, 16);
SELECT 'batch 16', bench('batch', 200, 16);
SELECT 'each 32', bench('each', 100, 32);
SELECT 'batch 32', bench('batch', 100, 32);
SELECT 'each 1', bench('each', 2000, 1);
SELECT 'batch 1', bench('batch', 2000, 1);
SELECT 'each 2', bench('each', 1000, 2);
SELECT 'batch 2', bench('batch', 1000, 2);
SELECT 'each 4', bench('each', 500, 4);
SELECT 'batch 4', bench('batch', 500, 4);
SELECT 'each 6', bench('each', 400, 6);
SELECT 'batch 6', bench('batch', 400, 6);
SELECT 'each 8', bench('each', 300, 8);
SELECT 'batch 8', bench('batch', 300, 8);
SELECT 'each 16', bench('each', 200, 16);
SELECT 'batch 16', bench('batch', 200, 16);
SELECT 'each 32', bench('each', 100, 32);
SELECT 'batch 32', bench('batch', 100, 32);
DROP SCHEMA quota_batch_bench CASCADE;
