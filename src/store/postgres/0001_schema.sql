-- syncrelay schema 1: the sled trees as tables (a draft until the PostgreSQL backend
-- ships: until a release, this migration may still change in place).
CREATE TABLE daemons (
    daemon_id        text PRIMARY KEY,
    version          text,
    capabilities     text[] NOT NULL DEFAULT '{}',
    created_ms       bigint NOT NULL,
    last_seen_ms     bigint,
    connection_id    text,
    last_update_seq  bigint NOT NULL DEFAULT 0,
    last_seq         bigint NOT NULL DEFAULT 0,
    -- The queue: the next position, and how many commands wait (queue_limit).
    next_queue_seq   bigint NOT NULL DEFAULT 1,
    queued           integer NOT NULL DEFAULT 0
);

CREATE TABLE keys (
    key_id      text PRIMARY KEY,
    secret_hash bytea NOT NULL,
    role        text NOT NULL CHECK (role IN ('daemon', 'client', 'admin')),
    daemon_id   text,
    scope       text[] NOT NULL DEFAULT '{}',
    label       text,
    created_ms  bigint NOT NULL
);

CREATE TABLE commands (
    command_id      text PRIMARY KEY,
    daemon_id       text NOT NULL REFERENCES daemons ON DELETE CASCADE,
    queue_seq       bigint NOT NULL,
    method          text NOT NULL,
    params          bytea NOT NULL,
    stream          boolean NOT NULL DEFAULT false,
    state           text NOT NULL
                    CHECK (state IN ('queued', 'delivered', 'completed', 'failed', 'expired')),
    created_ms      bigint NOT NULL,
    expires_ms      bigint NOT NULL,
    leased_until_ms bigint,
    deliveries      integer NOT NULL DEFAULT 0,
    -- An Idempotency-Key is scoped to the daemon and the key that sent it.
    idempotency_key_id text,
    idempotency_key    text,
    result          bytea,
    finished_ms     bigint,
    UNIQUE (daemon_id, queue_seq),
    UNIQUE (daemon_id, idempotency_key_id, idempotency_key),
    CHECK ((idempotency_key_id IS NULL) = (idempotency_key IS NULL))
);
CREATE INDEX commands_waiting ON commands (daemon_id, queue_seq)
    WHERE state IN ('queued', 'delivered');

CREATE TABLE changes (
    daemon_id    text NOT NULL REFERENCES daemons ON DELETE CASCADE,
    seq          bigint NOT NULL,
    kind         text NOT NULL,
    timestamp_ms bigint NOT NULL,
    data         bytea NOT NULL,
    PRIMARY KEY (daemon_id, seq)
);

CREATE TABLE contexts (
    context_id   text PRIMARY KEY,
    daemon_id    text NOT NULL REFERENCES daemons ON DELETE CASCADE,
    cache_key    text NOT NULL,
    command_id   text,
    state        text NOT NULL,
    status       integer,
    headers      bytea,
    bytes        bigint NOT NULL DEFAULT 0,
    created_ms   bigint NOT NULL,
    completed_ms bigint
);
CREATE INDEX contexts_by_key ON contexts (daemon_id, cache_key);

-- Chunks in rows of bounded size (a chunk is at most 1 MiB).
CREATE TABLE context_chunks (
    context_id text NOT NULL REFERENCES contexts ON DELETE CASCADE,
    chunk      integer NOT NULL,
    data       bytea NOT NULL CHECK (octet_length(data) <= 1048576),
    PRIMARY KEY (context_id, chunk)
);

CREATE TABLE responses (
    daemon_id text NOT NULL REFERENCES daemons ON DELETE CASCADE,
    cache_key text NOT NULL,
    stored_ms bigint NOT NULL,
    result    bytea NOT NULL,
    PRIMARY KEY (daemon_id, cache_key)
);
