-- Vendors a proxy could not load from its policy (version skew, or a
-- stored vendor a newer rule refuses), as each proxy last reported them
-- with its policy acknowledgement: the whole list replaces the node's rows.
-- Admin reads of a vendor show the rows of nodes still in fleet_nodes.
-- `at` is microseconds since the epoch.
CREATE TABLE vendor_load_errors (
    node_id TEXT NOT NULL,
    vendor  TEXT NOT NULL,
    error   TEXT NOT NULL,
    at      INTEGER NOT NULL,
    PRIMARY KEY (node_id, vendor)
);
CREATE INDEX vendor_load_errors_vendor ON vendor_load_errors (vendor);
