-- The audit log keeps one index, by time (SQLite dialect). The events query reads a
-- time window and filters it (its optional subject, session and decision filters are
-- `IS NULL OR =` tests, which SQLite's planner never serves from another index), so the
-- session and subject indexes were never read; they were written on every event, each
-- at a random place, which dirtied two index pages per event and made the writer's
-- commits and checkpoints most of its cost.
DROP INDEX events_session;
DROP INDEX events_subject;
