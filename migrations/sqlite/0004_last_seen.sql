-- The session's last request (SQLite dialect), written behind the request path about
-- once a second: a node that meets the session later (another node, or this one after
-- a restart) picks up geo-velocity and concurrent-use checks from here.
ALTER TABLE sessions ADD COLUMN last_seen_info TEXT;
