-- Plans now take what a lot has reserved from its `held_micros` (moved in the same
-- transaction as every reservation) instead of adding up the reservations of every
-- held hold. Two races of earlier versions could leave `held_micros` above that sum (a
-- hold of another user naming an expired hold's id; a settle finding its hold's owner
-- unlocked), which the old reads hid and the new ones would keep reserved: recount it
-- once from the reservations of the holds still held. Only lots with something held
-- can be off (neither race lowered `held_micros`).
UPDATE credit_lots SET held_micros = COALESCE((
    SELECT SUM(r.amount_micros) FROM credit_hold_reservations AS r
    JOIN credit_holds AS h ON h.hold_id = r.hold_id
    WHERE r.lot_id = credit_lots.id AND h.status = 'held'
), 0)
WHERE held_micros > 0;
