-- Kept in step with migrations/sqlite/0007, which drops the audit log's session and
-- subject indexes. PostgreSQL keeps them: its planner can serve the events query's
-- subject and session filters from them (custom plans see which filters are set), and
-- its writes do not share a core with request handling the way the embedded SQLite's do.
SELECT 1;
