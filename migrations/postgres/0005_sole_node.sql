-- Schema 5 (PostgreSQL): a lease that lets a node alone on the database
-- answer reads from memory.
--
-- Any number of nodes may serve one database, so a node asks the database
-- for a connection's row before every read it answers from its cache.
-- When one node is alone, nothing else writes and the question is wasted:
-- bench/'s PostgreSQL `get` ran at ~0.4x the HTTP floor with it. That node
-- may take this lease (src/store/postgres/sole.rs) and, while it holds it,
-- answer reads from its cache alone.
--
-- What makes that safe is that every write checks the lease first
-- (`highwater_lock`, which every Highwater write transaction calls before
-- its connections' advisory locks): while another session's lease is live
-- a write waits, so nothing but the holder writes. Taking the lease takes
-- the advisory lock (1213661184, 1) exclusively, which every write holds
-- shared until it ends, so a lease never starts while another node's write
-- is in flight. The holder stops trusting its cache before the lease ends
-- by the database's clock, and renews it only while it has not lapsed.
--
-- A write names its node to `highwater_lock`. Anything else that writes
-- the state's tables (a node of an older version during a rolling upgrade,
-- psql, another tool) goes through `highwater_fence`, a trigger on each of
-- them: its session joins the nodes (the holder sees it wait and gives the
-- lease up, and no node takes the lease while that session lasts), then
-- waits like any other writer. A later migration that writes these tables
-- must call `highwater_lock('{}', NULL)` first, or its session joins too.
CREATE TABLE highwater_sole (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    node        text,                                    -- the holder's node id
    lease_until timestamptz NOT NULL DEFAULT '-infinity' -- the database's clock
);
INSERT INTO highwater_sole DEFAULT VALUES;

-- Waits while a node other than `me` holds a live lease, then takes each
-- connection's advisory lock in the order given (ascending, so that two
-- writers cannot deadlock).
CREATE OR REPLACE FUNCTION highwater_lock(keys bigint[], me text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1213661184, 1);
    WHILE EXISTS (SELECT 1 FROM highwater_sole
                   WHERE lease_until > clock_timestamp() AND node IS DISTINCT FROM me) LOOP
        PERFORM pg_sleep(0.01);
    END LOOP;
    -- One statement for all of them, not one per key: each statement run
    -- from PL/pgSQL costs about as much as one more sent by the client
    -- (pgbench of a batch's locks and empty writes, 8 keys, 4 clients:
    -- medians 3933 tps as before this schema, 3667 with this function,
    -- 3240 with a statement per key).
    PERFORM pg_advisory_xact_lock(k) FROM unnest(keys) AS k;
    -- This transaction waited as a Highwater write: the triggers let it be.
    PERFORM set_config('highwater.fenced', 'on', true);
END
$$;

-- A write that did not call `highwater_lock`: its session joins the nodes
-- (the members' key, held shared until the session ends), which waits
-- until no lease holder remains, and the write then waits as
-- `highwater_lock` does. The members' key comes first: a node taking the
-- lease holds it while it waits for the writes' key.
CREATE OR REPLACE FUNCTION highwater_fence() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF current_setting('highwater.fenced', true) = 'on' THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_lock_shared(1213661184, 2);
    PERFORM highwater_lock('{}', NULL);
    RETURN NULL;
END
$$;

-- The WHEN clause spares Highwater's own statements a PL/pgSQL call each.
CREATE TRIGGER highwater_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON connections
    FOR EACH STATEMENT WHEN (current_setting('highwater.fenced', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION highwater_fence();
CREATE TRIGGER highwater_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON entries
    FOR EACH STATEMENT WHEN (current_setting('highwater.fenced', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION highwater_fence();
CREATE TRIGGER highwater_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON history
    FOR EACH STATEMENT WHEN (current_setting('highwater.fenced', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION highwater_fence();
