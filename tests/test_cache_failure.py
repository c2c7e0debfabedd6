"""A Redis cache that is down, slow or back: lookups fail open, the failure is counted and logged once,
and the cache is used again when Redis returns, without a restart.

Each test runs its own redis-server on a loopback port (stopped, paused and restarted by pid) or points at
a port where nothing listens.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import grpc
import pytest

from client import CredScopeClient, CredScopeRpcError
from client.applicants import applicant_from_mapping
from credscope.v1 import admin_pb2
from server.backends.cache import CacheUnavailable, RedisCache, RedisLink
from tests.helpers import make_api_key, start_server
from tests.redis_process import RedisProcess, free_port

BASE = {
    "name_contract_type": "Cash loans", "amt_income_total": 202500, "amt_credit": 406597.5, "amt_annuity": 24700.5,
    "amt_goods_price": 351000, "name_income_type": "Working", "days_birth": -12000, "days_employed": -2000,
    "ext_source_2": 0.6, "ext_source_3": 0.5, "cnt_fam_members": 2,
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def outage_logs(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    msgs = [r.getMessage() for r in caplog.records if r.name == "credscope.cache"]
    return sum("unavailable" in m for m in msgs), sum("is back" in m for m in msgs)


async def test_dead_port_fails_open_counts_and_skips_while_the_circuit_is_open(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="credscope.cache")
    clock = FakeClock()
    link = RedisLink(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5, retry_seconds=2.0, clock=clock)
    cache = RedisCache(link, "t:pred:", 60)
    try:
        assert await cache.get("a") is None  # refused: an error, and a miss
        assert (cache.stats.errors, cache.stats.misses, cache.stats.bypassed) == (1, 1, 0)
        assert not link.available
        assert await cache.mget(["a", "b"]) == [None, None]  # circuit open: Redis is not called
        await cache.mset([("a", b"1"), ("b", b"2")])
        await cache.set("c", b"3")
        assert (cache.stats.errors, cache.stats.misses, cache.stats.bypassed, cache.stats.sets) == (1, 3, 3, 0)
        with pytest.raises(CacheUnavailable):  # admin operations try anyway and say it failed
            await cache.clear()
        clock.now += 2.5  # past retry_seconds: the next call probes Redis (still down)
        assert await cache.get("a") is None
        assert (cache.stats.errors, cache.stats.bypassed) == (3, 3)
        assert outage_logs(caplog) == (1, 0)  # logged once for the whole outage
    finally:
        await link.close()


async def test_killed_and_restarted_redis_is_used_again(redis_proc: RedisProcess,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="credscope.cache")
    clock = FakeClock()
    link = RedisLink(redis_proc.url, timeout=1.0, retry_seconds=1.0, clock=clock)
    cache = RedisCache(link, "t:pred:", 60)
    try:
        await cache.set("k", b"v")
        assert await cache.get("k") == b"v"
        redis_proc.stop()
        assert await cache.get("k") is None
        assert cache.stats.errors == 1 and not link.available
        redis_proc.start()  # same port, empty (no persistence)
        assert await cache.get("k") is None and cache.stats.bypassed == 1  # still within retry_seconds
        clock.now += 1.5
        assert await cache.get("k") is None  # the probe reconnects: an ordinary miss
        assert link.available and cache.stats.errors == 1
        await cache.set("k", b"again")
        assert await cache.get("k") == b"again"
        assert outage_logs(caplog) == (1, 1)
    finally:
        await link.close()


async def test_a_redis_that_does_not_answer_is_bounded_by_the_timeout(redis_proc: RedisProcess) -> None:
    clock = FakeClock()
    link = RedisLink(redis_proc.url, timeout=0.3, retry_seconds=1.0, clock=clock)
    cache = RedisCache(link, "t:pred:", 60)
    try:
        await cache.set("k", b"v")
        redis_proc.pause()  # accepts connections, answers nothing
        try:
            started = time.monotonic()
            assert await cache.mget(["k", "x"]) == [None, None]
            assert time.monotonic() - started < 5  # bounded (timeout 0.3s), not hung
            assert cache.stats.errors == 1
            assert await cache.get("k") is None and cache.stats.bypassed == 1
        finally:
            redis_proc.resume()
        clock.now += 1.5
        assert await cache.get("k") == b"v"  # the timed-out connection was dropped, a fresh one works
        assert link.available
    finally:
        await link.close()


def test_server_with_a_dead_redis_serves_uncached(model_dir: Path, tmp_path: Path) -> None:
    sp = start_server(model_dir, cwd=tmp_path, env={
        "CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true", "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "1000000",
        "CREDSCOPE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "CREDSCOPE_CACHE__RETRY_SECONDS": "0.05"}, args=["--workers", "1"])  # one process: one log line
    try:
        a = applicant_from_mapping(BASE)
        with CredScopeClient(sp.target, timeout=10) as c, \
                CredScopeClient(sp.target, api_key=make_api_key(sp.cwd), timeout=10) as admin:
            results = [c.score(a) for _ in range(20)]
            batch = c.batch_score([a] * 5)
            with pytest.raises(CredScopeRpcError) as e:
                admin.admin_call("ClearCache", admin_pb2.ClearCacheRequest())
        assert [r.from_cache for r in results] == [False] * 20
        assert len({r.default_probability for r in results}) == 1
        assert [r.prediction.from_cache for r in batch.results] == [False] * 5
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "cache backend did not answer" in e.value.message
    finally:
        sp.stop()
    log = sp.log()
    assert log.count("unavailable (") == 1 and "not answering yet" in log, log
    assert "Traceback" not in log


def test_score_never_fails_while_redis_is_killed_paused_and_restarted(model_dir: Path, tmp_path: Path,
                                                                      redis_proc: RedisProcess) -> None:
    """A server under load against its own Redis: kill Redis, keep scoring (no failed call, nothing from
    the cache), restart it on the same port, see cache hits again; then pause it (a Redis that does not
    answer) and resume it. The server is never restarted."""
    sp = start_server(model_dir, cwd=tmp_path, env={
        "CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true", "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "1000000",
        "CREDSCOPE_REDIS_URL": redis_proc.url,
        "CREDSCOPE_CACHE__TIMEOUT_SECONDS": "0.5", "CREDSCOPE_CACHE__RETRY_SECONDS": "0.2"})
    applicants = [applicant_from_mapping({**BASE, "ext_source_2": 0.05 + i * 0.04}) for i in range(20)]
    lock = threading.Lock()
    calls: list[tuple[float, float, bool]] = []  # (started, ended, from_cache)
    failures: list[BaseException] = []
    stop = threading.Event()

    def load(seed: int) -> None:
        with CredScopeClient(sp.target, timeout=10, retries=False) as c:
            for n in range(20_000):
                if stop.is_set():
                    return
                t0 = time.monotonic()
                try:
                    r = c.score(applicants[(seed * 7 + n) % len(applicants)])
                except Exception as e:  # noqa: BLE001 - every failure is collected and asserted
                    with lock:
                        failures.append(e)
                    continue
                with lock:
                    calls.append((t0, time.monotonic(), r.from_cache))

    def wait_for(pred, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; log:\n{sp.log()}"
            time.sleep(0.05)

    def calls_since(t: float) -> list[bool]:
        with lock:
            return [hit for started, _, hit in calls if started >= t]

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    try:
        for t in threads:
            t.start()
        t_start = time.monotonic()
        wait_for(lambda: sum(calls_since(t_start)) >= 20, "cache hits before the outage")

        redis_proc.stop()
        t_down = time.monotonic()
        wait_for(lambda: len(calls_since(t_down)) >= 100, "100 calls with Redis down")
        assert not any(calls_since(t_down)), "a call was served from a Redis that is not running"

        redis_proc.start()  # same port, empty
        t_up = time.monotonic()
        wait_for(lambda: sum(calls_since(t_up)) >= 20, "cache hits after Redis came back")

        redis_proc.pause()
        try:
            t_paused = time.monotonic()
            wait_for(lambda: len(calls_since(t_paused)) >= 50, "50 calls with Redis paused")
            assert not any(calls_since(t_paused))
        finally:
            redis_proc.resume()
        t_resumed = time.monotonic()
        wait_for(lambda: sum(calls_since(t_resumed)) >= 20, "cache hits after Redis answered again")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    try:
        assert failures == [], f"{len(failures)} Score calls failed, first: {failures[0]!r}"
        assert len(calls) >= 200
        log = sp.log()
        # Logged when each outage starts and ends, not per call (hundreds of calls went uncached).
        assert 2 <= log.count("unavailable (") <= 4 and 2 <= log.count("is back after") <= 4, log
        with CredScopeClient(sp.target, api_key=make_api_key(sp.cwd), timeout=10) as c:
            cleared = c.admin_call("ClearCache", admin_pb2.ClearCacheRequest())
        assert 1 <= cleared.predictions_removed <= len(applicants)
        assert sp.proc.poll() is None  # the same server process throughout
    finally:
        sp.stop()
