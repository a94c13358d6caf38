-- bench/pg_batch: calls highwater_write (migrations/postgres/0006) as a
-- batch of the write load does, on a database bench/pg_batch seeded
-- through Highwater: N one-stream create_or_updates, each to its own
-- connection of the 1000 that bench/lua/write.lua writes, every one
-- checked against the connection's row as the node's cache would hold it.
--
-- With skip, it reads and builds everything but does not call
-- highwater_write: what is left of a call's time without it is the cost of
-- highwater_write itself.
CREATE FUNCTION pg_batch_call(n int, skip boolean) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    first int := floor(random() * 1000)::int;
    key constant text := 'stream:["table_00000","public"]';
    ids text[];
    revisions bigint[];
    epochs bigint[];
    next_seqs bigint[];
    lock_keys bigint[];
    blobs text[];
    nexts bigint[];
BEGIN
    -- N consecutive connections (modulo 1000) from a random one: distinct,
    -- and found by their primary key as the heads are.
    SELECT array_agg(c.connection_id ORDER BY c.connection_id), array_agg(c.revision ORDER BY c.connection_id),
           array_agg(c.epoch ORDER BY c.connection_id), array_agg(c.next_seq ORDER BY c.connection_id),
           array_agg(c.revision + 1 ORDER BY c.connection_id),
           array_agg('{"cursor":"2024-06-01T00:00:00Z","offset":' || floor(random() * 1e9)::bigint || '}'
                     ORDER BY c.connection_id)
      INTO ids, revisions, epochs, next_seqs, nexts, blobs
      FROM generate_series(0, n - 1) AS i
     CROSS JOIN LATERAL (SELECT * FROM connections
                          WHERE connection_id = format('00000000-0000-4000-9000-%s', lpad(((first + i) % 1000)::text, 12, '0'))
                          LIMIT 1) c;
    -- Any distinct keys serve for the advisory locks, in ascending order.
    SELECT array_agg(k ORDER BY k) INTO lock_keys FROM (SELECT hashtext(id)::bigint AS k FROM unnest(ids) AS id) keys;
    IF skip THEN
        RETURN 0;
    END IF;
    PERFORM * FROM highwater_write(lock_keys, 'pg_batch',
        ids, revisions, epochs, next_seqs, array_fill(NULL::text, ARRAY[n]), array_fill(true, ARRAY[n]),
        '{}'::text[], '{}'::text[],
        ids, array_fill(key, ARRAY[n]), nexts, array_fill(0::bigint, ARRAY[n]),
        ids, nexts, next_seqs, array_fill('stream'::text, ARRAY[n]), array_fill(NULL::text, ARRAY[n]),
        array_fill(NULL::text, ARRAY[n]), array_fill(true, ARRAY[n]),
        ids, nexts, array_fill(key, ARRAY[n]), blobs, array_fill(0::bigint, ARRAY[n]), array_fill(true, ARRAY[n]));
    RETURN n;
END
$$;
