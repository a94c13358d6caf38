-- Schema 5 (SQLite): connection ids as their 16 bytes, not 36 characters.
--
-- Every key of every table starts with the connection id. As text it made
-- the rows and index entries a write adds 20 bytes longer, so fewer fit on
-- a page and a group of writes to many connections touched more pages,
-- each one 4 KiB more for the WAL, its fsync and the next checkpoint.
-- Blobs of the UUID's bytes (big-endian, ConnectionId::to_bytes) sort in
-- the order of the lower-case text, so listings keep their order.
--
-- Each table is copied once into its new form; an id that is not a UUID
-- (none can be: Highwater only ever stored UUIDs) fails the migration,
-- which then changes nothing.
DROP VIEW changes;
DROP VIEW revisions;

CREATE TABLE connections_5 (
    connection_id BLOB PRIMARY KEY NOT NULL,     -- the UUID's 16 bytes
    state_type    TEXT CHECK (state_type = 'legacy' OR state_type = 'global' OR state_type = 'stream'),  -- NULL: not_set
    revision      INTEGER NOT NULL,               -- latest revision, 1, 2, 3 ... without gaps
    next_seq      INTEGER NOT NULL,               -- next entry's place in insertion order
    epoch         INTEGER NOT NULL DEFAULT 0      -- changes when an import replaces the connection
) WITHOUT ROWID;
INSERT INTO connections_5 (connection_id, state_type, revision, next_seq, epoch)
SELECT unhex(replace(connection_id, '-', '')), state_type, revision, next_seq, epoch FROM connections;
DROP TABLE connections;
ALTER TABLE connections_5 RENAME TO connections;

-- A revision's row (entry key '') and the changes it made (migrations 0004).
CREATE TABLE history_5 (
    connection_id BLOB NOT NULL,
    revision      INTEGER NOT NULL,
    entry_key     TEXT NOT NULL,                  -- EntryKey::encode; '' for the revision's row
    blob          TEXT,                           -- changes: the new blob, NULL for a deleted entry
    seq           INTEGER,                        -- changes: the entry's position when set
    created_at_ms INTEGER,                        -- revision rows: Unix time, milliseconds
    state_type    TEXT CHECK (state_type = 'legacy' OR state_type = 'global' OR state_type = 'stream'),
    actor         TEXT,                           -- revision rows: who wrote it, when known
    reason        TEXT,                           -- revision rows: why, when given
    PRIMARY KEY (connection_id, revision, entry_key)
);
INSERT INTO history_5 (rowid, connection_id, revision, entry_key, blob, seq, created_at_ms, state_type, actor, reason)
SELECT rowid, unhex(replace(connection_id, '-', '')), revision, entry_key, blob, seq,
       created_at_ms, state_type, actor, reason
  FROM history ORDER BY rowid;
DROP TABLE history;
ALTER TABLE history_5 RENAME TO history;

CREATE TABLE entries_5 (
    connection_id BLOB NOT NULL,
    entry_key     TEXT NOT NULL,
    seq           INTEGER NOT NULL,               -- first-insertion order
    revision      INTEGER NOT NULL,               -- the history row holding the blob
    PRIMARY KEY (connection_id, entry_key)
) WITHOUT ROWID;
INSERT INTO entries_5 (connection_id, entry_key, seq, revision)
SELECT unhex(replace(connection_id, '-', '')), entry_key, seq, revision FROM entries;
DROP TABLE entries;
ALTER TABLE entries_5 RENAME TO entries;

CREATE TABLE leases_5 (
    connection_id BLOB PRIMARY KEY NOT NULL,
    holder        TEXT NOT NULL,
    token         TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO leases_5 (connection_id, holder, token, expires_at_ms)
SELECT unhex(replace(connection_id, '-', '')), holder, token, expires_at_ms FROM leases;
DROP TABLE leases;
ALTER TABLE leases_5 RENAME TO leases;

CREATE VIEW changes AS
SELECT connection_id, revision, entry_key, blob, seq FROM history WHERE entry_key <> '';

CREATE VIEW revisions AS
SELECT connection_id, revision, created_at_ms, state_type, actor, reason FROM history WHERE entry_key = '';
