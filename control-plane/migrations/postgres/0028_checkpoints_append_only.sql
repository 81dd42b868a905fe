-- Signed checkpoints are kept as the ledger is (docs/ledger.md,
-- "Checkpoints"): never changed or removed. keycap only inserts them, one
-- per head; the triggers refuse an UPDATE, DELETE or TRUNCATE, so removing
-- the checkpoints that would show a rewritten ledger tail takes the
-- database owner disabling them first, as for the ledger itself.
CREATE TRIGGER ledger_checkpoints_append_only BEFORE UPDATE OR DELETE ON ledger_checkpoints
    FOR EACH ROW EXECUTE FUNCTION keycap_audit_append_only();
CREATE TRIGGER ledger_checkpoints_no_truncate BEFORE TRUNCATE ON ledger_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION keycap_audit_append_only();
