-- When a vendor's credential was last set (a KEK rotation re-wraps it and
-- does not count), and how long it may be used before it is due for
-- rotation (NULL: never). An overdue credential is flagged in vendor reads
-- and raises one credential.rotation_due alert per credential.
ALTER TABLE vendors ADD COLUMN credential_set_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vendors ADD COLUMN rotate_after_secs BIGINT;
UPDATE vendors SET credential_set_at = updated_at;
