-- A vendor's price table set by the operator (JSON text in its profile's
-- table format); empty means the tables shipped with keycap.
ALTER TABLE vendors ADD COLUMN prices TEXT NOT NULL DEFAULT '';
