"""Scoring: the model artifact plus the decision policy. Imports nothing from grpc, so the servicer, the
CLI and batch jobs share it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.model import ModelArtifact
from server.policy import DECISIONS, RISK_LEVELS, Policy

#: From this many rows on, the policy decides with numpy (per row, plain Python is faster).
_VECTOR_ROWS = 16


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """The scored result of one applicant."""

    probability: float
    decision: str
    risk_level: str
    confidence: float
    model_version: str


class Scorer:
    """Scores encoded applicant rows with one model version and its policy."""

    def __init__(self, model: ModelArtifact) -> None:
        self.model = model
        self.version = model.version
        self.policy = Policy.from_metadata(model.metadata.get("policy"))

    def score(self, rows: np.ndarray) -> list[ScoreResult]:
        """Score a float32 matrix [N, len(COLUMNS)] (NaN = missing)."""
        if len(rows) == 0:
            return []
        probs = self.model.predict_proba(rows)
        version = self.version
        if len(probs) >= _VECTOR_ROWS:
            decision, risk, conf = self.policy.decide_array(probs)
            return [ScoreResult(p, DECISIONS[d], RISK_LEVELS[k], c, version)
                    for p, d, k, c in zip(probs.tolist(), decision.tolist(), risk.tolist(), conf.tolist(),
                                          strict=True)]
        out = []
        for p in probs:
            p = float(p)
            decision, risk, conf = self.policy.decide(p)
            out.append(ScoreResult(p, decision, risk, conf, version))
        return out
