-- Which cap limited a grant: the lifetime cap (1) or the daily cap (0). A
-- proxy refusing a call tells the agent which, since only the daily one
-- resets at midnight. Stored with the answer so a retried grant says the
-- same.
ALTER TABLE lease_grants ADD COLUMN lifetime_bound INTEGER NOT NULL DEFAULT 0;
