-- What may be dropped from the ledger, and what was (docs/ledger.md,
-- "Partitions and retention"). `exported_through`: the highest seq such
-- that an export held every entry up to it (recorded by the export
-- endpoint when a whole-ledger export completes). `dropped_through` and
-- `dropped_hash`: the last entry removed by retention and its hash, where
-- verify starts once older entries are gone (0 and zeros: none removed).
CREATE TABLE ledger_retention (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    exported_through BIGINT NOT NULL,
    dropped_through  BIGINT NOT NULL,
    dropped_hash     BYTEA NOT NULL
);
INSERT INTO ledger_retention (id, exported_through, dropped_through, dropped_hash)
    VALUES (1, 0, 0, decode(repeat('00', 32), 'hex'));
