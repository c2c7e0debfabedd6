"""Champion/challenger: a challenger version scores a deterministic share of applicants in shadow; the
champion's answer is returned; GetStats compares the two on the same applicants (agreement, approval-rate
difference, AUCs once outcomes arrive). Real server processes, a real two-version model store, the
embedded SQLite audit trail and (when reachable) PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from sklearn.metrics import roc_auc_score

from client import CredScopeClient
from credscope.v1 import admin_pb2
from server.challenger import sampled
from server.convert import applicant_to_row, rows_to_matrix
from server.model import load_model
from server.policy import Policy
from tests.helpers import make_api_key, start_server
from tests.test_api import applicant
from tests.test_model_swap import two_version_store  # noqa: F401 - the fixture
from tools.roi import main as roi_main

BATCH = 40


def env(challenger: str, share: float, audit_url: str | None = None) -> dict[str, str]:
    out = {"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true", "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "10000000",
           "CREDSCOPE_MODEL__CHALLENGER_VERSION": challenger, "CREDSCOPE_MODEL__CHALLENGER_SHARE": str(share),
           "CREDSCOPE_CACHE__ENABLED": "false", "CREDSCOPE_SERVER__DRAIN_SECONDS": "0"}
    if audit_url:
        out["CREDSCOPE_AUDIT__URL"] = audit_url
    return out


def applicants(n: int) -> list[Any]:
    """Applicants spread over the risk range (so the two models disagree on some)."""
    return [applicant(ext_source_2=0.02 + 0.95 * i / n, ext_source_3=0.9 - 0.8 * ((i * 7) % n) / n,
                      days_employed=-100 - 97 * i) for i in range(n)]


def challenger_rows(audit_url: str | None, cwd: Path, want: int) -> dict[str, tuple[str, float, str]]:
    """request id → (model version, probability, decision) of the challenger rows, once ``want`` are in
    (bounded wait: the challenger writes off the request path)."""
    deadline = time.monotonic() + 15
    while True:
        rows = _fetch(audit_url, cwd, "SELECT request_id, model_version, probability, decision "
                                      "FROM challenger_predictions")
        if len(rows) >= want or time.monotonic() > deadline:
            return {r[0]: (r[1], float(r[2]), r[3]) for r in rows}
        time.sleep(0.1)


def _fetch(audit_url: str | None, cwd: Path, sql: str) -> list[tuple[Any, ...]]:
    if audit_url is None:
        with sqlite3.connect(cwd / "credscope.db") as conn:
            try:
                return conn.execute(sql).fetchall()
            except sqlite3.OperationalError:  # not migrated yet
                return []
    import asyncpg

    async def fetch() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(audit_url)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def _run(store: Path, first: str, second: str, tmp_path: Path, audit_url: str | None) -> None:
    people = applicants(BATCH)
    matrix = rows_to_matrix([applicant_to_row(a)[0] for a in people])
    challenger_model = load_model(store, second)
    expected = challenger_model.predict_proba(matrix)
    policy = Policy.from_metadata(challenger_model.metadata.get("policy"))
    sp = start_server(store, cwd=tmp_path, env=env(second, 1.0, audit_url))
    try:
        with CredScopeClient(sp.target, timeout=20) as c:
            batch = c.batch_score(people, request_id="cc-batch")
            singles = [c.score(people[i], request_id=f"cc-single-{i}") for i in range(5)]
            assert batch.model_version == first
            assert all(s.model_version == first for s in singles)
            assert all(r.prediction.model_version == first for r in batch.results)
            ids = [f"cc-batch/{i}" for i in range(BATCH)] + [f"cc-single-{i}" for i in range(5)]
            rows = challenger_rows(audit_url, tmp_path, len(ids))
            assert set(rows) == set(ids)
            for i in range(BATCH):
                version, p, decision = rows[f"cc-batch/{i}"]
                assert version == second
                assert p == pytest.approx(float(expected[i]), abs=1e-9)
                assert decision == policy.decide(p)[0]
                # the champion's answer is unchanged (not the challenger's)
                assert batch.results[i].prediction.default_probability != pytest.approx(p, abs=1e-12)
            for i in range(5):
                assert rows[f"cc-single-{i}"][1] == pytest.approx(float(expected[i]), abs=1e-9)

            with CredScopeClient(sp.target, api_key=make_api_key(tmp_path), timeout=20) as admin:
                stats = admin.admin_call("GetStats", admin_pb2.GetStatsRequest())
                pairs = _fetch(audit_url, tmp_path, "SELECT p.request_id, p.probability, p.decision, c.probability, "
                                                    "c.decision FROM predictions p JOIN challenger_predictions c "
                                                    "ON c.request_id = p.request_id")
                assert len(pairs) == len(ids)
                n = len(pairs)
                agreement = sum(r[2] == r[4] for r in pairs) / n
                diff = (sum(r[4] == "APPROVE" for r in pairs) - sum(r[2] == "APPROVE" for r in pairs)) / n
                ch = stats.challenger
                assert (ch.challenger_version, ch.compared) == (second, n)
                assert ch.agreement_rate == pytest.approx(agreement)
                assert ch.approval_rate_difference == pytest.approx(diff)
                assert not ch.HasField("champion_auc") and not ch.HasField("challenger_auc")

                # outcomes: the riskier half (by external score) defaults, with a few exceptions
                outcome = {r[0]: (i % 2 == 0) if i % 5 == 0 else r[1] > sorted(x[1] for x in pairs)[n // 2]
                           for i, r in enumerate(pairs)}
                for rid, defaulted in outcome.items():
                    c.report_outcome(rid, defaulted)
                stats = admin.admin_call("GetStats", admin_pb2.GetStatsRequest())
                ch = stats.challenger
                y = [outcome[r[0]] for r in pairs]
                assert ch.champion_auc == pytest.approx(roc_auc_score(y, [r[1] for r in pairs]))
                assert ch.challenger_auc == pytest.approx(roc_auc_score(y, [r[3] for r in pairs]))
    finally:
        sp.stop()
    # credscope-roi --audit: champion vs challenger on the same applicants
    url = audit_url or f"sqlite:///{tmp_path / 'credscope.db'}"
    out = tmp_path / "roi"
    assert roi_main(["--audit", "--audit-url", url, "--model-dir", str(store), "--out-dir", str(out),
                     "--quiet"]) == 0
    section = json.loads((out / "roi.json").read_text())["challenger"]
    assert (section["challenger_version"], section["compared"], section["with_outcomes"]) == (second, n, n)
    assert section["agreement_rate"] == pytest.approx(agreement)
    assert section["challenger_auc"] == pytest.approx(ch.challenger_auc)
    assert "champion vs challenger" in (out / "roi.txt").read_text()


def test_challenger_shadows_every_applicant_sqlite(two_version_store, tmp_path: Path) -> None:  # noqa: F811
    store, first, second = two_version_store
    _run(store, first, second, tmp_path, None)


def test_challenger_shadows_every_applicant_postgres(two_version_store, tmp_path: Path,  # noqa: F811
                                                     postgres_dsn: str) -> None:
    store, first, second = two_version_store
    _run(store, first, second, tmp_path, postgres_dsn)


def test_challenger_samples_a_deterministic_share(two_version_store, tmp_path: Path) -> None:  # noqa: F811
    store, first, second = two_version_store
    people = applicants(12)
    ids = [f"share-{i}" for i in range(60)]
    want = {rid for rid in ids if sampled(rid, 0.5)}
    assert 10 < len(want) < 50  # the hash spreads
    sp = start_server(store, cwd=tmp_path, env=env(second, 0.5))
    try:
        with CredScopeClient(sp.target, timeout=20) as c:
            for i, rid in enumerate(ids):
                assert c.score(people[i % len(people)], request_id=rid).model_version == first
            batch = c.batch_score(people, request_id="share-batch")
            assert batch.model_version == first
    finally:
        assert sp.stop() == 0  # a clean stop records the queued shadow scores first
    want |= {f"share-batch/{i}" for i in range(len(people)) if sampled(f"share-batch/{i}", 0.5)}
    rows = challenger_rows(None, tmp_path, 0)
    assert set(rows) == want
    assert {v for v, _, _ in rows.values()} == {second}
