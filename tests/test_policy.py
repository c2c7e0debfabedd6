"""The decision policy: thresholds, risk bands and confidence."""

import math

import numpy as np
import pytest

from server.policy import Policy


@pytest.mark.parametrize(("p", "decision", "risk"), [
    (0.0, "APPROVE", "VERY_LOW"), (0.0999, "APPROVE", "VERY_LOW"), (0.10, "APPROVE", "LOW"),
    (0.1999, "APPROVE", "LOW"), (0.20, "REVIEW", "MEDIUM"), (0.3499, "REVIEW", "MEDIUM"),
    (0.35, "REVIEW", "HIGH"), (0.4999, "REVIEW", "HIGH"), (0.50, "REJECT", "VERY_HIGH"), (1.0, "REJECT", "VERY_HIGH"),
])
def test_seed_thresholds(p: float, decision: str, risk: str) -> None:
    d, r, _ = Policy().decide(p)
    assert (d, r) == (decision, risk)


def test_confidence_is_zero_on_thresholds_and_one_at_band_edges() -> None:
    pol = Policy()
    assert pol.decide(0.0)[2] == 1.0
    assert pol.decide(0.20)[2] == 0.0
    assert pol.decide(0.35)[2] == pytest.approx(1.0)
    assert pol.decide(0.50)[2] == 0.0
    assert pol.decide(1.0)[2] == 1.0
    assert pol.decide(0.1)[2] == pytest.approx(0.5)
    for p in np.linspace(0, 1, 1001):
        c = pol.decide(float(p))[2]
        assert 0.0 <= c <= 1.0 and not math.isnan(c)


def test_policy_from_metadata_and_validation() -> None:
    meta = {"approve_below": 0.3, "review_below": 0.6,
            "risk_levels": [["VERY_LOW", 0.1], ["LOW", 0.3], ["MEDIUM", 0.4], ["HIGH", 0.6], ["VERY_HIGH", 1.0]]}
    pol = Policy.from_metadata(meta)
    assert pol.decide(0.25)[:2] == ("APPROVE", "LOW")
    assert pol.decide(0.55)[:2] == ("REVIEW", "HIGH")
    assert Policy.from_metadata(None) == Policy()
    with pytest.raises(ValueError, match="approve_below < review_below"):
        Policy(0.5, 0.2)
