-- Schema 4 (PostgreSQL): a revision's metadata on its first change row.
--
-- Every write inserted a row into `revisions` beside the rows of its
-- changes: per write one more heap tuple, one more descent of a primary-key
-- B-tree ordered by connection, and their WAL records. PostgreSQL's work
-- per row is what bench/'s write load is bound by (its CPU, more than its
-- pages): without that insert the load made 1.12x the writes/s, while
-- keeping the row but beside the changes in one table made 1.03x
-- (bench/compare BENCH_BACKEND=postgres).
--
-- `history` is the former `changes` table. A revision's date, type, actor
-- and reason are columns of one of its change rows (the first the write
-- made); a revision without a change row (only an import can make one)
-- has a row of its own under the entry key '', which no entry key is.
-- A change row of an old revision that pruning keeps (it still holds a
-- current entry's blob) loses the revision's metadata with the revision.
--
-- The views `changes` and `revisions` show the two kinds of rows as the
-- tables of that name did, for reads and for anyone's ad-hoc SQL. Writes
-- go to `history`.
ALTER TABLE changes RENAME TO history;
ALTER INDEX changes_pkey RENAME TO history_pkey;
ALTER TABLE history
    ADD COLUMN created_at_ms bigint,              -- the revision's row: Unix time, milliseconds, database clock
    ADD COLUMN state_type    text CHECK (state_type IN ('legacy', 'global', 'stream')),  -- the revision's row
    ADD COLUMN actor         text,                -- the revision's row: who wrote it, when known
    ADD COLUMN reason        text;                -- the revision's row: why, when given

UPDATE history h
   SET created_at_ms = r.created_at_ms, state_type = r.state_type, actor = r.actor, reason = r.reason
  FROM (SELECT DISTINCT ON (connection_id, revision) connection_id, revision, entry_key
          FROM history ORDER BY connection_id, revision, entry_key) f
  JOIN revisions r ON r.connection_id = f.connection_id AND r.revision = f.revision
 WHERE h.connection_id = f.connection_id AND h.revision = f.revision AND h.entry_key = f.entry_key;
INSERT INTO history (connection_id, revision, entry_key, created_at_ms, state_type, actor, reason)
SELECT connection_id, revision, '', created_at_ms, state_type, actor, reason FROM revisions r
 WHERE NOT EXISTS (SELECT 1 FROM history h WHERE h.connection_id = r.connection_id AND h.revision = r.revision);
DROP TABLE revisions;

-- A row under '' is a revision's own row; only a revision's row is dated
-- or carries a type, an actor or a reason.
ALTER TABLE history ADD CONSTRAINT history_row_kind CHECK (
    (entry_key <> '' OR created_at_ms IS NOT NULL)
    AND (created_at_ms IS NOT NULL OR (state_type IS NULL AND actor IS NULL AND reason IS NULL)));

CREATE VIEW changes AS
SELECT connection_id, revision, entry_key, blob, seq FROM history WHERE entry_key <> '';

CREATE VIEW revisions AS
SELECT connection_id, revision, created_at_ms, state_type, actor, reason FROM history WHERE created_at_ms IS NOT NULL;
