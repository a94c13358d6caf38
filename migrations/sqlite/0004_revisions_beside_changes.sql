-- Schema 4 (SQLite): a revision's own row beside its changes, in one table.
--
-- Every write inserted its revision row into `revisions`, a B-tree of its
-- own ordered by (connection, revision): with writes to many connections,
-- each revision row landed on a page of its own connection, a page no other
-- write of the group touched, so every write added that page (4 KiB) to the
-- WAL, to its fsync and to the next checkpoint. Under bench/'s write load
-- the disk and the writer's time went mostly to such page writes.
--
-- `history` is the former `changes` table, and a revision's row is now a
-- row of it with the entry key '' (no entry key is empty): its key in the
-- primary key index sits next to the keys of the revision's changes, and
-- the row itself is appended after them, so it lands on pages the write
-- touches anyway. A revision still has at least one change row.
--
-- The views `changes` and `revisions` show the two kinds of rows as the
-- tables of that name did, so reads (and anyone's ad-hoc SQL) see the same
-- model; writes go to `history`.
--
-- Measured (bench/compare, the SQLite write load of bench/run): see the
-- README's performance section.
ALTER TABLE changes RENAME TO history;
ALTER TABLE history ADD COLUMN created_at_ms INTEGER;            -- revision rows: Unix time, milliseconds
ALTER TABLE history ADD COLUMN state_type TEXT                   -- revision rows: type after the write
    CHECK (state_type = 'legacy' OR state_type = 'global' OR state_type = 'stream');
ALTER TABLE history ADD COLUMN actor TEXT;                       -- revision rows: who wrote it, when known
ALTER TABLE history ADD COLUMN reason TEXT;                      -- revision rows: why, when given

INSERT INTO history (connection_id, revision, entry_key, created_at_ms, state_type, actor, reason)
SELECT connection_id, revision, '', created_at_ms, state_type, actor, reason FROM revisions;
DROP TABLE revisions;

-- What each revision changed: the new blob, or NULL for a deleted entry.
CREATE VIEW changes AS
SELECT connection_id, revision, entry_key, blob, seq FROM history WHERE entry_key <> '';

-- One row per accepted write that changed something.
CREATE VIEW revisions AS
SELECT connection_id, revision, created_at_ms, state_type, actor, reason FROM history WHERE entry_key = '';
