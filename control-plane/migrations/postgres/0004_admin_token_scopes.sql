-- Least-privilege admin tokens: each token gets an id, a name, scopes (JSON
-- list of names such as "keys:issue"; "admin" means all), an optional vendor
-- restriction (JSON list; NULL for every vendor), an optional expiry and a
-- revocation time. The token text is still never stored: only its SHA-256
-- and a display prefix.
--
-- Tokens stored before this migration came from --admin-token: they become
-- "bootstrap" tokens with every scope.
ALTER TABLE admin_tokens ADD COLUMN id TEXT;
ALTER TABLE admin_tokens ADD COLUMN token_prefix TEXT NOT NULL DEFAULT '';
ALTER TABLE admin_tokens ADD COLUMN name TEXT NOT NULL DEFAULT 'bootstrap';
ALTER TABLE admin_tokens ADD COLUMN scopes TEXT NOT NULL DEFAULT '["admin"]';
ALTER TABLE admin_tokens ADD COLUMN vendors TEXT;
ALTER TABLE admin_tokens ADD COLUMN expires_at BIGINT;
ALTER TABLE admin_tokens ADD COLUMN revoked_at BIGINT;
UPDATE admin_tokens SET id = 'adm_' || md5(encode(token_hash, 'hex') || random()::text)
    WHERE id IS NULL;
ALTER TABLE admin_tokens ALTER COLUMN id SET NOT NULL;
CREATE UNIQUE INDEX admin_tokens_id ON admin_tokens (id);
