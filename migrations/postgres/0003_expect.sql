-- Schema 3 (PostgreSQL): a batch of writes in one round trip.
--
-- A node applies a batch of writes on the connection heads and leases its
-- cache holds, without reading them first: the batch goes to the server
-- with BEGIN, the advisory locks, a check that every connection is as
-- assumed, the changes and COMMIT, all at once. When the check fails
-- (another node wrote one of the connections, or a lease changed), it must
-- stop the statements sent after it, so it fails the transaction: this
-- function raises SQLSTATE HW001, and the node then reads the heads under
-- the locks and applies the batch again.
--
-- Measured with bench/ (create_or_update of one stream, 32 clients): one
-- round trip per batch instead of two.
CREATE OR REPLACE FUNCTION highwater_expect(held boolean) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT held THEN
        RAISE EXCEPTION 'a connection changed since this Highwater node last saw it'
            USING ERRCODE = 'HW001';
    END IF;
    RETURN true;
END
$$;
