"""The audit trail end to end: real server processes, a real channel, a real PostgreSQL.

* Concurrent load: every accepted call has exactly one ``api_usage`` row and every scored applicant
  exactly one ``predictions`` row; GetStats agrees with the table.
* PostgreSQL cut off during load (a TCP proxy between server and database is stopped, then restarted):
  the server spools, replays, and loses and duplicates nothing.
* A server killed with SIGKILL while its records wait in the spool: the next server replays them.
The shared PostgreSQL is never stopped; each test has a database of its own.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import pytest

from client.applicants import applicant_from_mapping
from credscope.v1 import admin_pb2, admin_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from server.audit.records import entries_from_json
from server.audit.spool import PREFIX, SUFFIX, read_frames
from tests.audit_helpers import TcpProxy, eventually, fetch, free_port
from tests.helpers import ServerProcess, make_api_key, start_server
from tests.test_api import GOOD

pytestmark = pytest.mark.postgres


def audit_env(dsn: str, spool: Path, **extra: str) -> dict[str, str]:
    return {"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true", "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "10000000",
            "CREDSCOPE_AUDIT__URL": dsn,
            "CREDSCOPE_AUDIT__SPOOL_DIR": str(spool), "CREDSCOPE_AUDIT__FLUSH_SECONDS": "0.05",
            "CREDSCOPE_AUDIT__RETRY_SECONDS": "0.2", "CREDSCOPE_AUDIT__TIMEOUT_SECONDS": "2",
            "CREDSCOPE_SERVER__DRAIN_SECONDS": "0", **extra}


@pytest.fixture()
def proxy(postgres_dsn: str) -> Iterator[TcpProxy]:
    u = urlparse(postgres_dsn)
    p = TcpProxy(u.hostname or "127.0.0.1", u.port or 5432)
    yield p
    p.close()


class Load:
    """Bounded concurrent calls: Score (most), BatchScore of 3, and invalid applicants; records the request
    ids the server answered with."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.calls: list[str] = []
        self.predictions: list[str] = []
        self.failed: list[str] = []
        self.done = 0

    async def run(self, n: int, concurrency: int = 8) -> None:
        sem = asyncio.Semaphore(concurrency)
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)

            async def one(i: int) -> None:
                async with sem:
                    await self._call(stub, i)
                    self.done += 1

            await asyncio.gather(*(one(i) for i in range(n)))

    async def _call(self, stub: scoring_pb2_grpc.ScoringServiceStub, i: int) -> None:
        good = applicant_from_mapping({**GOOD, "amt_income_total": 100_000 + i})
        try:
            if i % 10 == 1:
                r = await stub.BatchScore(scoring_pb2.BatchScoreRequest(applicants=[good] * 3), timeout=20)
                self.calls.append(r.request_id)
                self.predictions += [x.prediction.request_id for x in r.results]
            elif i % 10 == 2:
                bad = applicant_from_mapping({**GOOD, "amt_credit": -1.0})
                await stub.Score(scoring_pb2.ScoreRequest(applicant=bad), timeout=20)
            else:
                r = await stub.Score(scoring_pb2.ScoreRequest(applicant=good), timeout=20)
                self.calls.append(r.request_id)
                self.predictions.append(r.request_id)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            rid = dict(e.trailing_metadata() or ())["x-request-id"]
            self.calls.append(rid)
            self.failed.append(rid)


async def when(condition: Callable[[], bool], action: Callable[[], Any]) -> None:
    await eventually(lambda: _value(condition()), within=60, interval=0.01)
    action()


async def _value(v: Any) -> Any:
    return v


async def ids(dsn: str, table: str) -> list[str]:
    return [r[0] for r in await fetch(dsn, f"SELECT request_id FROM {table}")]


def stop(sp: ServerProcess) -> None:
    assert sp.stop(signal.SIGTERM) == 0, sp.log()


async def test_concurrent_load_leaves_one_row_per_call(model_dir: Path, postgres_dsn: str, tmp_path: Path) -> None:
    sp = start_server(model_dir, cwd=tmp_path, env=audit_env(postgres_dsn, tmp_path / "spool"))
    try:
        load = Load(sp.target)
        await load.run(240, concurrency=12)
        key = await asyncio.to_thread(make_api_key, tmp_path)
        async with grpc.aio.insecure_channel(sp.target) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            # GetStats flushes its own worker's queue and gives the other worker one flush period; on a slow
            # host the other worker's write may take longer: the figures must converge to the exact counts.
            deadline = time.monotonic() + 15
            stats_calls = 0
            while True:
                stats = await stub.GetStats(admin_pb2.GetStatsRequest(), metadata=[("x-api-key", key)], timeout=10)
                stats_calls += 1
                if stats.total_predictions >= len(load.predictions) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
    finally:
        stop(sp)  # SIGTERM drains the queue
    predictions, usage = await ids(postgres_dsn, "predictions"), await ids(postgres_dsn, "api_usage")
    assert len(load.predictions) == 24 * 3 + 192 and len(load.failed) == 24
    assert sorted(predictions) == sorted(load.predictions)
    assert len(usage) == len(set(usage)) == len(load.calls) + stats_calls  # + the GetStats calls
    assert set(load.calls) <= set(usage)
    assert stats.total_predictions == len(load.predictions) and stats.error_calls == len(load.failed)
    errors = await fetch(postgres_dsn, "SELECT count(*) FROM api_usage WHERE status_code = 'INVALID_ARGUMENT'")
    assert errors[0][0] == len(load.failed)


async def test_postgres_outage_during_load_loses_and_duplicates_nothing(
        model_dir: Path, postgres_dsn: str, proxy: TcpProxy, tmp_path: Path) -> None:
    proxy.start()
    spool = tmp_path / "spool"
    sp = start_server(model_dir, cwd=tmp_path, env=audit_env(proxy.url_for(postgres_dsn), spool))
    try:
        load = Load(sp.target)
        await asyncio.gather(load.run(400, concurrency=8),
                             when(lambda: load.done >= 100, proxy.stop),  # PostgreSQL gone mid-load …
                             when(lambda: load.done >= 250, proxy.start))  # … and back
        await eventually(lambda: _value("replayed" in sp.log()), within=30)
    finally:
        stop(sp)
    log = sp.log()
    assert "spooling batches" in log and "replayed" in log, log
    predictions, usage = await ids(postgres_dsn, "predictions"), await ids(postgres_dsn, "api_usage")
    assert len(predictions) == len(set(predictions)) == len(load.predictions)
    assert set(predictions) == set(load.predictions)
    assert len(usage) == len(set(usage)) == len(load.calls) and set(usage) == set(load.calls)
    assert not list(spool.glob(f"{PREFIX}*{SUFFIX}"))


async def test_killed_server_replays_its_spool(model_dir: Path, postgres_dsn: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet: the database is unreachable
    proxy = TcpProxy(urlparse(postgres_dsn).hostname or "127.0.0.1", urlparse(postgres_dsn).port or 5432, port)
    spool = tmp_path / "spool"
    env = audit_env(proxy.url_for(postgres_dsn), spool, CREDSCOPE_AUDIT__DURABILITY="sync")
    try:
        sp = start_server(model_dir, cwd=tmp_path, env=env)
        try:
            load = Load(sp.target)
            await load.run(60, concurrency=6)
        finally:
            sp.stop(signal.SIGKILL)  # no drain, no goodbye
        assert "unreachable at start" in sp.log()
        # sync durability: every answered call was in the fsync'd spool before its answer
        spooled = {e.usage.request_id for path in spool.glob(f"{PREFIX}*{SUFFIX}")
                   for frame in read_frames(path.read_bytes()).frames for e in entries_from_json(frame)}
        assert spooled == set(load.calls)

        proxy.start()
        sp = start_server(model_dir, cwd=tmp_path, env=env)
        try:
            await eventually(lambda: _no_spool(spool), within=30)
        finally:
            stop(sp)
    finally:
        proxy.close()
    assert sorted(await ids(postgres_dsn, "predictions")) == sorted(load.predictions)
    assert sorted(await ids(postgres_dsn, "api_usage")) == sorted(load.calls)


async def _no_spool(spool: Path) -> bool:
    return not await asyncio.to_thread(lambda: list(spool.glob(f"{PREFIX}*{SUFFIX}")))
