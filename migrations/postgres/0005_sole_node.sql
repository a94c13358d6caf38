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
-- A write names its node to `highwater_lock`; anything else that writes
-- (psql, another tool) is no holder and should wait like any other writer.
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
DECLARE
    key bigint;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1213661184, 1);
    WHILE EXISTS (SELECT 1 FROM highwater_sole
                   WHERE lease_until > clock_timestamp() AND node IS DISTINCT FROM me) LOOP
        PERFORM pg_sleep(0.01);
    END LOOP;
    FOREACH key IN ARRAY keys LOOP
        PERFORM pg_advisory_xact_lock(key);
    END LOOP;
END
$$;
