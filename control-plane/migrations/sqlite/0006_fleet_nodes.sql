-- Proxies with an open policy stream, and the change-log version each has
-- applied, so a revocation can wait until every connected proxy refuses the
-- key. One row per node: the replica serving its stream (`replica`, an id
-- the replica draws at start) and the stream itself (`stream_id`, so a
-- stream that ends after the node reconnected elsewhere leaves the new
-- registration alone). The serving replica refreshes `heartbeat_at` every
-- second; a row whose heartbeat is older than a few seconds belongs to a
-- replica that died and no longer counts as connected. Times are
-- microseconds since the epoch.
CREATE TABLE fleet_nodes (
    node_id         TEXT PRIMARY KEY,
    replica         TEXT NOT NULL,
    stream_id       TEXT NOT NULL,
    applied_version INTEGER NOT NULL DEFAULT 0,
    connected_at    INTEGER NOT NULL,
    heartbeat_at    INTEGER NOT NULL
);
CREATE INDEX fleet_nodes_replica ON fleet_nodes (replica);

-- Set on the live leases of a revoked key held by a node that did not
-- confirm the revocation: such a lease is never grown again. It keeps
-- counting against the key's caps until it is returned or expires, and
-- spend reports on it still apply.
ALTER TABLE leases ADD COLUMN fenced_at INTEGER;
