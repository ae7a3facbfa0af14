-- The change feed (PostgreSQL dialect): every durable change that verification depends on
-- (revoked jti, revoked session, user generation, reauth epoch, step-up), numbered in
-- commit order without gaps. Nodes sharing one PostgreSQL apply it in order to their
-- in-memory view; SQLite is single-node, but keeps the same log so the code is one.

CREATE TABLE changes (
    -- MAX(seq) + 1 under the writers' lock: a gap can only mean pruned history.
    seq        BIGINT PRIMARY KEY,
    -- JSON of the change (see src/revocation.rs, `Change`).
    change     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
-- Retention pruning walks by age.
CREATE INDEX changes_created ON changes (created_at);
