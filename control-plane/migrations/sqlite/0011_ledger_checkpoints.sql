-- Signed checkpoints of the ledger (docs/ledger.md): the head's seq and
-- hash at a time, signed with an Ed25519 key whose private half is sealed
-- under the master key like a vendor credential. Each checkpoint keeps the
-- public key it was signed with, so it verifies after a key change.
CREATE TABLE ledger_signing_keys (
    id             TEXT PRIMARY KEY,
    public_key     BLOB NOT NULL,
    sealed_private BLOB NOT NULL,
    created_at     INTEGER NOT NULL
);
CREATE TABLE ledger_checkpoints (
    seq        INTEGER PRIMARY KEY,
    hash       BLOB NOT NULL,
    at         INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    signature  BLOB NOT NULL
);
