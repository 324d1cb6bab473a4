-- History pages (newest first, keyset on the entry id) read one user's entries through
-- an index ordered on `-id`, an order no other index has. With the old index
-- (user_id, id DESC), the primary key could produce `ORDER BY id DESC` too, and for a
-- user holding a large share of the ledger PostgreSQL's statistics preferred a
-- backward scan of the primary key filtered on user_id: a page then walked every newer
-- entry of every other user (94 ms at 10M entries, over 60 s at 50M). On `-id` the
-- primary key offers no order, so every plan reads only the user's entries.
CREATE INDEX credit_ledger_user_newest ON credit_ledger (user_id, (-id));
DROP INDEX credit_ledger_user_id_id;
