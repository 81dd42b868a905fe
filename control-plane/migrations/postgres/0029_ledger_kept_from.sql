-- Where the ledger kept by retention starts (docs/ledger.md, "Partitions
-- and retention"): the start of the first day not dropped, microseconds
-- since the epoch (0: nothing dropped). It sits on the head's row, which
-- retention locks while it drops a day and every append reads under that
-- lock: an event whose dedupe window reaches before it could have its
-- entry among the dropped days, so it is refused rather than applied a
-- second time.
ALTER TABLE ledger_head ADD COLUMN kept_from BIGINT NOT NULL DEFAULT 0;
