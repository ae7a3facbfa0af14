-- Kept in step with migrations/sqlite/0008, which stores SQLite's audit log a batch to
-- a row. PostgreSQL keeps a row per event: its indexes serve the events query's
-- subject and session filters, and its writes run on the database server.
SELECT 1;
