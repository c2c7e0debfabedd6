-- Audit trail: every scored applicant, its explanation, every call, model performance and outcomes.
-- Writers insert with ON CONFLICT (request_id) DO NOTHING, so replayed batches never duplicate a row.

-- One row per scored applicant (BatchScore: request id '<batch id>/<index>').
CREATE TABLE IF NOT EXISTS predictions (
    request_id    TEXT PRIMARY KEY,
    created_at    TIMESTAMPTZ NOT NULL,
    key_id        TEXT,
    client_name   TEXT,
    method        TEXT NOT NULL,
    input         JSONB NOT NULL,
    probability   DOUBLE PRECISION NOT NULL,
    decision      TEXT NOT NULL CHECK (decision IN ('APPROVE', 'REVIEW', 'REJECT')),
    risk_level    TEXT NOT NULL CHECK (risk_level IN ('VERY_LOW', 'LOW', 'MEDIUM', 'HIGH', 'VERY_HIGH')),
    confidence    DOUBLE PRECISION NOT NULL,
    model_version TEXT NOT NULL,
    latency_ms    DOUBLE PRECISION NOT NULL,
    from_cache    BOOLEAN NOT NULL DEFAULT false,
    reason_codes  TEXT
);
CREATE INDEX IF NOT EXISTS predictions_created_at_idx ON predictions (created_at);
CREATE INDEX IF NOT EXISTS predictions_decision_created_at_idx ON predictions (decision, created_at);
CREATE INDEX IF NOT EXISTS predictions_model_version_created_at_idx ON predictions (model_version, created_at);

-- The top-k SHAP contributions of an explained prediction, rank 1 = largest |shap_value|.
CREATE TABLE IF NOT EXISTS shap_explanations (
    request_id TEXT NOT NULL,
    rank       INTEGER NOT NULL,
    feature    TEXT NOT NULL,
    value      DOUBLE PRECISION,
    shap_value DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (request_id, rank)
);
CREATE INDEX IF NOT EXISTS shap_explanations_feature_idx ON shap_explanations (feature);

-- One row per call, success or error.
CREATE TABLE IF NOT EXISTS api_usage (
    request_id  TEXT PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL,
    key_id      TEXT,
    tier        TEXT,
    method      TEXT NOT NULL,
    status_code TEXT NOT NULL,
    duration_ms DOUBLE PRECISION NOT NULL,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS api_usage_created_at_idx ON api_usage (created_at);
CREATE INDEX IF NOT EXISTS api_usage_key_id_created_at_idx ON api_usage (key_id, created_at);
CREATE INDEX IF NOT EXISTS api_usage_status_code_created_at_idx ON api_usage (status_code, created_at);

-- Model quality over time (written by the telemetry sidecar from outcomes).
CREATE TABLE IF NOT EXISTS model_performance (
    id            BIGSERIAL PRIMARY KEY,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    model_version TEXT NOT NULL,
    metric        TEXT NOT NULL,
    value         DOUBLE PRECISION NOT NULL,
    window_start  TIMESTAMPTZ,
    window_end    TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS model_performance_version_metric_idx
    ON model_performance (model_version, metric, created_at);
CREATE INDEX IF NOT EXISTS model_performance_created_at_idx ON model_performance (created_at);

-- What happened to a scored applicant (ScoringService.ReportOutcome); one row per request id.
CREATE TABLE IF NOT EXISTS outcomes (
    request_id  TEXT PRIMARY KEY,
    defaulted   BOOLEAN NOT NULL,
    reported_at TIMESTAMPTZ NOT NULL,
    observed_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS outcomes_reported_at_idx ON outcomes (reported_at);
CREATE INDEX IF NOT EXISTS outcomes_observed_at_idx ON outcomes (observed_at);
