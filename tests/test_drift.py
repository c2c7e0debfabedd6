"""Drift: PSI and KS per model feature against the model's reference profile, read from the audit trail."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from telemetry.auditdb import AuditDB
from telemetry.drift import DriftDetector, psi, severity
from tests.telemetry_data import DERIVED, ROOT, SHIFTED, audited, population, postgres_audit, sqlite_audit


@pytest.fixture(scope="module")
def detector(model) -> DriftDetector:  # type: ignore[no-untyped-def]
    return DriftDetector(model)


def test_psi_and_thresholds() -> None:
    same = np.array([0.25, 0.25, 0.25, 0.25])
    assert psi(same, same) == 0.0
    # Hand computation: sum((c - r) * ln(c / r)).
    ref, cur = np.array([0.5, 0.5]), np.array([0.7, 0.3])
    assert psi(ref, cur) == pytest.approx(0.2 * np.log(0.7 / 0.5) + (-0.2) * np.log(0.3 / 0.5))
    # An empty bin is floored, not infinite.
    assert np.isfinite(psi(np.array([0.5, 0.5, 0.0]), np.array([0.4, 0.4, 0.2])))
    assert [severity(v) for v in (0.0, 0.099, 0.1, 0.199, 0.2, 3.0, None)] == \
        ["none", "none", "moderate", "moderate", "significant", "significant", "unknown"]


def test_same_population_has_no_drift(detector: DriftDetector) -> None:
    x, _ = population(3000, seed=101)
    report = detector.compare(x)
    assert report.rows == 3000
    assert len(report.features) == len(detector.model.features)
    assert report.by_severity("significant") == []
    assert report.by_severity("moderate") == []
    # KS runs on numeric features only, with a p-value in [0, 1].
    numeric = [f for f in report.features if f.kind == "numeric"]
    assert numeric and all(f.ks_statistic is not None and 0.0 <= f.ks_pvalue <= 1.0 for f in numeric)
    assert all(f.ks_statistic is None for f in report.features if f.kind != "numeric")


def test_shifted_population_drifts_only_on_shifted_features(detector: DriftDetector) -> None:
    x, _ = population(3000, seed=102, shift=True)
    report = detector.compare(x)
    significant = set(report.by_severity("significant"))
    drifted = significant | set(report.by_severity("moderate"))
    assert SHIFTED <= significant
    assert drifted <= SHIFTED | DERIVED, f"drift outside the shifted features: {drifted - SHIFTED - DERIVED}"
    by_name = {f.feature: f for f in report.features}
    for name in SHIFTED:
        assert by_name[name].ks_statistic > 0.2 and by_name[name].ks_pvalue < 1e-6
    # Sorted most drifted first; the table and JSON say the same.
    assert report.features[0].feature in SHIFTED
    table = report.table()
    assert "significant drift: " in table and "AMT_INCOME_TOTAL" in table.splitlines()[3]
    doc = report.to_json()
    assert set(doc["summary"]["significant"]) == significant
    assert json.loads(json.dumps(doc))["thresholds"] == {"moderate": 0.1, "significant": 0.2}


def test_drift_reads_the_sqlite_audit_trail_and_writes_reports(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    old, _ = population(400, seed=103)  # older than the window: must be left out
    recent, _ = population(1500, seed=104, shift=True)
    data = audited(model, old, None, now - timedelta(days=3), timedelta(seconds=1))
    new = audited(model, recent, None, now - timedelta(hours=2), timedelta(seconds=1))
    data.predictions += new.predictions
    url = sqlite_audit(tmp_path / "audit.db", data)

    got = AuditDB(url).recent_inputs(now - timedelta(hours=24), 10_000)
    assert got.shape == recent.shape
    # Newest first; NaN (missing) survives the JSON round trip.
    np.testing.assert_array_equal(np.isnan(got), np.isnan(recent[::-1]))
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(recent[::-1]))

    out = tmp_path / "reports"
    proc = subprocess.run([sys.executable, "-m", "telemetry.main", "drift", "--audit-url", url, "--model-dir",
                           str(model.path.parent), "--out", str(out), "--rows", "1000", "--fail-on", "significant"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 3, proc.stderr  # significant drift -> status 3 with --fail-on
    assert "AMT_INCOME_TOTAL" in proc.stdout and "significant drift:" in proc.stdout
    doc = json.loads((out / "drift.json").read_text())
    assert doc["rows"] == 1000 and doc["model_version"] == model.version
    assert SHIFTED <= set(doc["summary"]["significant"])
    png = (out / "drift.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_drift_command_reports_too_few_rows(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = sqlite_audit(tmp_path / "audit.db", audited(model, population(20, seed=105)[0], None,
                                                         datetime.now(UTC), timedelta(seconds=1)))
    proc = subprocess.run([sys.executable, "-m", "telemetry.main", "drift", "--audit-url", url, "--model-dir",
                           str(model.path.parent), "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2
    assert "20 audited inputs" in proc.stderr and "need 200" in proc.stderr


@pytest.mark.postgres
def test_drift_reads_the_postgres_audit_trail(model, postgres_dsn: str) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    x, _ = population(600, seed=106, shift=True)
    asyncio.run(postgres_audit(postgres_dsn, audited(model, x, None, now - timedelta(hours=1), timedelta(seconds=1))))
    got = AuditDB(postgres_dsn).recent_inputs(now - timedelta(hours=24), 500)
    assert got.shape == (500, x.shape[1])
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(x[::-1][:500]))
    report = DriftDetector(model).compare(got)
    assert SHIFTED <= set(report.by_severity("significant"))
