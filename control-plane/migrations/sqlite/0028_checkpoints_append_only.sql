-- Signed checkpoints are kept as the ledger is (docs/ledger.md,
-- "Checkpoints"): never changed or removed. keycap only inserts them, one
-- per head; the triggers refuse an UPDATE or DELETE, so removing the
-- checkpoints that would show a rewritten ledger tail takes the database
-- owner dropping them first, as for the ledger itself.
CREATE TRIGGER ledger_checkpoints_no_update BEFORE UPDATE ON ledger_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'the audit ledger is append-only');
END;
CREATE TRIGGER ledger_checkpoints_no_delete BEFORE DELETE ON ledger_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'the audit ledger is append-only');
END;
