"""Brute-force slowing: failed authentications are counted per client address; past the limit the address
is refused (RESOURCE_EXHAUSTED, AUTH_THROTTLED, RetryInfo) without its key being checked, other addresses
are not, and the counts reach the metrics. Over real channels to a real server, plus the table's rules
with a fake clock."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from client import CredScopeClient, CredScopeRpcError
from server.auth.throttle import FailedAuthThrottle
from server.auth.verifier import InvalidKey, MissingKey
from server.errors import PermissionDenied
from tests.helpers import make_api_key, start_server
from tests.test_api import applicant

LIMIT = 5
WINDOW = 3.0


def metric(metrics_dir: Path, name: str, **labels: str) -> float:
    """Sum of a counter's samples (``name`` without ``_total``) over the workers' multiprocess files."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    return sum(s.value for family in registry.collect() if family.name == name for s in family.samples
               if s.name == name + "_total" and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for_metric(metrics_dir: Path, name: str, want: float, **labels: str) -> float:
    """The counter once it reaches ``want`` (workers flush their metrics every 0.25 s), or its last value."""
    deadline = time.monotonic() + 10
    value = metric(metrics_dir, name, **labels)
    while value < want and time.monotonic() < deadline:
        time.sleep(0.1)
        value = metric(metrics_dir, name, **labels)
    return value


@pytest.fixture(scope="module")
def guarded(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A server with keys required, a low failed-auth limit, listening on 127.0.0.1 and ::1 (two addresses)."""
    work = tmp_path_factory.mktemp("bruteforce")
    sp = start_server(model_dir, cwd=work, args=["--host", "localhost"], env={
        "CREDSCOPE_AUTH__FAILED_AUTH_LIMIT": str(LIMIT), "CREDSCOPE_AUTH__FAILED_AUTH_WINDOW_SECONDS": str(WINDOW),
        "CREDSCOPE_TELEMETRY__METRICS_DIR": str(work / "metrics")})
    yield sp, make_api_key(work, tier="pro", admin=False, name="good"), work / "metrics"
    sp.stop()


def made_up_key() -> str:
    return f"csk_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def test_an_address_that_keeps_failing_is_refused_then_let_back(guarded) -> None:  # type: ignore[no-untyped-def]
    sp, good_key, metrics_dir = guarded
    with CredScopeClient(sp.target, api_key=good_key, retries=False) as good:
        assert good.score(applicant()).default_probability > 0
        for _ in range(LIMIT):
            with CredScopeClient(sp.target, api_key=made_up_key(), retries=False) as guess:
                with pytest.raises(CredScopeRpcError) as e:
                    guess.score(applicant())
                assert (e.value.code, e.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")

        # The address is throttled: even the good key is refused, unchecked, with when to retry.
        with pytest.raises(CredScopeRpcError) as e:
            good.score(applicant())
        err = e.value
        assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "AUTH_THROTTLED"), err
        assert err.retry_delay_seconds is not None and 0 < err.retry_delay_seconds <= WINDOW
        assert err.quota_violations and err.quota_violations[0].field.startswith("clientip:")
        assert "too many failed authentications" in err.message
        assert err.request_id  # a refusal is an answered call like any other
        # A guess gets the same answer (the key is not checked, so it learns nothing).
        with CredScopeClient(sp.target, api_key=made_up_key(), retries=False) as guess:
            with pytest.raises(CredScopeRpcError) as e:
                guess.score(applicant())
            assert e.value.reason == "AUTH_THROTTLED"
        # Health checks are not throttled (load balancers keep probing).
        health = health_pb2_grpc.HealthStub(good.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # Another address (IPv6 loopback) is not affected.
        with CredScopeClient(f"[::1]:{sp.port}", api_key=good_key, retries=False) as other:
            assert other.score(applicant()).default_probability > 0

        # Once the oldest failure leaves the window, the address is checked again.
        deadline = time.monotonic() + WINDOW + 10
        while True:
            try:
                assert good.score(applicant()).default_probability > 0
                break
            except CredScopeRpcError as e:
                assert e.reason == "AUTH_THROTTLED" and time.monotonic() < deadline, e

    assert wait_for_metric(metrics_dir, "credscope_auth_failures", LIMIT, reason="API_KEY_INVALID") == LIMIT
    assert wait_for_metric(metrics_dir, "credscope_auth_throttled", 2) >= 2
    text = (metrics_dir.parent / "credscope.db").read_bytes()  # nothing about addresses is stored
    assert b"127.0.0.1" not in text


def test_missing_keys_count_and_metrics_have_no_address_labels(guarded) -> None:  # type: ignore[no-untyped-def]
    sp, _, metrics_dir = guarded
    before = metric(metrics_dir, "credscope_auth_failures", reason="API_KEY_MISSING")
    with CredScopeClient(f"[::1]:{sp.port}", retries=False) as no_key:
        with pytest.raises(CredScopeRpcError) as e:
            no_key.model_info()
        assert e.value.reason == "API_KEY_MISSING"
    assert wait_for_metric(metrics_dir, "credscope_auth_failures", before + 1, reason="API_KEY_MISSING") == before + 1
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    for family in registry.collect():
        if family.name in ("credscope_auth_failures", "credscope_auth_throttled"):
            for s in family.samples:
                assert set(s.labels) <= {"reason"}, s


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window_per_address() -> None:
    clock = Clock()
    t = FailedAuthThrottle(3, 10.0, clock=clock)
    for _ in range(2):
        t.rejected("ipv4:10.0.0.1", "/m", InvalidKey("bad"))
        clock.now += 1
    assert t.retry_after("ipv4:10.0.0.1") == 0
    t.rejected("ipv4:10.0.0.1", "/m", InvalidKey("bad"))  # third failure within 10 s
    assert t.retry_after("ipv4:10.0.0.1") == pytest.approx(8.0)  # oldest (t=1000) leaves at 1010
    assert t.retry_after("ipv4:10.0.0.2") == 0
    clock.now = 1010.0
    assert t.retry_after("ipv4:10.0.0.1") == 0
    t.failed("ipv4:10.0.0.1")  # one more failure: the last three are 1001, 1002, 1010
    assert t.retry_after("ipv4:10.0.0.1") == pytest.approx(1.0)


def test_admin_refusals_do_not_count_and_zero_turns_it_off() -> None:
    t = FailedAuthThrottle(1, 60.0)
    t.rejected("ipv4:10.0.0.1", "/m", PermissionDenied("needs admin"))
    assert t.retry_after("ipv4:10.0.0.1") == 0
    t.rejected("ipv4:10.0.0.1", "/m", MissingKey("no key"))
    assert t.retry_after("ipv4:10.0.0.1") > 0
    off = FailedAuthThrottle(0, 60.0)
    for _ in range(100):
        off.rejected("ipv4:10.0.0.1", "/m", InvalidKey("bad"))
    off.check("ipv4:10.0.0.1")
    assert len(off) == 0


def test_the_table_is_bounded() -> None:
    clock = Clock()
    t = FailedAuthThrottle(2, 60.0, max_peers=100, clock=clock)
    for i in range(10_000):
        t.failed(f"ipv4:10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(t) == 100
    t.failed("ipv4:192.0.2.1")
    t.failed("ipv4:192.0.2.1")
    assert t.retry_after("ipv4:192.0.2.1") > 0  # the most recent addresses are the ones kept
