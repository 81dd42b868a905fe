-- Vault key rolls. A rolled key's successor spends the same budget: every
-- key carries the id of the budget it spends (budget_id; NULL: its own id,
-- which every key minted before rolls existed keeps). The budget's id is
-- the chain's first key, so leases, daily spend and the budget tree
-- (key_ancestors) stay keyed by it and a roll resets nothing.
-- rolled_from / successor_id link the chain (a key is rolled at most once);
-- retire_at is when a rolled key's grace ends and the control plane
-- revokes it (stored, so the sweep survives a restart).
ALTER TABLE vault_keys ADD COLUMN budget_id TEXT REFERENCES vault_keys (id);
ALTER TABLE vault_keys ADD COLUMN rolled_from TEXT REFERENCES vault_keys (id);
ALTER TABLE vault_keys ADD COLUMN successor_id TEXT REFERENCES vault_keys (id);
ALTER TABLE vault_keys ADD COLUMN retire_at BIGINT;
CREATE INDEX vault_keys_budget ON vault_keys (budget_id);
CREATE INDEX vault_keys_retire ON vault_keys (retire_at);
