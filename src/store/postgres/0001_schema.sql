-- syncrelay schema 1: the relay's records as tables (a draft until the PostgreSQL backend
-- ships in a release: until then, this migration may still change in place).
--
-- Times are milliseconds since the Unix epoch (bigint), as the relay's clock counts them.
-- JSON the relay passes through unchanged (params, results, change data) is text, byte
-- for byte as the daemon or client sent it.

CREATE TABLE daemons (
    daemon_id        text PRIMARY KEY,
    version          text,
    capabilities     text[] NOT NULL DEFAULT '{}',
    created_ms       bigint NOT NULL,
    last_seen_ms     bigint,
    -- The connection a poll must name; a newer connect supersedes it.
    connection_id    text,
    -- Highest daemon-side update seq stored (retries at or below it are dropped), and
    -- the change log's last seq.
    last_update_seq  bigint NOT NULL DEFAULT 0,
    last_change_seq  bigint NOT NULL DEFAULT 0
);

CREATE TABLE keys (
    key_id        text PRIMARY KEY,
    role          text NOT NULL CHECK (role IN ('daemon', 'client', 'admin')),
    daemon_id     text,
    scope         text[] NOT NULL DEFAULT '{}',
    label         text,
    -- Only a hash of the secret is ever stored.
    secret_sha256 bytea NOT NULL CHECK (octet_length(secret_sha256) = 32),
    created_ms    bigint NOT NULL
);

-- Arrival order across all daemons; each daemon's queue is its commands in this order.
CREATE SEQUENCE command_queue_seq;

-- No foreign key to daemons: every INSERT would take a share lock on its daemon's row,
-- and concurrent writers of one daemon would pile those up as multixacts (the write
-- path's hottest cost in the benchmark). The relay checks the daemon in the INSERT.
CREATE TABLE commands (
    command_id         text PRIMARY KEY,
    daemon_id          text NOT NULL,
    queue_seq          bigint NOT NULL,
    method             text NOT NULL,
    params             text NOT NULL,
    stream             boolean NOT NULL,
    state              text NOT NULL
                       CHECK (state IN ('queued', 'delivered', 'completed', 'failed', 'expired')),
    created_ms         bigint NOT NULL,
    expires_ms         bigint NOT NULL,
    lease_until_ms     bigint NOT NULL DEFAULT 0,
    deliveries         integer NOT NULL DEFAULT 0,
    -- When it reached a final state (0 before).
    finished_ms        bigint NOT NULL DEFAULT 0,
    result             text,
    error              text,
    -- An Idempotency-Key is scoped to the daemon and the key that sent it.
    idempotency_key_id text,
    idempotency_key    text,
    CHECK ((idempotency_key_id IS NULL) = (idempotency_key IS NULL))
);
-- Only commands sent with a key are indexed by it.
CREATE UNIQUE INDEX commands_idempotency ON commands (daemon_id, idempotency_key_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The queue: unfinished commands per daemon, in arrival order.
CREATE INDEX commands_unfinished ON commands (daemon_id, queue_seq)
    WHERE state IN ('queued', 'delivered');
-- Retention: finished commands by the time they finished.
CREATE INDEX commands_finished ON commands (finished_ms)
    WHERE state IN ('completed', 'failed', 'expired');

CREATE TABLE changes (
    daemon_id    text NOT NULL REFERENCES daemons ON DELETE CASCADE,
    seq          bigint NOT NULL,
    kind         text NOT NULL,
    timestamp_ms bigint NOT NULL,
    stored_ms    bigint NOT NULL,
    data         text NOT NULL,
    daemon_seq   bigint,
    PRIMARY KEY (daemon_id, seq)
);

CREATE SEQUENCE context_id_seq;

-- One row per fetch of a stream path. A replaced or evicted context is retired (no
-- longer current) and deleted with its chunks after a grace period, as readers may still
-- be replaying it.
CREATE TABLE contexts (
    context_id  bigint PRIMARY KEY,
    daemon_id   text NOT NULL REFERENCES daemons ON DELETE CASCADE,
    cache_key   text NOT NULL,
    command_id  text NOT NULL UNIQUE,
    state       text NOT NULL CHECK (state IN ('fetching', 'complete', 'failed')),
    status      integer,
    -- [[name, value], ...] from chunk 0.
    headers     jsonb NOT NULL DEFAULT '[]',
    chunks      bigint NOT NULL DEFAULT 0,
    bytes       bigint NOT NULL DEFAULT 0,
    created_ms  bigint NOT NULL,
    finished_ms bigint NOT NULL DEFAULT 0,
    error       text,
    retired_ms  bigint
);
-- The current fetch of each stream path.
CREATE UNIQUE INDEX contexts_current ON contexts (daemon_id, cache_key)
    WHERE retired_ms IS NULL;

-- Chunks in rows of bounded size (streams.max_chunk_bytes, at most 16 MiB).
CREATE TABLE context_chunks (
    context_id bigint NOT NULL REFERENCES contexts ON DELETE CASCADE,
    chunk      bigint NOT NULL,
    data       bytea NOT NULL CHECK (octet_length(data) <= 16777216),
    PRIMARY KEY (context_id, chunk)
);

-- The last 2xx answer of each mirrored GET, served while the daemon is offline.
CREATE TABLE responses (
    daemon_id text NOT NULL REFERENCES daemons ON DELETE CASCADE,
    cache_key text NOT NULL,
    status    integer NOT NULL,
    headers   jsonb NOT NULL,
    body      bytea NOT NULL,
    stored_ms bigint NOT NULL,
    PRIMARY KEY (daemon_id, cache_key)
);
CREATE INDEX responses_by_age ON responses (stored_ms);
