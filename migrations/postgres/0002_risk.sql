-- What the risk engine needs to survive a restart (PostgreSQL dialect).

-- The enriched binding (IP, prefix, ASN, country, location, user-agent fingerprint) as JSON:
-- binding rules compare against it, and the user's known countries and ASNs are rebuilt from it.
ALTER TABLE sessions ADD COLUMN binding_info TEXT;
-- Session risk when last persisted, and when (milliseconds): it decays from there.
ALTER TABLE sessions ADD COLUMN risk DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN risk_at BIGINT NOT NULL DEFAULT 0;
