-- Where the ledger kept by retention starts (docs/ledger.md, "Partitions
-- and retention"; retention runs on PostgreSQL only, so here it stays 0:
-- nothing dropped).
ALTER TABLE ledger_head ADD COLUMN kept_from INTEGER NOT NULL DEFAULT 0;
