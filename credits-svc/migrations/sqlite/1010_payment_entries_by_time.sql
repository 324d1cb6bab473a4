-- Reconciliation lists the entries of Stripe money in a time window: a partial index of
-- only those entries, by time, so a page reads the window's payment entries instead of
-- walking the ledger.
CREATE INDEX credit_ledger_payments_by_time ON credit_ledger (created_at_us)
    WHERE key_source = 'stripe' OR payment_id IS NOT NULL;
