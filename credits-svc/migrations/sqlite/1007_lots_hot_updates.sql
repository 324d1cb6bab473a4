-- The column PostgreSQL's lot indexes depend on (see its 1007), so both stores run the
-- same queries; here it is computed on read and the indexes stay as they were.
ALTER TABLE credit_lots ADD COLUMN live INTEGER GENERATED ALWAYS AS (remaining_micros > 0) VIRTUAL;
