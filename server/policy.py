"""The decision policy: probability -> decision, risk level and confidence.

Seed policy (the thresholds come from the model's metadata, so a model ships with its policy):
APPROVE if p < 0.20, REVIEW if p < 0.50, else REJECT; risk level VERY_LOW < 0.10 <= LOW < 0.20 <=
MEDIUM < 0.35 <= HIGH < 0.50 <= VERY_HIGH.

Confidence is the distance of p from the nearest decision threshold, relative to the width of the
decision's band: in the APPROVE band [0, a) it is (a - p) / a; in the REVIEW band [a, r) it is
min(p - a, r - p) / ((r - a) / 2); in the REJECT band [r, 1] it is (p - r) / (1 - r). So it is 0 on a
threshold and 1 at the far edge (or the middle, for REVIEW) of the band.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np

DECISIONS = ("APPROVE", "REVIEW", "REJECT")
RISK_LEVELS = ("VERY_LOW", "LOW", "MEDIUM", "HIGH", "VERY_HIGH")


@dataclass(frozen=True)
class Policy:
    """Thresholds of the decision and the risk bands."""

    approve_below: float = 0.20
    review_below: float = 0.50
    risk_upper_bounds: tuple[float, ...] = (0.10, 0.20, 0.35, 0.50)
    """Upper bounds (exclusive) of VERY_LOW, LOW, MEDIUM and HIGH; VERY_HIGH is the rest."""

    def __post_init__(self) -> None:
        if not 0 < self.approve_below < self.review_below < 1:
            raise ValueError(f"policy needs 0 < approve_below < review_below < 1, got "
                             f"{self.approve_below}, {self.review_below}")
        if len(self.risk_upper_bounds) != len(RISK_LEVELS) - 1 or list(self.risk_upper_bounds) != sorted(
                self.risk_upper_bounds):
            raise ValueError("risk_upper_bounds must be 4 increasing bounds")

    @classmethod
    def from_metadata(cls, policy: dict[str, Any] | None) -> Policy:
        """Build from the ``policy`` entry of a model's metadata (seed defaults when absent)."""
        if not policy:
            return cls()
        levels = policy.get("risk_levels")
        bounds = tuple(float(b) for _, b in levels[:-1]) if levels else cls.risk_upper_bounds
        return cls(float(policy.get("approve_below", 0.20)), float(policy.get("review_below", 0.50)), bounds)

    def decide(self, p: float) -> tuple[str, str, float]:
        """Return (decision, risk level, confidence) for a default probability ``p``."""
        a, r = self.approve_below, self.review_below
        if p < a:
            decision, conf = "APPROVE", (a - p) / a
        elif p < r:
            decision, conf = "REVIEW", min(p - a, r - p) / ((r - a) / 2)
        else:
            decision, conf = "REJECT", (p - r) / (1 - r)
        risk = RISK_LEVELS[bisect.bisect_right(self.risk_upper_bounds, p)]
        return decision, risk, float(min(1.0, max(0.0, conf)))

    def decide_array(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`decide` for a whole array at once (the same float64 arithmetic, so the same results):
        indices into :data:`DECISIONS` and :data:`RISK_LEVELS`, and the confidences."""
        p = np.asarray(probs, dtype=np.float64)
        a, r = self.approve_below, self.review_below
        approve, review = p < a, (p >= a) & (p < r)
        decision = np.where(approve, 0, np.where(review, 1, 2))
        with np.errstate(invalid="ignore"):
            conf = np.where(approve, (a - p) / a,
                            np.where(review, np.minimum(p - a, r - p) / ((r - a) / 2), (p - r) / (1 - r)))
        conf = np.fmin(1.0, np.fmax(0.0, conf))  # fmax/fmin: NaN -> 0.0, as min(1, max(0, nan)) does
        risk = np.searchsorted(np.asarray(self.risk_upper_bounds), p, side="right")
        return decision, risk, conf

    def decide_many(self, probs: np.ndarray) -> list[tuple[str, str, float]]:
        return [self.decide(float(p)) for p in probs]
