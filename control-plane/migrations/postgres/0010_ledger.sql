-- The hash-chained audit ledger (see docs/ledger.md): each new entry keeps
-- the hash of the one before it and its own, over its canonical bytes,
-- which now include the call's trace id and agent context. Rows written
-- before this migration keep NULL hashes and sit before the chain's start.
ALTER TABLE audit ADD COLUMN trace_id TEXT NOT NULL DEFAULT '';
ALTER TABLE audit ADD COLUMN context TEXT NOT NULL DEFAULT '{}';
ALTER TABLE audit ADD COLUMN prev_hash BYTEA;
ALTER TABLE audit ADD COLUMN hash BYTEA;
CREATE INDEX audit_trace_id ON audit (trace_id, seq);

-- The chain's head: the last entry's seq and hash. Appending locks its row
-- (FOR UPDATE), so replicas appending at once take turns and the order of
-- entries is decided here, once.
CREATE TABLE ledger_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash BYTEA NOT NULL
);
INSERT INTO ledger_head (id, seq, hash)
    SELECT 1, COALESCE(MAX(seq), 0), decode(repeat('00', 32), 'hex') FROM audit;

