-- Audit events (PostgreSQL dialect): one per decision, in the replay format. Written in
-- batches off the request path; pruned by age. Never a raw token.
CREATE TABLE events (
    id         BIGSERIAL PRIMARY KEY,
    ts_ms      BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    session_id TEXT,
    subject    TEXT,
    decision   TEXT,
    -- The whole event as one JSON line (what export and replay read).
    event      TEXT NOT NULL
);
CREATE INDEX events_ts ON events (ts_ms);
CREATE INDEX events_session ON events (session_id, ts_ms);
CREATE INDEX events_subject ON events (subject, ts_ms);
