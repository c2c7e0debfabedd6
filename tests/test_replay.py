"""AdminService.ReplayDecision over a real channel: decisions of the active and of a former model version
are recomputed from the audit trail bit for bit; unknown ids, removed versions and altered records are
reported as such."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import grpc
import pytest

from client import CredScopeClient, CredScopeRpcError
from credscope.v1 import admin_pb2, scoring_pb2
from tests.helpers import make_api_key, start_server, two_version_store
from tests.test_api import applicant

LOW_EXT = {"ext_source_1": 0.02, "ext_source_2": 0.03, "ext_source_3": 0.02}


@pytest.fixture(scope="module")
def store(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    return two_version_store(model_dir, tmp_path_factory.mktemp("replay-store"), seed=23, rows=6_000,
                             n_estimators=25)


def replay(admin: CredScopeClient, rid: str) -> admin_pb2.ReplayDecisionResponse:
    return admin.admin_call("ReplayDecision", admin_pb2.ReplayDecisionRequest(request_id=rid))


def test_replay_decisions(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_dir, first, second = store
    sp = start_server(model_dir, cwd=tmp_path, env={"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true",
                                                    "CREDSCOPE_MODEL__WATCH_SECONDS": "0"})
    try:
        with CredScopeClient(sp.target, timeout=10) as c, \
                CredScopeClient(sp.target, api_key=make_api_key(tmp_path), timeout=30) as admin:
            rejected = c.score(applicant(**LOW_EXT))
            assert rejected.reasons and rejected.model_version == first
            approved = c.score(applicant(ext_source_2=0.8, ext_source_3=0.8))
            batch = c.call(c.scoring.BatchScore, scoring_pb2.BatchScoreRequest(applicants=[
                applicant(amt_income_total=90_000 + 1_000 * i, ext_source_2=0.05 + 0.1 * i) for i in range(8)]))
            # replayed at once: the records may still be queued; the server flushes first
            r = replay(admin, rejected.request_id)
            assert r.identical and r.model_version == first
            assert r.recorded_probability == r.replayed_probability == rejected.default_probability
            assert r.recorded_decision == r.replayed_decision == rejected.decision
            assert list(r.recorded_reason_codes) == list(r.replayed_reason_codes) == [x.code for x in rejected.reasons]
            a = replay(admin, approved.request_id)
            assert a.identical and not a.replayed_reason_codes
            for result in batch.results:
                p = result.prediction
                b = replay(admin, p.request_id)
                assert b.identical, b
                assert list(b.replayed_reason_codes) == [x.code for x in p.reasons]

            # (a first switch to a model of another shape compiles its TreeSHAP kernel: ~15 s on a cold machine)
            admin.admin_call("ActivateModel", admin_pb2.ActivateModelRequest(version=second), timeout=120)
            newer = c.score(applicant(**LOW_EXT))
            assert newer.model_version == second
            assert replay(admin, newer.request_id).identical
            # the former version is loaded from the store for its decisions
            old = replay(admin, rejected.request_id)
            assert old.identical and old.model_version == first

            with pytest.raises(CredScopeRpcError) as e:
                replay(admin, "never-scored")
            assert e.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(CredScopeRpcError) as e:
                replay(admin, "")
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(CredScopeRpcError) as e:  # admin only
                c.admin_call("ReplayDecision", admin_pb2.ReplayDecisionRequest(request_id=rejected.request_id))
            assert e.value.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)

            # an altered record no longer replays identically
            conn = sqlite3.connect(tmp_path / "credscope.db", timeout=30)
            with conn:
                conn.execute("UPDATE predictions SET probability = probability + 1e-12 WHERE request_id = ?",
                             (approved.request_id,))
            conn.close()
            altered = replay(admin, approved.request_id)
            assert not altered.identical
            assert altered.replayed_probability == approved.default_probability != altered.recorded_probability

        # a version no longer in the store cannot replay its decisions (a fresh server: nothing cached)
        sp.stop()
        shutil.move(model_dir / first, tmp_path / first)
        sp = start_server(model_dir, cwd=tmp_path, env={"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true"})
        with CredScopeClient(sp.target, api_key=make_api_key(tmp_path, name="admin-2"), timeout=30) as admin:
            with pytest.raises(CredScopeRpcError) as e:
                replay(admin, rejected.request_id)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert replay(admin, newer.request_id).identical
    finally:
        sp.stop()
        if (tmp_path / first).exists():
            shutil.move(tmp_path / first, model_dir / first)
