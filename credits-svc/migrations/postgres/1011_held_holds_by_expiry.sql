-- Every ledger transaction over users whose lots carry reservations looks for their held
-- holds past their instant (to expire them first). The index had the user only, so that
-- read fetched every held hold of those users and filtered on the instant (0.9 ms for a
-- batch of 100 users holding ~3 holds each, finding none). With the instant in the index
-- it reads only the due ones; reading all of a user's held holds (the balance) uses its
-- first column as before.
--
-- Not CONCURRENTLY, like 1010: the build blocks writes to the holds while it scans the
-- held ones; on a large table create the index by hand first with CONCURRENTLY, and this
-- migration finds it.
CREATE INDEX IF NOT EXISTS credit_holds_user_held_due ON credit_holds (user_id, expires_at_us)
    WHERE status = 'held';
DROP INDEX IF EXISTS credit_holds_user_held;
