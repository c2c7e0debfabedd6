-- API keys (security): only the SHA-256 of a key is kept; key_id is its public part.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id     TEXT PRIMARY KEY,
    key_hash   TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    tier       TEXT NOT NULL CHECK (tier IN ('free', 'pro', 'enterprise')),
    admin      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);

-- Calls and rate-limit refusals per key and hour (hour_start: Unix seconds, a multiple of 3600), added to
-- in batches by every server worker. key_id 'anonymous' counts dev-mode calls without a key.
CREATE TABLE IF NOT EXISTS api_key_usage (
    key_id       TEXT NOT NULL,
    tier         TEXT NOT NULL,
    hour_start   BIGINT NOT NULL,
    calls        BIGINT NOT NULL DEFAULT 0,
    rate_limited BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, hour_start)
);

CREATE INDEX IF NOT EXISTS api_key_usage_hour ON api_key_usage (hour_start);
