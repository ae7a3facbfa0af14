-- The audit log keeps a batch of events to a row (SQLite dialect), compressed. A row
-- per event cost a record, a B-tree cell and an index entry per event, and every
-- byte of it was written twice (to the WAL and at its checkpoint), on the core that
-- serves requests; a row per batch pays the first once per batch, and compressing the
-- batch divides the second.
--
-- `lines` holds the batch's events, one JSON line each (the replay format), joined by
-- newlines in the order they were recorded, stored as `encoding` says: `ndjson.zst`
-- (a zstd frame) for what the writer stores, `ndjson` (plain UTF-8) for events
-- carried over from the previous layout. `first_ms` and `last_ms` are the batch's
-- earliest and latest event times (a row spans at most a minute), `events` how many
-- lines it holds. Filters by subject, session and decision read the lines (the time
-- window already bounded what the previous layout scanned). Rows go once all of their
-- events are past retention.
CREATE TABLE event_batches (
    id       INTEGER PRIMARY KEY,
    first_ms BIGINT NOT NULL,
    last_ms  BIGINT NOT NULL,
    events   INTEGER NOT NULL,
    encoding TEXT NOT NULL,
    lines    BLOB NOT NULL
);
CREATE INDEX event_batches_first ON event_batches (first_ms, id);
-- Events recorded before: one row each, in the order they were stored.
INSERT INTO event_batches (first_ms, last_ms, events, encoding, lines)
    SELECT ts_ms, ts_ms, 1, 'ndjson', CAST(event AS BLOB) FROM events ORDER BY id;
DROP TABLE events;
