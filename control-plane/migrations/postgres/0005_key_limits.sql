-- A key's network limits. rate_limit_per_minute: calls per minute through
-- one proxy, NULL for no limit. allowed_cidrs: JSON list of the client
-- networks the key may be used from, empty for any. zone: the zone of the
-- proxies that serve the key, NULL for any. Existing keys limit nothing.
ALTER TABLE vault_keys ADD COLUMN rate_limit_per_minute BIGINT;
ALTER TABLE vault_keys ADD COLUMN allowed_cidrs TEXT NOT NULL DEFAULT '[]';
ALTER TABLE vault_keys ADD COLUMN zone TEXT;
