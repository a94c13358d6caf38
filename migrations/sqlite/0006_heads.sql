-- Schema 6 (SQLite): a connection's own row beside its current entries.
--
-- Every write updated the connection's row in `connections` and its entry
-- rows in `entries`, two B-trees ordered by connection: with writes spread
-- over many connections, two pages per write that no other write of the
-- group shared. `heads` holds both, the connection's row under the entry
-- key '' (no entry key is empty) just before its entries, so a write
-- usually changes one page of it. Measured: see the README's performance
-- section.
--
-- The views `connections` and `entries` show the two kinds of rows as the
-- tables of that name did; writes go to `heads`.
CREATE TABLE heads (
    connection_id BLOB NOT NULL,                  -- the UUID's 16 bytes
    entry_key     TEXT NOT NULL,                  -- EntryKey::encode; '' for the connection's row
    revision      INTEGER NOT NULL,               -- connection: latest revision, 1, 2, 3 ... without gaps;
                                                  -- entry: the history row holding its blob
    seq           INTEGER,                        -- entry: first-insertion order
    state_type    TEXT CHECK (state_type = 'legacy' OR state_type = 'global' OR state_type = 'stream'),
                                                  -- connection: its type, NULL for not_set
    next_seq      INTEGER,                        -- connection: next entry's place in insertion order
    epoch         INTEGER,                        -- connection: changes when an import replaces it
    PRIMARY KEY (connection_id, entry_key)
) WITHOUT ROWID;

INSERT INTO heads (connection_id, entry_key, revision, state_type, next_seq, epoch)
SELECT connection_id, '', revision, state_type, next_seq, epoch FROM connections;
INSERT INTO heads (connection_id, entry_key, revision, seq)
SELECT connection_id, entry_key, revision, seq FROM entries;
DROP TABLE connections;
DROP TABLE entries;

-- One row per connection that has ever been written.
CREATE VIEW connections AS
SELECT connection_id, state_type, revision, next_seq, epoch FROM heads WHERE entry_key = '';

-- The current entries of each connection.
CREATE VIEW entries AS
SELECT connection_id, entry_key, seq, revision FROM heads WHERE entry_key <> '';
