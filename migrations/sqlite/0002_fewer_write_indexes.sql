-- Schema 2 (SQLite): two indexes fewer for every write to maintain.
--
-- changes_by_key: every write inserted into it at the place of the key it
-- changed; on a large connection written at random streams those inserts
-- land all over a growing index that no cache holds, and they were most of
-- what a one-stream write to a 10,000-stream connection cost beyond one to
-- a 1-stream connection. Past states and pruning now group the
-- connection's changes by key through the primary key (queries.rs
-- state_at, history.rs prune).
--
-- entries_in_order: rewritten by every entry update. Whole states are read
-- in insertion order by sorting the connection's entries instead.
--
-- Measured with bench/ (state/stream/set, 32 clients): 10,000-stream
-- connection 11.2k -> 18.1k writes/s, 1-stream connection 21.0k -> 22.4k.
DROP INDEX IF EXISTS changes_by_key;
DROP INDEX IF EXISTS entries_in_order;
