"""Faults under load, end to end: PostgreSQL cut off and back (a TCP proxy of the test's own between the
server and the shared PostgreSQL, which is never stopped), Redis killed and restarted (a redis-server of
the test's own), SIGTERM in the middle of load. Each time: no call that should have succeeded failed, the
audit trail has exactly one row per answered call and per scored applicant (nothing lost, nothing
duplicated), and health stays SERVING — it turns NOT_SERVING only when nothing can record audits (database
down and spool unwritable) and comes back when the database does.

Loads are bounded in calls and seconds; each test runs a few seconds.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.applicants import applicant_from_mapping
from credscope.v1 import scoring_pb2, scoring_pb2_grpc
from server.audit.spool import PREFIX, SUFFIX
from tests.audit_helpers import TcpProxy, eventually, fetch
from tests.helpers import ServerProcess, start_server
from tests.redis_process import RedisProcess
from tests.test_api import GOOD
from tests.test_secrets import _create_admin_key

pytestmark = pytest.mark.postgres

SERVING = health_pb2.HealthCheckResponse.SERVING


def fault_env(audit_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"CREDSCOPE_AUDIT__URL": audit_url, "CREDSCOPE_AUDIT__SPOOL_DIR": str(tmp_path / "spool"),
            "CREDSCOPE_AUDIT__FLUSH_SECONDS": "0.05", "CREDSCOPE_AUDIT__RETRY_SECONDS": "0.2",
            "CREDSCOPE_AUDIT__TIMEOUT_SECONDS": "2", "CREDSCOPE_RATE_LIMIT__ENTERPRISE_PER_HOUR": "100000000",
            "CREDSCOPE_SERVER__HEALTH_CHECK_SECONDS": "0.1", **extra}


@dataclass
class Load:
    """Score and BatchScore calls with an API key until ``stop`` is set (at most ``limit`` calls, at most
    ``seconds``), ``concurrency`` at a time; the health status is sampled all along."""

    target: str
    api_key: str
    answered: list[str] = field(default_factory=list)
    """Request ids of the calls answered OK."""
    predictions: list[str] = field(default_factory=list)
    failures: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)
    health: list[int] = field(default_factory=list)
    done: int = 0

    async def run(self, stop: asyncio.Event, *, limit: int = 3000, seconds: float = 15.0,
                  concurrency: int = 6) -> None:
        deadline = time.monotonic() + seconds
        metadata = (("x-api-key", self.api_key),)
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            counter = iter(range(limit))

            async def worker() -> None:
                for i in counter:
                    if stop.is_set() or time.monotonic() > deadline:
                        return
                    await self.one(stub, metadata, i)

            async def watch() -> None:
                while not stop.is_set() and time.monotonic() < deadline and self.done < limit:
                    try:
                        r = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                        self.health.append(r.status)
                    except grpc.aio.AioRpcError as e:
                        self.health.append(-e.code().value[0])
                    await asyncio.sleep(0.05)

            await asyncio.gather(*(worker() for _ in range(concurrency)), watch())

    async def one(self, stub: scoring_pb2_grpc.ScoringServiceStub, metadata: tuple[tuple[str, str], ...],
                  i: int) -> None:
        good = applicant_from_mapping({**GOOD, "amt_income_total": 100_000 + i})
        try:
            if i % 7 == 3:
                r = await stub.BatchScore(scoring_pb2.BatchScoreRequest(applicants=[good] * 3), metadata=metadata,
                                          timeout=20)
                self.predictions += [x.prediction.request_id for x in r.results]
            else:
                r = await stub.Score(scoring_pb2.ScoreRequest(applicant=good), metadata=metadata, timeout=20)
                self.predictions.append(r.request_id)
            self.answered.append(r.request_id)
        except grpc.aio.AioRpcError as e:
            self.failures.append((e.code(), e.details() or ""))
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                await asyncio.sleep(0.05)  # back off, as clients do (the client's retry policy starts at 0.1 s)
        finally:
            self.done += 1


async def rows(dsn: str, table: str) -> list[str]:
    return [r[0] for r in await fetch(dsn, f"SELECT request_id FROM {table}")]  # noqa: S608 - test tables


async def assert_audit_complete(dsn: str, load: Load, *, extra_usage: int = 0) -> None:
    """One predictions row per scored applicant and one api_usage row per answered call, nothing else."""
    predictions = await rows(dsn, "predictions")
    assert len(predictions) == len(set(predictions)) == len(load.predictions), (len(predictions),
                                                                                 len(load.predictions))
    assert set(predictions) == set(load.predictions)
    usage = await rows(dsn, "api_usage")
    assert len(usage) == len(set(usage)) == len(load.answered) + len(load.failures) + extra_usage
    assert set(load.answered) <= set(usage)


async def at(condition, action) -> None:  # type: ignore[no-untyped-def]
    """Run ``action`` once ``condition()`` holds (checked every 10 ms, at most 60 s)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "the load never got there"
        await asyncio.sleep(0.01)
    action()


class Outage:
    """Takes a service down once the load has made ``after`` calls, and back once it has made ``more``
    calls since and at least ``seconds`` have passed (long enough for every cache in front of it to expire);
    stops the load 150 calls and ``seconds`` after that."""

    def __init__(self, load: Load, down, up, *, after: int, more: int, seconds: float) -> None:  # type: ignore[no-untyped-def]
        self.load, self.down, self.up = load, down, up
        self.after, self.more, self.seconds = after, more, seconds
        self.calls_during = 0

    async def run(self, stop: asyncio.Event) -> None:
        await at(lambda: self.load.done >= self.after, self.down)
        began, done_then = time.monotonic(), self.load.done
        await at(lambda: self.load.done >= done_then + self.more and time.monotonic() - began >= self.seconds,
                 self.up)
        self.calls_during = self.load.done - done_then
        # and 150 calls and ``seconds`` more once it is back: longer than any retry interval in front of it,
        # so the calls after the outage reach it again (150 calls alone can take less than that)
        settled, back = self.load.done, time.monotonic()
        await at(lambda: self.load.done >= settled + 150 and time.monotonic() - back >= self.seconds, stop.set)


def stop_server(sp: ServerProcess) -> None:
    assert sp.stop(signal.SIGTERM) == 0, sp.log()[-3000:]


@pytest.fixture()
def proxy(postgres_dsn: str) -> Iterator[TcpProxy]:
    u = urlparse(postgres_dsn)
    p = TcpProxy(u.hostname or "127.0.0.1", u.port or 5432)
    p.start()
    yield p
    p.close()


async def test_postgres_down_and_back_under_load(model_dir: Path, postgres_dsn: str, proxy: TcpProxy,
                                                 tmp_path: Path) -> None:
    """Key store and audit trail both on PostgreSQL, behind the proxy; keys re-checked every 0.5 s."""
    url = proxy.url_for(postgres_dsn)
    key = await _create_admin_key(url)
    sp = start_server(model_dir, cwd=tmp_path, env=fault_env(url, tmp_path, CREDSCOPE_AUTH__KEY_STORE_URL=url,
                                                             CREDSCOPE_AUTH__KEY_CACHE_SECONDS="0.5"))
    try:
        load, stop = Load(sp.target, key), asyncio.Event()
        outage = Outage(load, proxy.stop, proxy.start, after=150, more=200, seconds=1.5)
        await asyncio.gather(load.run(stop, seconds=30), outage.run(stop))
        await eventually(lambda: _true("replayed" in sp.log()), within=30)
    finally:
        stop_server(sp)
    assert not load.failures, load.failures[:5]
    assert load.health and set(load.health) == {SERVING}, "a database outage with a working spool took the " \
                                                          "server out of service"
    log = sp.log()
    assert "spooling batches" in log and "key store unavailable" in log, log[-3000:]
    await assert_audit_complete(postgres_dsn, load)
    assert not list((tmp_path / "spool").glob(f"{PREFIX}*{SUFFIX}"))


@pytest.mark.redis
async def test_redis_killed_and_restarted_under_load(model_dir: Path, postgres_dsn: str, tmp_path: Path) -> None:
    """Prediction cache and rate-limit buckets on a Redis that dies and comes back on the same port."""
    redis = RedisProcess(tmp_path).start()
    key = await _create_admin_key(postgres_dsn)
    sp = start_server(model_dir, cwd=tmp_path, env=fault_env(
        postgres_dsn, tmp_path, CREDSCOPE_AUTH__KEY_STORE_URL=postgres_dsn, CREDSCOPE_CACHE__REDIS_URL=redis.url,
        CREDSCOPE_RATE_LIMIT__REDIS_URL=redis.url, CREDSCOPE_CACHE__RETRY_SECONDS="0.2",
        CREDSCOPE_RATE_LIMIT__REDIS_RETRY_SECONDS="0.2"))
    try:
        load, stop = Load(sp.target, key), asyncio.Event()
        outage = Outage(load, redis.stop, redis.start, after=150, more=200, seconds=1.0)
        await asyncio.gather(load.run(stop, seconds=30), outage.run(stop))
        assert redis.client().dbsize() > 0  # the restarted Redis is used again (it started empty)
    finally:
        stop_server(sp)
        redis.stop()
    assert not load.failures, load.failures[:5]
    assert load.health and set(load.health) == {SERVING}
    await assert_audit_complete(postgres_dsn, load)


async def test_sigterm_under_load_finishes_what_it_accepted(model_dir: Path, postgres_dsn: str,
                                                            tmp_path: Path) -> None:
    """SIGTERM mid-load: calls in flight finish, new ones are refused UNAVAILABLE (clients retry elsewhere),
    the audit queue is drained into the database before the process exits 0."""
    key = await _create_admin_key(postgres_dsn)
    sp = start_server(model_dir, cwd=tmp_path, env=fault_env(
        postgres_dsn, tmp_path, CREDSCOPE_AUTH__KEY_STORE_URL=postgres_dsn, CREDSCOPE_SERVER__DRAIN_SECONDS="0.5",
        CREDSCOPE_AUDIT__FLUSH_SECONDS="1.0"))  # records wait in the queue: the drain must write them
    load, stop = Load(sp.target, key), asyncio.Event()

    def sigterm() -> None:
        sp.proc.send_signal(signal.SIGTERM)

    await asyncio.gather(load.run(stop, seconds=20), at(lambda: load.done >= 200, sigterm),
                         at(lambda: sp.proc.poll() is not None or load.done >= 3000, stop.set))
    assert sp.proc.wait(timeout=30) == 0, sp.log()[-3000:]
    assert len(load.answered) >= 200
    # Refused after SIGTERM: UNAVAILABLE while draining and once the port is closed; CANCELLED for calls grpc
    # itself still held, not yet handed to the server's code, when it stopped (grpc core cancels those). None
    # of them had been accepted: the audit below has no row for any call but the answered ones.
    for code, details in load.failures:
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), (code, details)
    log = sp.log()
    assert "shutting down" in log and "stopped" in log
    # Every answered call and every scored applicant is in the audit trail: the drain wrote the queue. (Calls
    # refused while draining never reached the audit interceptor: no row, as for a closed port.)
    predictions = await rows(postgres_dsn, "predictions")
    assert len(predictions) == len(set(predictions)) == len(load.predictions)
    assert set(predictions) == set(load.predictions)
    usage = await fetch(postgres_dsn, "SELECT request_id, status_code FROM api_usage")
    assert sorted(rid for rid, _ in usage) == sorted(load.answered)
    assert {status for _, status in usage} == {"OK"}


async def test_health_turns_not_serving_only_when_nothing_can_record_audits(
        model_dir: Path, postgres_dsn: str, proxy: TcpProxy, tmp_path: Path) -> None:
    """The spool cannot be written (its folder would be inside a file): with the database up the server
    serves; with it down nothing can record audits, so NOT_SERVING; with it back, SERVING again. Calls
    made meanwhile wait in the audit queue and are written when the database returns."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the spool folder should be")
    url = proxy.url_for(postgres_dsn)
    key = await _create_admin_key(postgres_dsn)
    sp = start_server(model_dir, cwd=tmp_path, env=fault_env(
        url, tmp_path, CREDSCOPE_AUTH__KEY_STORE_URL=postgres_dsn, CREDSCOPE_AUDIT__SPOOL_DIR=str(blocker / "spool")))
    try:
        async with grpc.aio.insecure_channel(sp.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)

            async def status() -> int:
                return (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status

            async def score(i: int) -> str:
                good = applicant_from_mapping({**GOOD, "amt_income_total": 200_000 + i})
                r = await stub.Score(scoring_pb2.ScoreRequest(applicant=good), metadata=(("x-api-key", key),),
                                     timeout=10)
                return r.request_id

            assert await status() == SERVING
            scored = [await score(i) for i in range(5)]
            proxy.stop()
            scored += [await score(i) for i in range(5, 10)]  # their batch fails: database and spool both
            await eventually(lambda: _is(status(), health_pb2.HealthCheckResponse.NOT_SERVING), within=20)
            scored += [await score(i) for i in range(10, 13)]  # still answered (async durability): queued
            proxy.start()
            await eventually(lambda: _is(status(), SERVING), within=20)
            await eventually(lambda: _count_is(postgres_dsn, len(scored)), within=20)
    finally:
        stop_server(sp)
    assert "NOT_SERVING: nothing can record audits" in sp.log() and "SERVING again" in sp.log()
    assert sorted(await rows(postgres_dsn, "predictions")) == sorted(scored)


async def _true(v: bool) -> bool:
    return v


async def _is(coro, want: int) -> bool:  # type: ignore[no-untyped-def]
    return await coro == want


async def _count_is(dsn: str, n: int) -> bool:
    return len(await rows(dsn, "predictions")) == n


class _Health:
    def __init__(self) -> None:
        self.status: dict[str, int] = {}

    async def set(self, name: str, status: int) -> None:
        self.status[name] = status


class _Audit:
    ok = True

    def healthy(self) -> bool:
        return self.ok


async def test_readiness_rules() -> None:
    """NOT_SERVING for no model or no way to record audits, for the server and each service; SERVING back."""
    from server.readiness import Readiness

    health, audit, model = _Health(), _Audit(), {"loaded": False}
    r = Readiness(health, ["a.Service"], model_loaded=lambda: model["loaded"], audit=audit)
    assert not await r.update() and set(health.status.values()) == {health_pb2.HealthCheckResponse.NOT_SERVING}
    assert r.problem() == "no model is loaded"
    model["loaded"] = True
    assert await r.update() and health.status == {"": SERVING, "a.Service": SERVING}
    audit.ok = False
    assert not await r.update() and "nothing can record audits" in (r.problem() or "")
    audit.ok = True
    assert await r.update() and r.changes == 3
    assert await Readiness(health, [], model_loaded=lambda: True, audit=None).update()  # audit off
