-- The approval gate (docs/approvals.md). approval_above: a call whose
-- reservation exceeds it needs a person's approval; NULL for none. Stored
-- as the lowest along the key's ancestors when the key is minted (a
-- parent's never changes), so a proxy reads one number.
ALTER TABLE vault_keys ADD COLUMN approval_above BIGINT;

-- A call held for approval: who asked (key, proxy), what (method, path
-- and the fingerprint of the request's canonical form), the quoted
-- reservation, until when a decision and its use are possible, the
-- decision (who, why, when) and its single use. Times in microseconds,
-- money in micro-dollars. An approval is used by one conditional UPDATE
-- (approved, unexpired, unused, same key, same fingerprint, amount within
-- the quote), so at most one retry across the fleet is forwarded.
CREATE TABLE approvals (
    id              TEXT PRIMARY KEY,
    key_id          TEXT NOT NULL REFERENCES vault_keys (id),
    vendor          TEXT NOT NULL,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    fingerprint     BLOB NOT NULL,
    quote           BIGINT NOT NULL,
    node_id         TEXT NOT NULL,
    agent_run_label TEXT NOT NULL,
    requested_at    BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    decision        TEXT,
    decided_by      TEXT,
    reason          TEXT,
    decided_at      BIGINT,
    consumed_at     BIGINT,
    consumed_event  TEXT
);
CREATE INDEX approvals_requested ON approvals (requested_at);
CREATE INDEX approvals_key ON approvals (key_id, requested_at);
