"""Model store and hot swap: ActivateModel switches versions under load with no failed or mixed call,
and every worker follows the store's ACTIVE file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from client import CredScopeClient, CredScopeRpcError
from credscope.v1 import admin_pb2
from server.convert import applicant_to_row, rows_to_matrix
from server.model import active_version, load_model
from tests import helpers
from tests.helpers import make_api_key, start_server
from tests.test_api import GOOD, applicant


@pytest.fixture(scope="module")
def two_version_store(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A store holding the session model and a second version trained with another seed."""
    return helpers.two_version_store(model_dir, tmp_path_factory.mktemp("store"), seed=11)


def admin_env() -> dict[str, str]:
    return {"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true", "CREDSCOPE_MODEL__WATCH_SECONDS": "0.2",
            "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "10000000"}


def test_activate_under_load_never_fails_or_mixes(two_version_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, first, second = two_version_store
    expected = {}
    for v in (first, second):
        m = load_model(store, v)
        expected[v] = float(m.predict_proba(rows_to_matrix([applicant_to_row(applicant())[0]]))[0])
    assert expected[first] != expected[second]
    sp = start_server(store, cwd=tmp_path, env=admin_env())
    seen: list[tuple[float, str, float]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:  # until the switch is over (a first switch to a new model compiles its TreeSHAP kernel)
        deadline = time.monotonic() + 180
        with CredScopeClient(sp.target, timeout=10) as c:
            for _ in range(500_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    r = c.score(GOOD)
                    seen.append((time.monotonic(), r.model_version, r.default_probability))
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        with CredScopeClient(sp.target, api_key=make_api_key(tmp_path), timeout=120) as admin:
            resp = admin.admin_call("ActivateModel", admin_pb2.ActivateModelRequest(version=second))
            switched = time.monotonic()
            assert (resp.previous_version, resp.active_version) == (first, second)
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(30)
            assert admin.model_info().model_version == second
    finally:
        stop.set()
        sp.stop()
    assert not errors, errors[:3]
    assert {v for _, v, _ in seen} == {first, second}
    for _, version, p in seen:  # each answer is entirely one version's
        assert p == pytest.approx(expected[version], abs=1e-9)
    assert all(v == second for t, v, _ in seen if t > switched + 0.05)
    assert active_version(store) == second


def test_workers_follow_the_active_file(two_version_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, first, second = two_version_store
    (store / "ACTIVE").write_text(first)
    sp = start_server(store, cwd=tmp_path, env=admin_env())
    try:
        with CredScopeClient(sp.target, timeout=10) as c:
            assert c.score(GOOD).model_version == first
            (store / "ACTIVE").write_text(second)
            deadline = time.monotonic() + 120  # a first switch to a new model shape compiles its TreeSHAP kernel
            while c.score(GOOD).model_version != second:
                assert time.monotonic() < deadline, "the worker did not follow ACTIVE"
                time.sleep(0.1)
            info = c.model_info()
            assert {v.version for v in info.versions} == {first, second}
            assert [v.version for v in info.versions if v.active] == [second]
    finally:
        sp.stop()


def test_activate_unknown_version(server, admin_key: str) -> None:  # type: ignore[no-untyped-def]
    with CredScopeClient(server.target, api_key=admin_key, timeout=10) as c:
        for version, code in (("0123456789abcdef", grpc.StatusCode.NOT_FOUND),
                              ("", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(CredScopeRpcError) as e:
                c.admin_call("ActivateModel", admin_pb2.ActivateModelRequest(version=version))
            assert e.value.code == code


def test_loading_a_model_freezes_the_heap_out_of_the_cyclic_gc(model_dir: Path) -> None:
    """A worker moves what it loaded (modules, model, metadata, explainer) out of the cyclic GC's reach, so
    full collections do not walk it while serving (they paused the event loop 60–120 ms)."""
    import gc

    from server.runtime import Runtime
    from server.settings import Settings

    settings = Settings()
    settings.model.model_dir = model_dir
    gc.unfreeze()
    try:
        Runtime(settings).load()
        frozen = gc.get_freeze_count()
        assert frozen > 100_000, frozen  # the loaded model's objects among them
        assert gc.get_count()[2] == 0  # nothing left for a full collection to walk
    finally:
        gc.unfreeze()
