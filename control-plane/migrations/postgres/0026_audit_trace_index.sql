-- The trace-id index keeps only entries that have a trace (docs/ledger.md,
-- "Index costs"). A call is traced only when the proxy exports traces or
-- the agent sent a W3C traceparent; every other entry has the empty trace
-- id, and a fleet without tracing appended each of those to this index
-- for nothing. Lookups by a trace id also say `trace_id <> ''`
-- (store::sql_store, query_audit), which lets PostgreSQL use it.
--
-- Like 0025, this rebuilds the index on every partition while holding
-- the audit table's lock: on a large ledger spend ingest pauses until
-- the upgraded replica has finished.
DROP INDEX audit_trace_id;
CREATE INDEX audit_trace_id ON audit (trace_id, seq) WHERE trace_id <> '';
