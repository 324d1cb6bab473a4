-- The users' held holds past their instant, read by every ledger transaction over users
-- whose lots carry reservations, come from one range of this index rather than every
-- held hold of theirs (as on PostgreSQL, migration 1011 there).
CREATE INDEX IF NOT EXISTS credit_holds_user_held_due ON credit_holds (user_id, expires_at_us)
    WHERE status = 'held';
DROP INDEX IF EXISTS credit_holds_user_held;
