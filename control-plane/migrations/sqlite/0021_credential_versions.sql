-- Numbered credential versions per vendor (docs/rotation.md). Each version
-- is sealed as vendor credentials always were, its record id binding the
-- vendor and the version (version 1 keeps the vendor's name, so the
-- credential moved here below opens unchanged). States:
--   staged:   stored, probed perhaps, never served;
--   active:   what proxies inject (one per vendor);
--   previous: the active one before the last promote, still usable until
--             grace_until (calls that already picked it), the target of a
--             rollback until then;
--   retired:  sealed material erased (sealed is NULL); only the record
--             of when it existed and what its probe said remains.
CREATE TABLE vendor_credentials (
    vendor       TEXT NOT NULL,
    version      BIGINT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('staged', 'active', 'previous', 'retired')),
    sealed       BLOB,
    created_at   BIGINT NOT NULL,
    promoted_at  BIGINT,
    grace_until  BIGINT,
    retired_at   BIGINT,
    probe_ok     INTEGER,
    probe_status BIGINT,
    probe_error  TEXT,
    probed_at    BIGINT,
    PRIMARY KEY (vendor, version)
);
CREATE UNIQUE INDEX vendor_credentials_active ON vendor_credentials (vendor) WHERE state = 'active';
CREATE INDEX vendor_credentials_grace ON vendor_credentials (grace_until) WHERE state = 'previous';

-- Each vendor's one credential becomes its version 1, active.
INSERT INTO vendor_credentials (vendor, version, state, sealed, created_at, promoted_at)
    SELECT name, 1, 'active', sealed_credential, credential_set_at, credential_set_at FROM vendors;
ALTER TABLE vendors DROP COLUMN sealed_credential;

-- The credential version each call was forwarded with (0: before
-- versions, or a refusal, which forwards nothing). Hashed into the
-- ledger chain when not 0 (docs/ledger.md), so older entries keep their hashes.
ALTER TABLE audit ADD COLUMN credential_version BIGINT NOT NULL DEFAULT 0;
