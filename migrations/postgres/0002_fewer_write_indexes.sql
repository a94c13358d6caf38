-- Schema 2 (PostgreSQL): two indexes fewer for every write to maintain,
-- as SQLite's schema 2 did.
--
-- changes_by_key: every write inserted a row into it as well as into the
-- primary key. Past states and pruning now group a connection's changes by
-- key through the primary key (queries.rs state_at, history.rs prune).
--
-- entries_in_order: with it, no entry update could be a heap-only-tuple
-- update, so every write also inserted into both of the table's indexes.
-- Whole states are read in insertion order by sorting the connection's
-- entries in Highwater instead.
DROP INDEX IF EXISTS changes_by_key;
DROP INDEX IF EXISTS entries_in_order;
