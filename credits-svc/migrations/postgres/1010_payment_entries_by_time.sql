-- Reconciliation lists the entries of Stripe money in a time window. No index had the
-- time, so every page walked the ledger's primary key from the page's cursor, filtering
-- every other entry out (176 ms for a page at a million entries on a generic plan). A
-- partial index holds only those entries, by time: a page reads the window's payment
-- entries (1.2 ms there).
--
-- Not CONCURRENTLY: a concurrent build waits for every older transaction, including a
-- second migrator waiting on the migration lock, which deadlocks. The build blocks
-- writes to the ledger while it scans it; on a large ledger create the index by hand
-- first, with the same definition and CONCURRENTLY (deploy/README.md), and this
-- migration finds it and does nothing.
CREATE INDEX IF NOT EXISTS credit_ledger_payments_by_time ON credit_ledger (created_at_us)
    WHERE key_source = 'stripe' OR payment_id IS NOT NULL;
