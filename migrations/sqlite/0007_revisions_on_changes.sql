-- Schema 7 (SQLite): a revision's own columns on its first change row.
--
-- Every write inserted, beside its change rows, a row of its own into
-- `history` under the entry key '' (migrations 0004): one more entry in
-- the primary-key index per write, at the connection's place in it. With
-- writes spread over many connections, those entries filled the index's
-- pages twice as fast, and SQLite rebalanced a full page with its
-- neighbours every few writes to it, writing three or four pages to the
-- WAL instead of one. Now a write's date, type, actor and reason are
-- columns of the first change row it inserts, as on PostgreSQL (its
-- migration 0004). A revision with no change row to carry them keeps a
-- row of its own under '': one without changes (only an import makes
-- one), or one whose changes are all blobs written in place (queries.rs,
-- `in_place`: SQLite builds a zeroblob in memory unless it ends its row).
-- Rows written before keep theirs: either way one row per revision
-- carries its date.
--
-- A change row of an old revision that pruning keeps (it still holds a
-- current entry's blob) loses the revision's columns with the revision.
--
-- Measured (bench/compare, the SQLite write load of bench/run): see the
-- README's performance section.
DROP VIEW revisions;

-- One row per revision still kept.
CREATE VIEW revisions AS
SELECT connection_id, revision, created_at_ms, state_type, actor, reason FROM history WHERE created_at_ms IS NOT NULL;
