-- The audit indexes that look entries up by key, run label or trace id
-- hold a 64-bit hash of the id, then `seq`, instead of the id's text
-- (docs/ledger.md, "Index costs"). Every append inserts into each of them;
-- with the text each insert compared ids of 30-40 bytes, and the key and
-- trace indexes were twice the size of the hashed ones. Lookups ask for the
-- hash and the id itself (store::dialect, `indexed_text_eq`), so they stay
-- exact whatever two ids' hashes: the hash finds the entries, the id
-- decides, and `seq` after the hash still reads one id's entries newest
-- first, stopping at the lookup's limit. `hashtextextended` is the
-- function PostgreSQL's hash partitioning relies on, stable across its
-- versions.
--
-- The event-id index keeps the text: each proxy's event ids share a
-- prefix and count up, so its inserts land on a few pages, where a hash
-- would scatter them over the whole index (measured slower).
--
-- Like 0025 and 0026, this builds the indexes on every partition while
-- holding the audit table's lock: on a large ledger spend ingest pauses
-- until the upgraded replica has finished.
DROP INDEX audit_key_id;
DROP INDEX audit_agent_run_label;
DROP INDEX audit_trace_id;
CREATE INDEX audit_key_id ON audit (hashtextextended(key_id, 0), seq);
CREATE INDEX audit_agent_run_label ON audit (hashtextextended(agent_run_label, 0), seq);
CREATE INDEX audit_trace_id ON audit (hashtextextended(trace_id, 0), seq) WHERE trace_id <> '';
