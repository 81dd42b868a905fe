-- The trace-id index keeps only entries that have a trace, as on
-- PostgreSQL (docs/ledger.md, "Index costs"): an untraced call's entry
-- has the empty trace id, which no lookup asks for by index.
DROP INDEX audit_trace_id;
CREATE INDEX audit_trace_id ON audit (trace_id, seq) WHERE trace_id <> '';
