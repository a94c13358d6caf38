-- Highwater schema 1 (PostgreSQL). The same model as migrations/sqlite:
-- one row per entry in `entries`, each pointing at the `changes` row of the
-- revision that last set its blob. Blobs are `text`, never `jsonb`, which
-- would reorder keys and rewrite numbers.

CREATE TABLE connections (
    connection_id text PRIMARY KEY,               -- lower-case UUID
    state_type    text CHECK (state_type IN ('legacy', 'global', 'stream')),  -- NULL: not_set
    revision      bigint NOT NULL,                -- latest revision, 1, 2, 3 ... without gaps
    next_seq      bigint NOT NULL,                -- next entry's place in insertion order
    epoch         bigint NOT NULL DEFAULT 0       -- changes when an import replaces the connection
);

CREATE TABLE revisions (
    connection_id text NOT NULL,
    revision      bigint NOT NULL,
    created_at_ms bigint NOT NULL,                -- Unix time, milliseconds, database clock
    state_type    text CHECK (state_type IN ('legacy', 'global', 'stream')),
    actor         text,
    reason        text,
    PRIMARY KEY (connection_id, revision)
);

CREATE TABLE changes (
    connection_id text NOT NULL,
    revision      bigint NOT NULL,
    entry_key     text NOT NULL,                  -- EntryKey::encode
    blob          text,                           -- NULL: the entry was deleted
    seq           bigint,                         -- the entry's position when set
    PRIMARY KEY (connection_id, revision, entry_key)
);

CREATE INDEX changes_by_key ON changes (connection_id, entry_key, revision);

CREATE TABLE entries (
    connection_id text NOT NULL,
    entry_key     text NOT NULL,
    seq           bigint NOT NULL,
    revision      bigint NOT NULL,
    PRIMARY KEY (connection_id, entry_key)
);

CREATE UNIQUE INDEX entries_in_order ON entries (connection_id, seq);

CREATE TABLE leases (
    connection_id text PRIMARY KEY,
    holder        text NOT NULL,
    token         text NOT NULL,
    expires_at_ms bigint NOT NULL
);
