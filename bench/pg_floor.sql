-- The PostgreSQL durable-write floor (bench/run): one upsert of a small JSON
-- state per transaction, on a random one of 1000 rows. bench/run creates
-- the table: CREATE TABLE s (id integer PRIMARY KEY, state text NOT NULL).
\set id random(0, 999)
\set offset random(1, 1000000000)
INSERT INTO s (id, state) VALUES (:id, '{"cursor":"2024-06-01T00:00:00Z","offset":' || :offset || '}') ON CONFLICT (id) DO UPDATE SET state = excluded.state;
