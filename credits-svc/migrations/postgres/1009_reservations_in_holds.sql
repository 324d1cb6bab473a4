-- A hold's reservations move into its own row, as two arrays in position order (lot
-- ids and amounts): a hold then writes one row, not one per lot it reserves from, and
-- its resolution clears the arrays in the update that already changes its state
-- instead of deleting rows of a second table. Reading a plan's holds loses a join. A
-- resolved hold reserves nothing, as before: its arrays are empty.
ALTER TABLE credit_holds
    ADD COLUMN reserved_lot_ids BIGINT[] NOT NULL DEFAULT '{}',
    ADD COLUMN reserved_micros  BIGINT[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT credit_holds_reservations_paired
        CHECK (cardinality(reserved_lot_ids) = cardinality(reserved_micros));

UPDATE credit_holds AS h
SET reserved_lot_ids = r.lot_ids, reserved_micros = r.amounts
FROM (
    SELECT hold_id,
           array_agg(lot_id ORDER BY position, lot_id) AS lot_ids,
           array_agg(amount_micros ORDER BY position, lot_id) AS amounts
    FROM credit_hold_reservations GROUP BY hold_id
) AS r
WHERE h.hold_id = r.hold_id AND h.status = 'held';

DROP TABLE credit_hold_reservations;
