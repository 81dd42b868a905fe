-- Budget trees. parent_id: the key whose caps this key also draws on, NULL
-- for a root. key_ancestors is the closure of parent_id: one row per
-- ancestor of a key, the key itself included at depth 0, written with the
-- key and never changed (a key's parent is fixed at mint). A grant reads a
-- key's ancestors here, and an ancestor's whole subtree by ancestor_id.
ALTER TABLE vault_keys ADD COLUMN parent_id TEXT REFERENCES vault_keys (id);
CREATE TABLE key_ancestors (
    key_id      TEXT NOT NULL REFERENCES vault_keys (id),
    ancestor_id TEXT NOT NULL REFERENCES vault_keys (id),
    depth       INTEGER NOT NULL,
    PRIMARY KEY (key_id, ancestor_id)
);
CREATE INDEX key_ancestors_subtree ON key_ancestors (ancestor_id, key_id);
-- Keys minted before trees existed are roots.
INSERT INTO key_ancestors (key_id, ancestor_id, depth) SELECT id, id, 0 FROM vault_keys;
