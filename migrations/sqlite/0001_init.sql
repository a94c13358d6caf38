-- Highwater schema 1 (SQLite).
--
-- A connection's state is one row per entry in `entries`; each entry points
-- at the `changes` row of the revision that last set its blob, so a blob is
-- stored once and a revision stores only what it changed.

-- One row per connection that has ever been written.
CREATE TABLE connections (
    connection_id TEXT PRIMARY KEY NOT NULL,      -- lower-case UUID
    state_type    TEXT CHECK (state_type IN ('legacy', 'global', 'stream')),  -- NULL: not_set
    revision      INTEGER NOT NULL,               -- latest revision, 1, 2, 3 ... without gaps
    next_seq      INTEGER NOT NULL,               -- next entry's place in insertion order
    epoch         INTEGER NOT NULL DEFAULT 0      -- changes when an import replaces the connection
) WITHOUT ROWID;

-- One row per accepted write that changed something.
CREATE TABLE revisions (
    connection_id TEXT NOT NULL,
    revision      INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,               -- Unix time, milliseconds
    state_type    TEXT CHECK (state_type IN ('legacy', 'global', 'stream')),  -- type after the write
    actor         TEXT,                           -- who wrote it, when known
    reason        TEXT,                           -- why, when given
    PRIMARY KEY (connection_id, revision)
) WITHOUT ROWID;

-- What each revision changed: the new blob, or NULL for a deleted entry.
CREATE TABLE changes (
    connection_id TEXT NOT NULL,
    revision      INTEGER NOT NULL,
    entry_key     TEXT NOT NULL,                  -- EntryKey::encode
    blob          TEXT,
    seq           INTEGER,                        -- the entry's position when set; NULL for a delete
    PRIMARY KEY (connection_id, revision, entry_key)
);

-- The state as of any revision: per key, the latest change at or before it.
CREATE INDEX changes_by_key ON changes (connection_id, entry_key, revision);

-- The current entries of each connection.
CREATE TABLE entries (
    connection_id TEXT NOT NULL,
    entry_key     TEXT NOT NULL,
    seq           INTEGER NOT NULL,               -- first-insertion order
    revision      INTEGER NOT NULL,               -- the changes row holding the blob
    PRIMARY KEY (connection_id, entry_key)
) WITHOUT ROWID;

CREATE UNIQUE INDEX entries_in_order ON entries (connection_id, seq);

-- Sync leases: at most one per connection; a row whose expiry has passed
-- is no lease at all.
CREATE TABLE leases (
    connection_id TEXT PRIMARY KEY NOT NULL,
    holder        TEXT NOT NULL,
    token         TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
