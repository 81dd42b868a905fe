-- Inbound hooks (see docs/inbound-hooks.md): vendor webhooks that keycap
-- verifies at the proxy and relays to a scenario. Distinct from the alert
-- webhooks keycap sends (0016, webhook_*). Times are microseconds since
-- the epoch.

-- An endpoint: which vendor signs its events; the vendor's signing secrets
-- as one sealed JSON list (several during a Stripe secret roll), bound to
-- "hook/<id>"; keycap's own signing secret for the destination, sealed and
-- bound to "hook-relay/<id>"; where verified events go; the URL the vendor
-- calls (Twilio signs it; empty when the proxy's own address is meant);
-- how far a signed timestamp may stray, in seconds.
CREATE TABLE hook_endpoints (
    id                  TEXT PRIMARY KEY,
    vendor              TEXT NOT NULL,
    sealed_secrets      BLOB NOT NULL,
    sealed_relay_secret BLOB NOT NULL,
    destination_url     TEXT NOT NULL,
    public_url          TEXT NOT NULL,
    tolerance_secs      BIGINT NOT NULL,
    description         TEXT NOT NULL,
    created_at          BIGINT NOT NULL
);

-- Event ids claimed by a proxy before it relays an event: the primary key
-- lets exactly one proxy of the fleet through per event. A claim is held
-- briefly while the destination is called, kept for the replay window once
-- the destination took the event, and dropped when it did not (so the
-- vendor's retry is relayed). Rows past expires_at are claimable again and
-- pruned.
CREATE TABLE hook_event_claims (
    hook_id    TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (hook_id, event_id)
);
CREATE INDEX hook_event_claims_expires_at ON hook_event_claims (expires_at);

-- Proxies learn hooks through the change log, as they learn vendors and
-- keys. SQLite cannot change a CHECK constraint in place: the table is
-- rebuilt, its versions and its AUTOINCREMENT high-water mark kept (a
-- version is never reused).
CREATE TABLE change_log_0022 (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT NOT NULL CHECK (kind IN ('vendor', 'key', 'hook')),
    ref_id  TEXT NOT NULL
);
INSERT INTO change_log_0022 (version, kind, ref_id)
    SELECT version, kind, ref_id FROM change_log;
DELETE FROM sqlite_sequence WHERE name = 'change_log_0022';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'change_log_0022', seq FROM sqlite_sequence WHERE name = 'change_log';
DROP TABLE change_log;
ALTER TABLE change_log_0022 RENAME TO change_log;
