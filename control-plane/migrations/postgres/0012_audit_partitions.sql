-- The audit ledger partitioned by the UTC day each entry was appended
-- (docs/ledger.md, "Partitions and retention"), so that old days can be
-- detached and dropped whole once a signed checkpoint and an export cover
-- them (`--audit-retention-days`). The rows, their columns and defaults,
-- the indexes and the append-only triggers are kept.
--
-- `logged_at` is the database's clock when the row was written (micros
-- since the epoch, UTC); it is not part of the entry's hash. Rows written
-- before this migration take their event time. A partition key must be in
-- every unique index, so `event_id` is no longer UNIQUE by itself: an
-- event is applied once because every append holds the ledger head's row
-- lock while it looks its events up and writes them (store::sql_store).
ALTER TABLE audit RENAME TO audit_unpartitioned;
ALTER TABLE audit_unpartitioned RENAME CONSTRAINT audit_pkey TO audit_unpartitioned_pkey;
ALTER TABLE audit_unpartitioned RENAME CONSTRAINT audit_event_id_key TO audit_unpartitioned_event_id_key;
DROP INDEX audit_key_id;
DROP INDEX audit_agent_run_label;
DROP INDEX audit_vendor;
DROP INDEX audit_trace_id;

CREATE TABLE audit (
    LIKE audit_unpartitioned INCLUDING DEFAULTS,
    logged_at BIGINT NOT NULL
        DEFAULT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)
) PARTITION BY RANGE (logged_at);
ALTER TABLE audit ALTER COLUMN seq DROP DEFAULT;
ALTER TABLE audit ADD PRIMARY KEY (seq, logged_at);
CREATE INDEX audit_event_id ON audit (event_id);
CREATE INDEX audit_key_id ON audit (key_id, seq);
CREATE INDEX audit_agent_run_label ON audit (agent_run_label, seq);
CREATE INDEX audit_vendor ON audit (vendor, seq);
CREATE INDEX audit_trace_id ON audit (trace_id, seq);

CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION keycap_audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION keycap_audit_append_only();

-- The partition of one UTC day (`audit_pYYYYMMDD`), created if missing,
-- with its own TRUNCATE trigger (row triggers are inherited; statement
-- triggers are not). Returns its name.
CREATE FUNCTION keycap_audit_partition(day DATE) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    part TEXT := 'audit_p' || to_char(day, 'YYYYMMDD');
    lo   BIGINT := CAST(day - DATE '1970-01-01' AS BIGINT) * 86400000000;
BEGIN
    IF to_regclass(part) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF audit FOR VALUES FROM (%s) TO (%s)',
                       part, lo, lo + 86400000000);
        EXECUTE format('CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION keycap_audit_append_only()', part);
    END IF;
    RETURN part;
END
$$;

-- Today's partition and the next `days_ahead` days', by the database's
-- clock (the one `logged_at` is taken from). Replicas call it at start and
-- every hour; the advisory lock makes concurrent calls take turns.
CREATE FUNCTION keycap_audit_ensure_partitions(days_ahead INTEGER) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    today DATE := CAST(clock_timestamp() AT TIME ZONE 'UTC' AS DATE);
BEGIN
    PERFORM pg_advisory_xact_lock(7461207);
    FOR d IN 0..days_ahead LOOP
        PERFORM keycap_audit_partition(today + d);
    END LOOP;
END
$$;

SELECT keycap_audit_partition(CAST(to_timestamp(at / 1000000.0) AT TIME ZONE 'UTC' AS DATE))
    FROM (SELECT DISTINCT at / 86400000000 * 86400000000 AS at FROM audit_unpartitioned) AS days;
SELECT keycap_audit_ensure_partitions(3);
INSERT INTO audit SELECT *, at FROM audit_unpartitioned ORDER BY seq;
DROP TABLE audit_unpartitioned;
