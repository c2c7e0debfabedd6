-- Champion/challenger: the challenger model's shadow score of a sampled applicant, beside the champion's
-- row in predictions (same request id). Inserted with INSERT OR IGNORE: replays never duplicate a row.
CREATE TABLE IF NOT EXISTS challenger_predictions (
    request_id    TEXT PRIMARY KEY,
    created_at    TEXT NOT NULL,
    model_version TEXT NOT NULL,
    probability   DOUBLE PRECISION NOT NULL,
    decision      TEXT NOT NULL CHECK (decision IN ('APPROVE', 'REVIEW', 'REJECT'))
);
CREATE INDEX IF NOT EXISTS challenger_predictions_created_at_idx ON challenger_predictions (created_at);
