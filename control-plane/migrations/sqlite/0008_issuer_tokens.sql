-- Issuer tokens: each belongs to one vault key and may only mint child keys
-- of it (within its vendor, endpoints and caps). Only the token's SHA-256
-- and a display prefix are stored, never its text.
CREATE TABLE issuer_tokens (
    id           TEXT PRIMARY KEY,
    token_hash   BLOB NOT NULL UNIQUE,
    token_prefix TEXT NOT NULL,
    key_id       TEXT NOT NULL REFERENCES vault_keys (id),
    name         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER
);
CREATE INDEX issuer_tokens_key ON issuer_tokens (key_id, created_at);
