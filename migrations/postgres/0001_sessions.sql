-- Sessions, their refresh-token families and revocations (PostgreSQL dialect).
-- Times are whole seconds since the Unix epoch, so both databases store the same values.

-- One row per login on one device.
CREATE TABLE sessions (
    session_id      TEXT PRIMARY KEY,
    subject         TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    last_seen_at    BIGINT NOT NULL,
    -- When the user last proved who they are (open or reauth); the token's auth_time.
    auth_time       BIGINT NOT NULL,
    -- The binding: the client the session was issued to (renewed at reauth).
    ip              TEXT NOT NULL,
    user_agent      TEXT NOT NULL,
    binding         TEXT NOT NULL,
    acr             TEXT,
    amr             TEXT,          -- JSON array
    claims          TEXT,          -- JSON object copied into every access token
    state           TEXT NOT NULL CHECK (state IN ('active', 'step_up', 'revoked')),
    revoked_at      BIGINT,
    revoked_reason  TEXT,
    -- Bumped at reauth: access tokens carry it, older epochs are refused.
    epoch           BIGINT NOT NULL DEFAULT 0,
    -- Latest exp of an access token minted before the current epoch.
    epoch_until     BIGINT NOT NULL DEFAULT 0,
    -- The user's generation when the session was opened; a later "log out everywhere" kills it.
    user_generation BIGINT NOT NULL,
    -- Latest exp of any access token of this session: how long a revocation must stay in memory.
    access_exp_max  BIGINT NOT NULL
);
CREATE INDEX sessions_subject ON sessions (subject);
-- Start-up loads revoked sessions whose tokens may still be alive.
CREATE INDEX sessions_revoked ON sessions (access_exp_max) WHERE state = 'revoked';

-- Refresh tokens, stored only as SHA-256 hashes. A family is every token of one session.
CREATE TABLE refresh_tokens (
    token_hash     TEXT PRIMARY KEY,
    session_id     TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    -- The token this one was rotated from; the grace window looks one step back only.
    parent_hash    TEXT,
    issued_at      BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    -- Set when the token stops being current: rotated, superseded by reauth, or revoked.
    retired_at     BIGINT,
    retired_reason TEXT CHECK (retired_reason IN ('rotated', 'reauth', 'revoked'))
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);
CREATE INDEX refresh_tokens_parent ON refresh_tokens (parent_hash);

-- Individually revoked access tokens (RFC 7009 on an access token). Kept until exp.
CREATE TABLE revoked_jti (
    jti        TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    subject    TEXT NOT NULL,
    exp        BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX revoked_jti_exp ON revoked_jti (exp);

-- Per-user generation: "log out everywhere" bumps it, so every older token dies at once.
CREATE TABLE users (
    subject     TEXT PRIMARY KEY,
    generation  BIGINT NOT NULL,
    -- Latest exp an access token of an older generation can carry.
    valid_until BIGINT NOT NULL
);
