"""credscope-roi end to end: a labelled CSV scored through the model, and the audit trail (SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.db import dialect, migrations, sqlite_path
from server.portfolio import LoanParameters
from tests.helpers import ROOT
from tools.roi import main

R = LoanParameters().net_revenue
L = LoanParameters().loss_on_default
FIGURE_KEYS = {"total", "approved", "approval_rate", "confusion_matrix", "revenue", "losses", "opportunity_cost",
               "net_profit", "profit_per_loan", "default_rate_approved"}


def _report(out: Path, name: str = "roi") -> dict:  # type: ignore[type-arg]
    return json.loads((out / f"{name}.json").read_text())


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.fixture(scope="module")
def holdout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled CSV of 3,000 applications, from another seed than the model's training data."""
    from tools.datagen import generate

    path = tmp_path_factory.mktemp("roi") / "holdout.csv"
    generate(3_000, seed=123).to_csv(path, index=False)
    return path


def test_help() -> None:
    r = subprocess.run([sys.executable, "-m", "tools.roi", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: credscope-roi")
    assert "--baseline-model-version" in r.stdout and "--audit-url" in r.stdout


def test_csv_report_end_to_end(holdout: Path, model_dir: Path, model, tmp_path: Path,  # type: ignore[no-untyped-def]
                               capsys: pytest.CaptureFixture[str]) -> None:
    from tools.train import encode_frame, load_frame

    out = tmp_path / "reports"
    assert main(["--csv", str(holdout), "--model-dir", str(model_dir), "--out-dir", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "net profit" in table and "approve all" in table
    _assert_png(out / "roi.png")
    assert (out / "roi.txt").read_text() == table
    rep = _report(out)
    assert {"source", "loan_parameters", "unit_economics", "policy", "baseline", "comparison", "optimum",
            "profit_curve", "files"} <= set(rep)
    assert FIGURE_KEYS <= set(rep["policy"]) and FIGURE_KEYS <= set(rep["baseline"])
    assert FIGURE_KEYS <= set(rep["optimum"])
    assert set(rep["comparison"]) >= {"profit_improvement", "defaults_prevented", "extra_approvals"}
    assert rep["loan_parameters"] == LoanParameters().as_dict()
    assert rep["source"]["model_version"] == model.version and rep["source"]["applications"] == 3_000

    # The figures agree with the model's own probabilities and the labels.
    frame = load_frame(holdout)
    p = model.predict_proba(encode_frame(frame))
    y = frame["TARGET"].to_numpy().astype(bool)
    approved = p < 0.20
    pol = rep["policy"]
    assert pol["approved"] == int(approved.sum())
    assert pol["confusion_matrix"]["false_negative"] == int((approved & y).sum())
    assert pol["net_profit"] == pytest.approx((approved & ~y).sum() * R - (approved & y).sum() * L)
    base = rep["baseline"]
    assert base["kind"] == "approve_all" and base["approved"] == 3_000
    assert base["net_profit"] == pytest.approx((~y).sum() * R - y.sum() * L)
    assert rep["comparison"]["profit_improvement"] == pytest.approx(pol["net_profit"] - base["net_profit"])
    assert rep["comparison"]["defaults_prevented"] == int(y.sum() - (approved & y).sum())
    assert rep["comparison"]["extra_approvals"] == pol["approved"] - 3_000
    curve = rep["profit_curve"]
    assert len(curve["thresholds"]) == 201
    assert rep["optimum"]["net_profit"] == max(curve["net_profit"]) >= max(pol["net_profit"], base["net_profit"])
    assert rep["optimum"]["threshold"] == curve["thresholds"][int(np.argmax(curve["net_profit"]))]


def test_csv_report_baselines_and_loan_parameters(holdout: Path, model_dir: Path, model,  # type: ignore[no-untyped-def]
                                                  tmp_path: Path) -> None:
    from tools.train import train

    out = tmp_path / "reports"
    args = ["--csv", str(holdout), "--out-dir", str(out), "--quiet", "--interest-rate", "0.2", "--lgd", "0.5"]
    assert main([*args, "--model-dir", str(model_dir), "--baseline-threshold", "0.1", "--name", "t"]) == 0
    rep = _report(out, "t")
    assert rep["baseline"]["kind"] == "threshold" and rep["baseline"]["threshold"] == 0.1
    assert rep["baseline"]["approved"] < rep["policy"]["approved"]
    assert rep["loan_parameters"]["interest_rate"] == 0.2 and rep["loan_parameters"]["loss_given_default"] == 0.5
    assert rep["unit_economics"]["loss_defaulted"] == 0.5 * 500_000 + 500

    # Another model version of the store scores the same rows.
    store = tmp_path / "models"
    shutil.copytree(model_dir, store)
    other = train(model_dir=store, rows=3_000, seed=5, n_estimators=10, activate=False, quiet=True).version
    assert main([*args, "--model-dir", str(store), "--baseline-model-version", other, "--name", "m"]) == 0
    rep = _report(out, "m")
    assert rep["baseline"]["model_version"] == other and rep["source"]["model_version"] == model.version
    assert rep["baseline"]["total"] == rep["policy"]["total"] == 3_000 and not rep["comparison"]["scaled"]
    assert rep["comparison"]["profit_improvement"] == pytest.approx(
        rep["policy"]["net_profit"] - rep["baseline"]["net_profit"])
    _assert_png(out / "m.png")


def test_csv_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools.datagen import generate

    empty = tmp_path / "empty.csv"
    generate(10, seed=1).head(0).to_csv(empty, index=False)
    assert main(["--csv", str(empty), "--model-dir", str(model_dir), "--out-dir", str(tmp_path / "o")]) == 1
    assert "no labelled rows" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["--csv", str(empty), "--model-dir", str(tmp_path / "none"), "--interest-rate", "3"]) == 1
    assert "interest_rate must be a yearly rate from 0 to 1" in capsys.readouterr().err
    assert main(["--csv", str(tmp_path / "missing.csv"), "--model-dir", str(model_dir)]) == 1
    assert "cannot read" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The audit trail
# ---------------------------------------------------------------------------------------------------

# Until the audit migration (0002_audit) is on this branch, the tests create the two tables it defines
# with the same columns; once it is, they use server.db.migrate.
SQLITE_DDL = """
CREATE TABLE predictions (request_id TEXT PRIMARY KEY, created_at TEXT NOT NULL, key_id TEXT, client_name TEXT,
  method TEXT NOT NULL, input TEXT NOT NULL, probability REAL NOT NULL, decision TEXT NOT NULL,
  risk_level TEXT NOT NULL, confidence REAL NOT NULL, model_version TEXT NOT NULL, latency_ms REAL NOT NULL,
  from_cache BOOLEAN NOT NULL DEFAULT 0, reason_codes TEXT);
CREATE TABLE outcomes (request_id TEXT PRIMARY KEY, defaulted BOOLEAN NOT NULL, reported_at TEXT NOT NULL,
  observed_at TEXT NOT NULL);
"""
POSTGRES_DDL = """
CREATE TABLE predictions (request_id TEXT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL, key_id TEXT,
  client_name TEXT, method TEXT NOT NULL, input JSONB NOT NULL, probability DOUBLE PRECISION NOT NULL,
  decision TEXT NOT NULL, risk_level TEXT NOT NULL, confidence DOUBLE PRECISION NOT NULL,
  model_version TEXT NOT NULL, latency_ms DOUBLE PRECISION NOT NULL, from_cache BOOLEAN NOT NULL DEFAULT false,
  reason_codes TEXT);
CREATE TABLE outcomes (request_id TEXT PRIMARY KEY, defaulted BOOLEAN NOT NULL, reported_at TIMESTAMPTZ NOT NULL,
  observed_at TIMESTAMPTZ NOT NULL);
"""
CURRENT, OLD = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"
# (request id, probability, decision, model version, defaulted or None = no outcome reported)
TRAIL = [
    ("r1", 0.050, "APPROVE", CURRENT, False),
    ("r2", 0.101, "APPROVE", CURRENT, False),
    ("r3", 0.151, "APPROVE", CURRENT, True),
    ("r4", 0.300, "REVIEW", CURRENT, False),
    ("r5", 0.400, "REVIEW", CURRENT, True),
    ("r6", 0.700, "REJECT", CURRENT, True),
    ("r7", 0.120, "APPROVE", CURRENT, None),
    ("o1", 0.050, "APPROVE", OLD, False),
    ("o2", 0.150, "APPROVE", OLD, True),
    ("o3", 0.300, "REVIEW", OLD, False),
]


def _has_audit_migration(url: str) -> bool:
    return any(m.name == "audit" for m in migrations(dialect(url)))


def _make_sqlite_trail(url: str, rows: list) -> None:  # type: ignore[type-arg]
    if _has_audit_migration(url):
        from server.db import migrate

        asyncio.run(migrate(url))
    conn = sqlite3.connect(sqlite_path(url))
    try:
        if not _has_audit_migration(url):
            conn.executescript(SQLITE_DDL)
        for i, (rid, p, d, v, y) in enumerate(rows):
            conn.execute("INSERT INTO predictions (request_id, created_at, method, input, probability, decision, "
                         "risk_level, confidence, model_version, latency_ms) VALUES (?, ?, 'Score', '{}', ?, ?, "
                         "'LOW', 0.5, ?, 1.0)", (rid, f"2026-11-2{i % 10}T10:00:00.000000Z", p, d, v))
            if y is not None:
                conn.execute("INSERT INTO outcomes VALUES (?, ?, '2026-11-25T00:00:00Z', '2026-11-25T00:00:00Z')",
                             (rid, int(y)))
        conn.commit()
    finally:
        conn.close()


async def _make_postgres_trail(dsn: str, rows: list) -> None:  # type: ignore[type-arg]
    import asyncpg

    if _has_audit_migration(dsn):
        from server.db import migrate

        await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        if not _has_audit_migration(dsn):
            await conn.execute(POSTGRES_DDL)
        for rid, p, d, v, y in rows:
            await conn.execute("INSERT INTO predictions (request_id, created_at, method, input, probability, decision, "
                               "risk_level, confidence, model_version, latency_ms) VALUES ($1, now(), 'Score', "
                               "'{}'::jsonb, $2, $3, 'LOW', 0.5, $4, 1.0)", rid, p, d, v)
            if y is not None:
                await conn.execute("INSERT INTO outcomes VALUES ($1, $2, now(), now())", rid, y)
    finally:
        await conn.close()


def _check_audit_reports(url: str, tmp_path: Path) -> None:
    """The figures of TRAIL, computed by hand (seed loan parameters, R per repaid loan, L per default)."""
    out = tmp_path / "reports"
    base_args = ["--audit", "--audit-url", url, "--model-dir", str(tmp_path / "no-store"), "--out-dir", str(out),
                 "--quiet"]
    # Current version, approve-all baseline: 6 applications with outcomes (r7 has none).
    assert main([*base_args, "--model-version", CURRENT]) == 0
    rep = _report(out)
    pol, base, cmp = rep["policy"], rep["baseline"], rep["comparison"]
    assert rep["source"]["applications"] == 6 and rep["source"]["defaults"] == 3
    assert pol["approve_below"] == 0.2  # the seed policy: the version is not in this store
    assert pol["confusion_matrix"] == {"true_negative": 2, "false_negative": 1, "false_positive": 1,
                                       "true_positive": 2}
    assert pol["decision_matrix"] == {"APPROVE": {"repaid": 2, "defaulted": 1}, "REVIEW": {"repaid": 1, "defaulted": 1},
                                      "REJECT": {"repaid": 0, "defaulted": 1}}
    assert pol["net_profit"] == pytest.approx(2 * R - L)
    assert pol["opportunity_cost"] == pytest.approx(R)
    assert pol["profit_per_loan"] == pytest.approx((2 * R - L) / 3)
    assert pol["default_rate_approved"] == pytest.approx(1 / 3) and pol["approval_rate"] == pytest.approx(0.5)
    assert base["net_profit"] == pytest.approx(3 * R - 3 * L)
    assert cmp == {"profit_improvement": pytest.approx(2 * L - R), "defaults_prevented": 2, "extra_approvals": -3,
                   "scaled": False}
    # Sorted by p: good, good, bad, good, bad, bad; one default costs more than two good loans earn, so the
    # optimum approves the first two only, first reached at the grid threshold 0.105 (0.101 < t <= 0.151).
    assert rep["optimum"]["threshold"] == pytest.approx(0.105)
    assert rep["optimum"]["net_profit"] == pytest.approx(2 * R)
    _assert_png(out / "roi.png")

    # Baseline: the old version's own rows (3 applications, 2 approved: 1 repaid, 1 defaulted), scaled x2.
    assert main([*base_args, "--baseline-model-version", OLD, "--name", "vs-old"]) == 0
    rep = _report(out, "vs-old")
    assert rep["source"]["model_version"] == CURRENT and rep["source"]["applications"] == 6
    assert rep["baseline"]["model_version"] == OLD and rep["baseline"]["net_profit"] == pytest.approx(R - L)
    cmp = rep["comparison"]
    assert cmp["scaled"] is True
    assert cmp["profit_improvement"] == pytest.approx((2 * R - L) - 2 * (R - L))
    assert cmp["defaults_prevented"] == pytest.approx(1.0) and cmp["extra_approvals"] == pytest.approx(-1.0)


def test_audit_report_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    _make_sqlite_trail(url, TRAIL)
    _check_audit_reports(url, tmp_path)


@pytest.mark.postgres
def test_audit_report_postgres(postgres_dsn: str, tmp_path: Path) -> None:
    asyncio.run(_make_postgres_trail(postgres_dsn, TRAIL))
    _check_audit_reports(postgres_dsn, tmp_path)


def test_audit_without_outcomes_or_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    _make_sqlite_trail(url, [(rid, p, d, v, None) for rid, p, d, v, _ in TRAIL])
    assert main(["--audit", "--audit-url", url, "--out-dir", str(tmp_path / "o")]) == 1
    assert "no predictions with a reported outcome" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["--audit", "--audit-url", f"sqlite:///{tmp_path / 'nope.db'}"]) == 1
    assert "no audit database" in capsys.readouterr().err
    assert main(["--audit", "--audit-url", "postgresql://nobody:secret@127.0.0.1:1/x"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect" in err and "secret" not in err
