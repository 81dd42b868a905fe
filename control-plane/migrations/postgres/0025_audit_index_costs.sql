-- What each appended ledger entry costs PostgreSQL to index (docs/ledger.md,
-- "Ingest").
--
-- The audit columns keycap looks entries up by are ids and codes it
-- compares for equality and orders as bytes: they take the "C" collation,
-- so the b-tree inserts of every append compare bytes instead of calling
-- the database's locale (under a libc locale such as C.UTF-8 or
-- en_US.UTF-8 that was the largest single cost of an append's index
-- work). Only the collation changes, so the rows are not rewritten; the
-- indexes on these columns are rebuilt. Comparing them with text of the
-- default collation (parameters, other tables' columns) takes "C".
--
-- The refusal-reason index keeps only refused entries: every other entry
-- has the empty reason, and lookups by reason ask for refused entries.
ALTER TABLE audit
    ALTER COLUMN event_id TYPE TEXT COLLATE "C",
    ALTER COLUMN key_id TYPE TEXT COLLATE "C",
    ALTER COLUMN agent_run_label TYPE TEXT COLLATE "C",
    ALTER COLUMN vendor TYPE TEXT COLLATE "C",
    ALTER COLUMN trace_id TYPE TEXT COLLATE "C",
    ALTER COLUMN refusal_reason TYPE TEXT COLLATE "C";

DROP INDEX audit_refusal_reason;
CREATE INDEX audit_refusal_reason ON audit (refusal_reason, seq) WHERE outcome = 'refused';
