-- Why a session was asked to re-authenticate: the user message of that decision,
-- shown again on every request (and to the app's re-authentication page) until the
-- user re-authenticates.
ALTER TABLE sessions ADD COLUMN step_up_message TEXT;
