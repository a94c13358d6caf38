-- Schema 6 (PostgreSQL): a batch of writes applied by one statement.
--
-- A batch applied on the heads its node's cache holds (schema 3) went to
-- the server as BEGIN, the locks, the check, the entries' deletes and
-- upserts, the connections' and history's rows and COMMIT: one round trip,
-- but six results, and PostgreSQL flushes each to the socket on its own
-- (every Sync answers with ReadyForQuery), each waking the node. This
-- function does all of it in one call, which PostgreSQL runs as a
-- transaction of its own and commits before it answers.
--
-- Its statements run in order, each with a snapshot of its own (the
-- function is VOLATILE), so the check reads the heads only once the locks
-- are held. A failed check raises HW001 (`highwater_expect`) and nothing
-- is written. Called inside a transaction that already holds the locks and
-- read the heads (src/store/postgres/batch.rs, `apply_locked`), it is
-- given no keys and nothing to check. Lookups go through LATERAL
-- subqueries with LIMIT 1 so that the generic plans, which this function
-- asks for, look rows up by their keys (batch.rs says why); PostgreSQL
-- would otherwise re-plan some of them at every call.
--
-- Measured against the six statements it replaces (bench/compare
-- BENCH_BACKEND=postgres, 32 clients, two runs of 6 alternated rounds):
-- 14.1k -> 16.8k and 16.3k -> 16.9k writes/s, ahead in 11 of 12 pairs;
-- with one client 1.5k-1.9k -> 1.9k-2.4k writes/s, the database's CPU per
-- write ~360 -> ~260 us and Highwater's ~190 -> ~100 us.
CREATE FUNCTION highwater_write(
    keys bigint[], me text,
    x_ids text[], x_revisions bigint[], x_epochs bigint[], x_next_seqs bigint[], x_tokens text[], x_respect boolean[],
    d_ids text[], d_keys text[],
    e_ids text[], e_keys text[], e_revisions bigint[], e_seqs bigint[],
    r_ids text[], r_revisions bigint[], r_next_seqs bigint[], r_types text[], r_actors text[], r_reasons text[],
    r_remaining boolean[],
    c_ids text[], c_revisions bigint[], c_keys text[], c_blobs text[], c_seqs bigint[], c_firsts boolean[])
RETURNS TABLE (written_id text, written_type text)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    -- Every connection's advisory lock, in the order given (ascending),
    -- after any other node's sole-node lease has ended (schema 5).
    PERFORM highwater_lock(keys, me);
    -- Each connection as the node's cache assumed it: its revision, epoch
    -- and next position, and either a live lease with the token given or,
    -- with no token and leases respected, no live lease.
    PERFORM highwater_expect(count(*) = 0)
       FROM unnest(x_ids, x_revisions, x_epochs, x_next_seqs, x_tokens, x_respect)
         AS t(id, rev, epoch, next_seq, token, respect)
       LEFT JOIN LATERAL (SELECT c.revision, c.epoch, c.next_seq FROM connections c
         WHERE c.connection_id = t.id LIMIT 1) c ON true
       LEFT JOIN LATERAL (SELECT l.token, l.expires_at_ms > (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS live
         FROM leases l WHERE l.connection_id = t.id LIMIT 1) l ON true
      WHERE (COALESCE(c.revision, 0), COALESCE(c.epoch, 0), COALESCE(c.next_seq, 0)) <> (t.rev, t.epoch, t.next_seq)
         OR CASE WHEN t.token IS NOT NULL THEN NOT COALESCE(l.live AND l.token = t.token, false)
            ELSE t.respect AND COALESCE(l.live, false) END;
    -- Deletes before upserts: a restore may give a kept entry the place of
    -- one it removes.
    IF cardinality(d_ids) > 0 THEN
        DELETE FROM entries WHERE ctid = ANY(ARRAY(
            SELECT x.ctid FROM unnest(d_ids, d_keys) AS d(c, k)
            CROSS JOIN LATERAL (SELECT e.ctid FROM entries e WHERE e.connection_id = d.c AND e.entry_key = d.k LIMIT 1) x));
    END IF;
    -- New entries and entries set again, by their key: an upsert finds each
    -- row through the primary key, whatever the plan.
    IF cardinality(e_ids) > 0 THEN
        INSERT INTO entries (connection_id, entry_key, revision, seq)
        SELECT * FROM unnest(e_ids, e_keys, e_revisions, e_seqs)
        ON CONFLICT (connection_id, entry_key) DO UPDATE SET revision = excluded.revision, seq = excluded.seq;
    END IF;
    -- Each written connection's row, its type set only if an entry remains:
    -- known to the node when it had the state before the write, else looked
    -- up (COALESCE evaluates the lookup only then; it sees the entry changes
    -- above). Then every change row, the first of each revision carrying
    -- the revision's date (the database's clock), its type after the write,
    -- actor and reason (schema 4). Returns each connection's type after the
    -- write.
    IF cardinality(r_ids) > 0 THEN
        RETURN QUERY
        WITH t AS (
            SELECT * FROM unnest(r_ids, r_revisions, r_next_seqs, r_types, r_actors, r_reasons, r_remaining)
              AS t(id, rev, next_seq, st, actor, reason, remaining)),
        header AS (
            INSERT INTO connections AS h (connection_id, state_type, revision, next_seq)
            SELECT t.id, CASE WHEN COALESCE(t.remaining, (SELECT true FROM entries e WHERE e.connection_id = t.id
              ORDER BY e.entry_key LIMIT 1), false) THEN t.st END, t.rev, t.next_seq FROM t
            ON CONFLICT (connection_id) DO UPDATE SET state_type = excluded.state_type,
              revision = excluded.revision, next_seq = excluded.next_seq
            RETURNING h.connection_id, h.state_type),
        recorded AS (
            INSERT INTO history (connection_id, revision, entry_key, blob, seq, created_at_ms, state_type, actor, reason)
            SELECT c.id, c.rev, c.k, c.blob, c.seq,
              CASE WHEN c.first THEN (extract(epoch FROM clock_timestamp()) * 1000)::bigint END,
              h.state_type, m.actor, m.reason
            FROM unnest(c_ids, c_revisions, c_keys, c_blobs, c_seqs, c_firsts) AS c(id, rev, k, blob, seq, first)
            LEFT JOIN t m ON c.first AND m.id = c.id AND m.rev = c.rev
            LEFT JOIN header h ON c.first AND h.connection_id = c.id)
        SELECT header.connection_id, header.state_type FROM header;
    END IF;
END
$$;
