-- PostgreSQL partitions its audit ledger by UTC day here (see
-- migrations/postgres/0012); SQLite keeps one table, so nothing changes.
SELECT 1;
