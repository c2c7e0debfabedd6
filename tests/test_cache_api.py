"""The prediction cache over a real gRPC channel: from_cache, BatchScore, ClearCache, Redis shared by servers."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from client import CredScopeClient
from client.applicants import applicant_from_mapping
from credscope.v1 import admin_pb2, applicant_pb2
from tests import helpers
from tests.helpers import make_api_key, start_server

BASE = {
    "name_contract_type": "Cash loans", "amt_income_total": 202500, "amt_credit": 406597.5, "amt_annuity": 24700.5,
    "amt_goods_price": 351000, "name_income_type": "Working", "days_birth": -12000, "days_employed": -2000,
    "ext_source_2": 0.6, "ext_source_3": 0.5, "cnt_fam_members": 2,
}


def unique_applicants(n: int) -> list[applicant_pb2.Applicant]:
    """Applicants no other test scores (so the shared server's cache state is this test's own)."""
    rng = np.random.default_rng(uuid.uuid4().int % 2**32)
    return [applicant_from_mapping({**BASE, "ext_source_1": float(x), "amt_credit": float(c)})
            for x, c in zip(rng.uniform(0.01, 0.99, n), rng.uniform(1e5, 1e6, n), strict=True)]


def test_second_score_comes_from_the_cache(client: CredScopeClient) -> None:
    [a] = unique_applicants(1)
    first = client.score(a)
    second = client.score(a)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.default_probability == first.default_probability
    assert (second.decision, second.risk_level, second.confidence, second.model_version) == \
        (first.decision, first.risk_level, first.confidence, first.model_version)
    assert second.request_id != first.request_id  # per call, not cached
    # The same applicant with its fields in another order on the wire is the same entry.
    reordered = applicant_pb2.Applicant.FromString(b"".join(
        applicant_pb2.Applicant(**{f.name: v}).SerializeToString() for f, v in reversed(a.ListFields())))
    assert client.score(reordered).from_cache is True


def test_batch_fills_and_uses_the_cache(client: CredScopeClient) -> None:
    apps = unique_applicants(30)
    singles = [client.score(a) for a in apps[:5]]
    bad = applicant_pb2.Applicant(amt_credit=-1.0)
    batch = client.batch_score([*apps, bad])
    hits = [r.prediction.from_cache for r in batch.results[:30]]
    assert hits == [True] * 5 + [False] * 25
    assert batch.results[30].HasField("error")
    for s, r in zip(singles, batch.results, strict=False):
        assert r.prediction.default_probability == s.default_probability
    again = client.batch_score(apps)
    assert all(r.prediction.from_cache for r in again.results)
    assert [r.prediction.default_probability for r in again.results] == \
        [r.prediction.default_probability for r in batch.results[:30]]
    assert client.score(apps[29]).from_cache is True


def test_clear_cache_says_how_many_entries_it_removed(server, client: CredScopeClient,  # type: ignore[no-untyped-def]
                                                      admin_key: str) -> None:
    apps = unique_applicants(4)
    client.batch_score(apps)
    client.score(apps[1], explain=True)
    with CredScopeClient(server.target, api_key=admin_key) as admin:
        cleared = admin.admin_call("ClearCache", admin_pb2.ClearCacheRequest())
        assert cleared.predictions_removed >= 4 and cleared.explanations_removed >= 1
        assert client.score(apps[0]).from_cache is False
        again = admin.admin_call("ClearCache", admin_pb2.ClearCacheRequest())
        assert (again.predictions_removed, again.explanations_removed) == (1, 0)


def test_explanations_are_cached_whole(client: CredScopeClient) -> None:
    """The second explanation of an applicant comes from the explanation cache, for any top-k, and equals
    the computed one."""
    [a] = unique_applicants(1)
    first = client.score(a, explain=True, top_k=40)
    assert first.from_cache is False
    second = client.score(a, explain=True, top_k=40)
    assert second.from_cache is True
    assert second.explanation == first.explanation
    top3 = client.score(a, explain=True, top_k=3).explanation
    assert list(top3.contributions) == list(first.explanation.contributions[:3])


@pytest.mark.redis
def test_redis_cache_is_shared_by_servers(model_dir: Path, tmp_path: Path, redis_url: str,
                                          redis_prefix: str) -> None:
    env = {"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true", "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "1000000",
           "CREDSCOPE_REDIS_URL": redis_url,
           "CREDSCOPE_CACHE__KEY_PREFIX": redis_prefix, "CREDSCOPE_CACHE__TIMEOUT_SECONDS": "2"}
    one = start_server(model_dir, cwd=tmp_path, env=env)
    two = start_server(model_dir, cwd=tmp_path, env=env)
    try:
        apps = unique_applicants(10)
        with CredScopeClient(one.target) as c1, CredScopeClient(two.target) as c2:
            first = c1.batch_score(apps)
            assert not any(r.prediction.from_cache for r in first.results)
            # Written behind the response: the other server sees it within a bounded wait.
            deadline = time.monotonic() + 10
            while not (r2 := c2.score(apps[0])).from_cache:
                assert time.monotonic() < deadline, "server two never saw server one's result"
                time.sleep(0.05)
            assert r2.default_probability == first.results[0].prediction.default_probability
            deadline = time.monotonic() + 10
            while True:
                b2 = c2.batch_score(apps)
                if all(r.prediction.from_cache for r in b2.results):
                    break
                assert time.monotonic() < deadline, "server two never saw all of server one's results"
                time.sleep(0.05)
            assert [r.prediction.default_probability for r in b2.results] == \
                [r.prediction.default_probability for r in first.results]
            with CredScopeClient(two.target, api_key=make_api_key(two.cwd)) as admin:
                cleared = admin.admin_call("ClearCache", admin_pb2.ClearCacheRequest())
            assert cleared.predictions_removed == 10
            assert c1.score(apps[3]).from_cache is False  # cleared for every server
    finally:
        one.stop()
        two.stop()
    assert "caches: redis" in one.log() and "Traceback" not in one.log() + two.log()


@pytest.fixture(scope="module")
def two_version_store(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A store holding the session model (ACTIVE) and a second, small version."""
    return helpers.two_version_store(model_dir, tmp_path_factory.mktemp("store"), seed=13)


def test_a_new_model_version_never_serves_an_old_result(two_version_store: tuple[Path, str, str],
                                                        tmp_path: Path) -> None:
    """ActivateModel on a running server: the cached result of the old version is not served for the new
    one; switching back serves the old version's entries again (they are still right for it)."""
    from server.convert import applicant_to_row, rows_to_matrix
    from server.model import load_model

    store, first, second = two_version_store
    [a] = unique_applicants(1)
    expected = {v: float(load_model(store, v).predict_proba(rows_to_matrix([applicant_to_row(a)[0]]))[0])
                for v in (first, second)}
    sp = start_server(store, cwd=tmp_path, env={"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true",
                                                "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "1000000"})
    try:
        with CredScopeClient(sp.target) as c, CredScopeClient(sp.target, api_key=make_api_key(sp.cwd)) as admin:
            def score() -> tuple[bool, str, float]:
                r = c.score(a)
                return r.from_cache, r.model_version, r.default_probability

            assert [score() for _ in range(2)] == [(False, first, expected[first]), (True, first, expected[first])]
            # (a first switch to a model of another shape compiles its TreeSHAP kernel: ~15 s on a cold machine)
            admin.admin_call("ActivateModel", admin_pb2.ActivateModelRequest(version=second), timeout=120)
            assert [score() for _ in range(2)] == [(False, second, expected[second]),
                                                   (True, second, expected[second])]
            admin.admin_call("ActivateModel", admin_pb2.ActivateModelRequest(version=first))
            assert score() == (True, first, expected[first])
    finally:
        sp.stop()
