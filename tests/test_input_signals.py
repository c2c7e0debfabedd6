"""Input contract signals: missing and out-of-range counts per field (server metrics) and rates per field
in the drift report."""

from __future__ import annotations

import numpy as np
from prometheus_client import REGISTRY

from server import input_signals, metrics
from server.convert import applicant_to_row, rows_to_matrix
from server.schema import COLUMN_NAMES
from server.scoring import Scorer
from telemetry.drift import DriftDetector
from tests.test_api import applicant


def value(name: str, field: str | None = None) -> float:
    return REGISTRY.get_sample_value(name, {"field": field} if field else {}) or 0.0


def test_counts_missing_refused_and_out_of_training_range(model) -> None:  # type: ignore[no-untyped-def]
    scorer = Scorer(model)
    lo, hi = input_signals.reference_bounds(model.metadata, model.version)
    j = COLUMN_NAMES.index("AMT_INCOME_TOTAL")
    assert np.isfinite(lo[j]) and np.isfinite(hi[j]) and lo[j] < hi[j]
    rows = [applicant_to_row(applicant())[0] for _ in range(5)]
    rows[0][COLUMN_NAMES.index("EXT_SOURCE_2")] = float("nan")
    rows[1][COLUMN_NAMES.index("EXT_SOURCE_2")] = float("nan")
    rows[2][j] = float(hi[j]) * 10  # valid for the schema, never seen in training
    m = rows_to_matrix(rows)
    missing_before = {f: value("credscope_input_missing_total", f) for f in COLUMN_NAMES}
    before = (value("credscope_inputs_total"), value("credscope_input_out_of_range_total", "AMT_INCOME_TOTAL"),
              value("credscope_input_out_of_range_total", "AMT_CREDIT"), value("credscope_input_missing_total",
                                                                                "DAYS_BIRTH"))
    input_signals.observe(scorer, m)
    # refused applicants: a value outside the schema's range, a required field left out
    _, bad = applicant_to_row(applicant(amt_credit=-5.0), "applicants[3]")
    input_signals.refused(bad)
    _, missing = applicant_to_row(applicant(days_birth=0))
    input_signals.refused(missing)
    metrics.flush()
    assert value("credscope_inputs_total") - before[0] == 7
    assert value("credscope_input_out_of_range_total", "AMT_INCOME_TOTAL") - before[1] == 1
    assert value("credscope_input_out_of_range_total", "AMT_CREDIT") - before[2] == 1
    assert value("credscope_input_missing_total", "DAYS_BIRTH") - before[3] == 1
    # every field the applicants leave unset counts once per applicant
    expected = np.isnan(m).sum(axis=0)
    for f, n in zip(COLUMN_NAMES, expected, strict=True):
        extra = 1 if f == "DAYS_BIRTH" else 0
        assert value("credscope_input_missing_total", f) - missing_before[f] == n + extra, f
    assert expected[COLUMN_NAMES.index("EXT_SOURCE_2")] == 2


def test_drift_report_has_the_input_contract(model) -> None:  # type: ignore[no-untyped-def]
    detector = DriftDetector(model)
    rows = [applicant_to_row(applicant())[0] for _ in range(40)]
    j_ext, j_inc = COLUMN_NAMES.index("EXT_SOURCE_3"), COLUMN_NAMES.index("AMT_INCOME_TOTAL")
    hi = model.metadata["reference"]["features"]["AMT_INCOME_TOTAL"]["max"]
    for r in rows[:10]:
        r[j_ext] = float("nan")
    for r in rows[:4]:
        r[j_inc] = hi * 3
    report = detector.compare(rows_to_matrix(rows))
    contract = {c.field: c for c in report.inputs}
    assert list(contract) == list(COLUMN_NAMES)
    assert contract["EXT_SOURCE_3"].missing_rate == 0.25
    assert contract["EXT_SOURCE_3"].reference_missing_rate == \
        model.metadata["reference"]["features"]["EXT_SOURCE_3"]["missing_rate"]
    assert contract["AMT_INCOME_TOTAL"].out_of_range_rate == 0.1
    assert contract["AMT_CREDIT"].out_of_range_rate == 0.0
    assert report.to_json()["inputs"][j_inc]["field"] == "AMT_INCOME_TOTAL"
    assert "Input contract" in report.table()
