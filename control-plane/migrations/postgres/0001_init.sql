-- keycap control plane, PostgreSQL schema.
--
-- Times are BIGINT microseconds since the Unix epoch (UTC); money is BIGINT
-- micro-dollars; maps and lists are JSON text. The SQLite schema
-- (migrations/sqlite) holds the same tables and columns.

-- SHA-256 of each admin token; the tokens themselves are never stored.
CREATE TABLE admin_tokens (
    token_hash BYTEA PRIMARY KEY,
    created_at BIGINT NOT NULL
);

-- Vendors and their sealed (envelope-encrypted) credentials.
CREATE TABLE vendors (
    name              TEXT PRIMARY KEY,
    profile           TEXT NOT NULL,
    base_url          TEXT NOT NULL,
    currency_rates    TEXT NOT NULL,
    sealed_credential BYTEA NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);

-- Vault keys: the SHA-256 of the secret only. `vendor` is a plain reference
-- (no foreign key): a vendor may be deleted once only inactive keys name it.
CREATE TABLE vault_keys (
    id                TEXT PRIMARY KEY,
    key_hash          BYTEA NOT NULL UNIQUE,
    key_prefix        TEXT NOT NULL,
    vendor            TEXT NOT NULL,
    allowed_endpoints TEXT NOT NULL,
    daily_cap         BIGINT NOT NULL,
    per_call_cap      BIGINT,
    lifetime_cap      BIGINT,
    expires_at        BIGINT NOT NULL,
    agent_run_label   TEXT NOT NULL,
    metadata          TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    revoked_at        BIGINT
);
CREATE INDEX vault_keys_agent_run_label ON vault_keys (agent_run_label);
CREATE INDEX vault_keys_vendor ON vault_keys (vendor);
CREATE INDEX vault_keys_created ON vault_keys (created_at DESC, id DESC);

-- What proxies follow. Writers take an EXCLUSIVE lock on this table just
-- before appending, so versions become visible in increasing order (a
-- sequence alone would let a lower version commit after a higher one and be
-- skipped by a follower).
CREATE TABLE change_log (
    version BIGSERIAL PRIMARY KEY,
    kind    TEXT NOT NULL CHECK (kind IN ('vendor', 'key')),
    ref_id  TEXT NOT NULL
);

-- Replicas LISTEN on 'keycap_changes' to learn that the change log grew; the
-- payload is empty (read `changes_since` for the entries). Statement-level,
-- and Postgres folds identical notifications of one transaction into one.
CREATE FUNCTION keycap_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keycap_changes', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER change_log_notify AFTER INSERT ON change_log
    FOR EACH STATEMENT EXECUTE FUNCTION keycap_notify_change();

-- Budget leases: a node's slice of one key's budget for one UTC day.
-- The unspent part, max(0, granted - reported), counts against the key's
-- caps until `expires_at`.
CREATE TABLE leases (
    id         TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL REFERENCES vault_keys (id),
    node_id    TEXT NOT NULL,
    day        TEXT NOT NULL,
    granted    BIGINT NOT NULL,
    reported   BIGINT NOT NULL DEFAULT 0,
    expires_at BIGINT NOT NULL,
    closed     BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX leases_key_expiry ON leases (key_id, expires_at);

-- The first answer to each grant request, returned again on a retry.
CREATE TABLE lease_grants (
    grant_id    TEXT PRIMARY KEY,
    lease_id    TEXT NOT NULL REFERENCES leases (id),
    granted     BIGINT NOT NULL,
    lease_total BIGINT NOT NULL,
    unleased    BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);

-- Settled spend per key and UTC day; lifetime spend is the sum over days.
CREATE TABLE key_spend_daily (
    key_id TEXT NOT NULL,
    day    TEXT NOT NULL,
    spent  BIGINT NOT NULL,
    calls  BIGINT NOT NULL,
    PRIMARY KEY (key_id, day)
);

-- The audit ledger: one row per spend event, applied once by `event_id`.
CREATE TABLE audit (
    seq             BIGSERIAL PRIMARY KEY,
    event_id        TEXT NOT NULL UNIQUE,
    key_id          TEXT NOT NULL,
    agent_run_label TEXT NOT NULL,
    vendor          TEXT NOT NULL,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    upstream_status INTEGER NOT NULL,
    reserved        BIGINT NOT NULL,
    cost            BIGINT NOT NULL,
    outcome         TEXT NOT NULL,
    at              BIGINT NOT NULL,
    node_id         TEXT NOT NULL,
    lease_id        TEXT NOT NULL,
    day             TEXT NOT NULL,
    detail_json     TEXT NOT NULL
);
CREATE INDEX audit_key_id ON audit (key_id, seq);
CREATE INDEX audit_agent_run_label ON audit (agent_run_label, seq);
CREATE INDEX audit_vendor ON audit (vendor, seq);

-- The ledger is append-only.
CREATE FUNCTION keycap_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit ledger is append-only';
END
$$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION keycap_audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION keycap_audit_append_only();
