-- Signed checkpoints of the ledger (docs/ledger.md): the head's seq and
-- hash at a time, signed with an Ed25519 key whose private half is sealed
-- under the master key like a vendor credential. Each checkpoint keeps the
-- public key it was signed with, so it verifies after a key change.
CREATE TABLE ledger_signing_keys (
    id             TEXT PRIMARY KEY,
    public_key     BYTEA NOT NULL,
    sealed_private BYTEA NOT NULL,
    created_at     BIGINT NOT NULL
);
CREATE TABLE ledger_checkpoints (
    seq        BIGINT PRIMARY KEY,
    hash       BYTEA NOT NULL,
    at         BIGINT NOT NULL,
    public_key BYTEA NOT NULL,
    signature  BYTEA NOT NULL
);
