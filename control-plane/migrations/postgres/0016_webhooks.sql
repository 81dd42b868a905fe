-- Alert webhooks (see docs/webhooks.md): the endpoints operators register,
-- the events keycap raised, and a durable outbox of deliveries, one per
-- event and endpoint, with every attempt kept. Times are microseconds
-- since the epoch.

-- An endpoint: where to post, the signing secret sealed with the master
-- key (bound to "webhook/<id>"), which event types (JSON list, empty for
-- all), the cap thresholds in percent (JSON list), and optionally one run
-- label or key whose events alone it wants.
CREATE TABLE webhook_endpoints (
    id            TEXT PRIMARY KEY,
    url           TEXT NOT NULL,
    sealed_secret BYTEA NOT NULL,
    events        TEXT NOT NULL,
    thresholds    TEXT NOT NULL,
    run_label     TEXT,
    key_id        TEXT,
    format        TEXT NOT NULL,
    description   TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

-- An event, once: `dedupe` names what it is about (a threshold of a key
-- or run in a period, a burst in a minute, a credential set at a time), so
-- when several replicas or proxies see the same crossing at once the
-- unique constraint lets exactly one insert through.
CREATE TABLE webhook_events (
    id         TEXT PRIMARY KEY,
    type       TEXT NOT NULL,
    dedupe     TEXT UNIQUE,
    payload    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- The outbox. A delivery is pending until it is delivered or has failed
-- for 24 hours. A replica claims the oldest pending delivery of an
-- endpoint (never one behind another pending one: in order per endpoint)
-- by setting lease_until; a replica that dies mid-delivery leaves the
-- lease to run out and another (or the restarted one) delivers it.
CREATE TABLE webhook_deliveries (
    seq             BIGSERIAL PRIMARY KEY,
    endpoint_id     TEXT NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id        TEXT NOT NULL REFERENCES webhook_events (id),
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT,
    leased_by       TEXT,
    created_at      BIGINT NOT NULL,
    done_at         BIGINT,
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (endpoint_id, seq)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';

-- Every attempt: the HTTP status (NULL without a response) or why not.
CREATE TABLE webhook_attempts (
    delivery_seq BIGINT NOT NULL REFERENCES webhook_deliveries (seq) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    at           BIGINT NOT NULL,
    status       INTEGER,
    error        TEXT NOT NULL,
    duration_ms  BIGINT NOT NULL,
    PRIMARY KEY (delivery_seq, attempt)
);

-- Counters behind burst alerts (cap refusals of a key in a minute):
-- incremented in the database, so every replica counts into the same row.
CREATE TABLE alert_counters (
    subject TEXT NOT NULL,
    bucket  TEXT NOT NULL,
    n       BIGINT NOT NULL,
    PRIMARY KEY (subject, bucket)
);
