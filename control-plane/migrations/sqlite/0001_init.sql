-- keycap control plane, SQLite schema.
--
-- Times are INTEGER microseconds since the Unix epoch (UTC); money is
-- INTEGER micro-dollars; maps and lists are JSON text. The PostgreSQL schema
-- (migrations/postgres) holds the same tables and columns.

-- SHA-256 of each admin token; the tokens themselves are never stored.
CREATE TABLE admin_tokens (
    token_hash BLOB PRIMARY KEY,
    created_at INTEGER NOT NULL
);

-- Vendors and their sealed (envelope-encrypted) credentials.
CREATE TABLE vendors (
    name              TEXT PRIMARY KEY,
    profile           TEXT NOT NULL,
    base_url          TEXT NOT NULL,
    currency_rates    TEXT NOT NULL,
    sealed_credential BLOB NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);

-- Vault keys: the SHA-256 of the secret only. `vendor` is a plain reference
-- (no foreign key): a vendor may be deleted once only inactive keys name it.
CREATE TABLE vault_keys (
    id                TEXT PRIMARY KEY,
    key_hash          BLOB NOT NULL UNIQUE,
    key_prefix        TEXT NOT NULL,
    vendor            TEXT NOT NULL,
    allowed_endpoints TEXT NOT NULL,
    daily_cap         INTEGER NOT NULL,
    per_call_cap      INTEGER,
    lifetime_cap      INTEGER,
    expires_at        INTEGER NOT NULL,
    agent_run_label   TEXT NOT NULL,
    metadata          TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    revoked_at        INTEGER
);
CREATE INDEX vault_keys_agent_run_label ON vault_keys (agent_run_label);
CREATE INDEX vault_keys_vendor ON vault_keys (vendor);
CREATE INDEX vault_keys_created ON vault_keys (created_at DESC, id DESC);

-- What proxies follow. AUTOINCREMENT: a version is never reused, even after
-- old entries are pruned.
CREATE TABLE change_log (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT NOT NULL CHECK (kind IN ('vendor', 'key')),
    ref_id  TEXT NOT NULL
);

-- Budget leases: a node's slice of one key's budget for one UTC day.
-- The unspent part, max(0, granted - reported), counts against the key's
-- caps until `expires_at`.
CREATE TABLE leases (
    id         TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL REFERENCES vault_keys (id),
    node_id    TEXT NOT NULL,
    day        TEXT NOT NULL,
    granted    INTEGER NOT NULL,
    reported   INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL,
    closed     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX leases_key_expiry ON leases (key_id, expires_at);

-- The first answer to each grant request, returned again on a retry.
CREATE TABLE lease_grants (
    grant_id    TEXT PRIMARY KEY,
    lease_id    TEXT NOT NULL REFERENCES leases (id),
    granted     INTEGER NOT NULL,
    lease_total INTEGER NOT NULL,
    unleased    INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);

-- Settled spend per key and UTC day; lifetime spend is the sum over days.
CREATE TABLE key_spend_daily (
    key_id TEXT NOT NULL,
    day    TEXT NOT NULL,
    spent  INTEGER NOT NULL,
    calls  INTEGER NOT NULL,
    PRIMARY KEY (key_id, day)
);

-- The audit ledger: one row per spend event, applied once by `event_id`.
CREATE TABLE audit (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    key_id          TEXT NOT NULL,
    agent_run_label TEXT NOT NULL,
    vendor          TEXT NOT NULL,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    upstream_status INTEGER NOT NULL,
    reserved        INTEGER NOT NULL,
    cost            INTEGER NOT NULL,
    outcome         TEXT NOT NULL,
    at              INTEGER NOT NULL,
    node_id         TEXT NOT NULL,
    lease_id        TEXT NOT NULL,
    day             TEXT NOT NULL,
    detail_json     TEXT NOT NULL
);
CREATE INDEX audit_key_id ON audit (key_id, seq);
CREATE INDEX audit_agent_run_label ON audit (agent_run_label, seq);
CREATE INDEX audit_vendor ON audit (vendor, seq);

-- The ledger is append-only.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit ledger is append-only');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit ledger is append-only');
END;
