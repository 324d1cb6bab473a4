-- Spending from a lot changes its remaining_micros, which the partial indexes on lots
-- named in their predicates (`WHERE remaining_micros > 0`). A column an index depends
-- on makes every UPDATE of it a non-HOT update: a new row version with a new entry in
-- every index of the table, for each deduction. The indexes now depend on `live`, a
-- stored generated column that changes only when a lot is spent out (or refilled), so
-- the usual deduction updates a lot in place (HOT) and touches no index. Queries name
-- `live` beside `remaining_micros > 0` so either store's planner finds its index.
ALTER TABLE credit_lots ADD COLUMN live BOOLEAN GENERATED ALWAYS AS (remaining_micros > 0) STORED;
DROP INDEX credit_lots_live;
DROP INDEX credit_lots_due;
CREATE INDEX credit_lots_live ON credit_lots (user_id) WHERE live;
CREATE INDEX credit_lots_due ON credit_lots (expires_at_us) WHERE live AND expires_at_us IS NOT NULL;
-- Room on each page for the new row versions of HOT updates (balances and lots change
-- with every deduction).
ALTER TABLE credit_lots SET (fillfactor = 70);
ALTER TABLE credit_accounts SET (fillfactor = 70);
