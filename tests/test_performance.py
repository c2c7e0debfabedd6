"""Model performance over time from reported outcomes, stored in model_performance."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from telemetry.auditdb import AuditDB
from telemetry.performance import compute
from telemetry.service import ModelCache
from tests.telemetry_data import ROOT, Audited, audited, population, postgres_audit, sqlite_audit


def _midnight() -> datetime:
    now = datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


@pytest.fixture(scope="module")
def two_days(model):  # type: ignore[no-untyped-def]
    """Day A (two days ago): 2,000 predictions, the first 1,000 with their true outcome. Day B (yesterday):
    2,000 predictions whose outcomes are shuffled, so the model ranks them no better than chance."""
    x, y = population(4000, seed=201)
    day_a, day_b = _midnight() - timedelta(days=2), _midnight() - timedelta(days=1)
    a = audited(model, x[:2000], y[:2000], day_a + timedelta(hours=1), timedelta(seconds=2), label_share=0.5)
    y_b = np.random.default_rng(5).permutation(y[2000:])
    b = audited(model, x[2000:], y_b, day_b + timedelta(hours=1), timedelta(seconds=2))
    data = Audited(a.predictions + b.predictions, a.outcomes + b.outcomes)
    return data, a, b, day_a, day_b


def _truth(part: Audited) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = {o[0]: o[1] for o in part.outcomes}
    rows = [p for p in part.predictions if p[0] in labels]
    y = np.array([labels[p[0]] for p in rows], dtype=int)
    prob = np.array([p[6] for p in rows])
    flagged = np.array([p[7] != "APPROVE" for p in rows], dtype=int)
    return y, prob, flagged


def test_performance_per_bucket_matches_sklearn(model, two_days, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data, a, b, day_a, day_b = two_days
    db = AuditDB(sqlite_audit(tmp_path / "audit.db", data))
    holdout = float(model.metadata["metrics"]["roc_auc"])
    models = ModelCache(model.path.parent, None)
    assert models.holdout_auc(model.version) == holdout
    report = compute(db, window=timedelta(days=7), bucket=timedelta(days=1), min_outcomes=50,
                     holdout_auc=models.holdout_auc)
    buckets = {b_.start: b_ for b_ in report.buckets}
    assert set(buckets) == {day_a, day_b}
    fa, fb = buckets[day_a].figures, buckets[day_b].figures

    y, prob, flagged = _truth(a)
    assert fa["predictions"] == 2000 and fa["outcomes"] == 1000
    assert fa["approval_rate"] == pytest.approx(np.mean([p[7] == "APPROVE" for p in a.predictions]))
    assert fa["auc"] == pytest.approx(roc_auc_score(y, prob), abs=1e-12)
    tp = int(((flagged == 1) & (y == 1)).sum())
    assert fa["precision"] == pytest.approx(tp / flagged.sum())
    assert fa["recall"] == pytest.approx(tp / y.sum())
    assert fa["accuracy"] == pytest.approx(float((flagged == y).mean()))
    assert fa["default_rate"] == pytest.approx(y.mean())
    assert fa["holdout_auc"] == holdout
    assert fa["auc_degradation"] == pytest.approx((holdout - fa["auc"]) / holdout)
    assert fa["auc"] > 0.65  # the model works on day A ...
    assert fb["auc"] < 0.6 and fb["auc_degradation"] > 0.1  # ... and has lost its ranking power on day B

    window = report.window[model.version]
    y_all = np.concatenate([_truth(a)[0], _truth(b)[0]])
    p_all = np.concatenate([_truth(a)[1], _truth(b)[1]])
    assert window["auc"] == pytest.approx(roc_auc_score(y_all, p_all), abs=1e-12)
    assert window["predictions"] == 4000 and window["outcomes"] == 3000
    assert "whole window" in report.table()


def test_performance_command_stores_model_performance(model, two_days, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data, *_ = two_days
    url = sqlite_audit(tmp_path / "audit.db", data)
    cmd = [sys.executable, "-m", "telemetry.main", "performance", "--audit-url", url, "--model-dir",
           str(model.path.parent), "--out", str(tmp_path / "reports"), "--days", "7"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "AUC" in proc.stdout and model.version in proc.stdout
    # Computing and storing again replaces the rows of the first run; it adds none.
    db = AuditDB(url)
    db.store_performance(compute(db, window=timedelta(days=7)).rows())
    conn = sqlite3.connect(tmp_path / "audit.db")
    rows = conn.execute("SELECT model_version, metric, value, window_start, window_end FROM model_performance").fetchall()
    conn.close()
    metrics = {(r[1], r[3]) for r in rows}
    assert len(rows) == len(metrics)  # no duplicates after two runs
    starts = {r[3] for r in rows}
    assert len(starts) == 2 and all(s.endswith("T00:00:00.000000Z") for s in starts)
    assert {m for m, _ in metrics} >= {"auc", "precision", "recall", "accuracy", "approval_rate",
                                       "auc_degradation", "holdout_auc", "predictions", "outcomes"}
    doc = json.loads((tmp_path / "reports" / "performance.json").read_text())
    assert len(doc["buckets"]) == 2 and model.version in doc["window"]
    assert (tmp_path / "reports" / "performance.png").read_bytes().startswith(b"\x89PNG")


def test_too_few_outcomes_give_no_quality_figures(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, y = population(100, seed=202)
    data = audited(model, x, y, datetime.now(UTC) - timedelta(hours=1), timedelta(seconds=1), label_share=0.3)
    report = compute(AuditDB(sqlite_audit(tmp_path / "a.db", data)), min_outcomes=50)
    figures = report.window[model.version]
    assert figures["predictions"] == 100 and figures["outcomes"] == 30
    assert "auc" not in figures and "precision" not in figures
    assert not any("auc" in r.metric for r in report.rows())


@pytest.mark.postgres
def test_performance_over_postgres(model, two_days, postgres_dsn: str) -> None:  # type: ignore[no-untyped-def]
    data, a, b, day_a, day_b = two_days
    asyncio.run(postgres_audit(postgres_dsn, data))
    db = AuditDB(postgres_dsn)
    report = compute(db, window=timedelta(days=7), bucket=timedelta(days=1),
                     holdout_auc=ModelCache(model.path.parent, None).holdout_auc)
    buckets = {b_.start: b_.figures for b_ in report.buckets}
    assert set(buckets) == {day_a, day_b}
    y, prob, _ = _truth(a)
    assert buckets[day_a]["auc"] == pytest.approx(roc_auc_score(y, prob), abs=1e-12)
    assert buckets[day_a]["predictions"] == 2000
    for _ in range(2):
        db.store_performance(report.rows())

    async def stored() -> list:
        import asyncpg

        conn = await asyncpg.connect(postgres_dsn)
        try:
            return await conn.fetch("SELECT metric, window_start FROM model_performance")
        finally:
            await conn.close()

    rows = asyncio.run(stored())
    assert len(rows) == len(report.rows())
    assert {r["window_start"] for r in rows} == {day_a, day_b}
