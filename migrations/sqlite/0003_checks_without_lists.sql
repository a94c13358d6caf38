-- Schema 3 (SQLite): the state_type checks as comparisons, not an IN list.
--
-- SQLite evaluates `x IN ('legacy', 'global', 'stream')` in a CHECK by
-- building a temporary index of the list each time the statement runs: an
-- ephemeral B-tree with a zeroed page and its own page cache. The write
-- path's upsert of `connections` did that twice per write and the insert
-- into `revisions` once; callgrind on bench/profile write put that at about
-- an eighth of the server's instructions. Three comparisons accept and
-- refuse exactly the same values (NULL included) without it.
--
-- The tables are not rebuilt (`revisions` holds a row per write ever kept):
-- the change does not touch the file format or any row, so the table text
-- is edited in place, as SQLite's documentation describes for changing
-- CHECK constraints (https://sqlite.org/lang_altertable.html, "Making Other
-- Kinds Of Table Schema Changes"). RESET ends the editing and makes this
-- connection parse the tables again (it goes on to be the writer); the
-- migration step then increments `schema_version` for any other.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql,
                     'CHECK (state_type IN (''legacy'', ''global'', ''stream''))',
                     'CHECK (state_type = ''legacy'' OR state_type = ''global'' OR state_type = ''stream'')')
 WHERE type = 'table' AND name IN ('connections', 'revisions');
PRAGMA writable_schema = RESET;
