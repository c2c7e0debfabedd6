"""Token buckets: one contract suite over both stores (host-local table, Redis), cross-process exactness of
the local table, and the Redis → local failover against a real redis-server that dies and comes back."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from server.ratelimit.buckets import BucketStore
from server.ratelimit.failover import FailoverBucketStore
from server.ratelimit.local import LocalBucketStore
from server.ratelimit.redis_store import RedisBucketStore

HOUR = 3600.0
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, where): a table file of this test's own, or this test's own Redis key prefix."""
    if request.param == "local":
        return "local", str(tmp_path / "buckets")
    request.getfixturevalue("redis_url")
    return "redis", str(request.getfixturevalue("redis_prefix"))


@pytest.fixture()
async def clock() -> Clock:
    return Clock()


@pytest.fixture()
async def buckets(backend: tuple[str, str], clock: Clock, redis_url_or_none: str | None
                  ) -> AsyncIterator[BucketStore]:
    kind, where = backend
    store: BucketStore
    if kind == "local":
        store = LocalBucketStore(where, slots=1024, clock=clock)
    else:
        assert redis_url_or_none
        store = RedisBucketStore(redis_url_or_none, prefix=where, clock=clock, timeout=2.0)
    yield store
    await store.close()


@pytest.fixture()
def redis_url_or_none(backend: tuple[str, str], request: pytest.FixtureRequest) -> str | None:
    return str(request.getfixturevalue("redis_url")) if backend[0] == "redis" else None


async def test_a_full_bucket_allows_capacity_then_refuses(buckets: BucketStore) -> None:
    remaining = []
    for _ in range(5):
        d = await buckets.take("alice", 5, HOUR, 1)
        assert d.allowed and d.limit == 5
        remaining.append(d.remaining)
    assert remaining == [4, 3, 2, 1, 0]
    d = await buckets.take("alice", 5, HOUR, 1)
    assert not d.allowed and d.remaining == 0
    assert d.retry_after_seconds == pytest.approx(HOUR / 5) and d.reset_seconds == pytest.approx(HOUR)


async def test_tokens_refill_evenly_over_the_period(buckets: BucketStore, clock: Clock) -> None:
    for _ in range(10):
        assert (await buckets.take("bob", 10, HOUR, 1)).allowed
    assert not (await buckets.take("bob", 10, HOUR, 1)).allowed
    clock.t += HOUR / 10 * 2.5  # 2.5 tokens back
    d = await buckets.take("bob", 10, HOUR, 1)
    assert d.allowed and d.remaining == 1 and d.reset_seconds == pytest.approx(HOUR / 10 * 8.5)
    assert (await buckets.take("bob", 10, HOUR, 1)).allowed
    d = await buckets.take("bob", 10, HOUR, 1)
    assert not d.allowed and d.retry_after_seconds == pytest.approx(HOUR / 10 * 0.5)
    clock.t += 10 * HOUR  # never more than the capacity
    d = await buckets.take("bob", 10, HOUR, 1)
    assert d.allowed and d.remaining == 9


async def test_costs_and_refusals_take_nothing(buckets: BucketStore) -> None:
    d = await buckets.take("carol", 10, HOUR, 4)
    assert d.allowed and d.remaining == 6
    d = await buckets.take("carol", 10, HOUR, 7)
    assert not d.allowed and d.remaining == 6 and d.retry_after_seconds == pytest.approx(HOUR / 10)
    d = await buckets.take("carol", 10, HOUR, 11)  # more than the whole bucket: never
    assert not d.allowed and math.isinf(d.retry_after_seconds)
    d = await buckets.take("carol", 10, HOUR, 6)
    assert d.allowed and d.remaining == 0


async def test_subjects_have_their_own_buckets(buckets: BucketStore) -> None:
    assert (await buckets.take("dave", 1, HOUR, 1)).allowed
    assert not (await buckets.take("dave", 1, HOUR, 1)).allowed
    assert (await buckets.take("erin", 1, HOUR, 1)).allowed


async def test_a_lower_capacity_applies_at_once(buckets: BucketStore) -> None:
    assert (await buckets.take("frank", 100, HOUR, 1)).remaining == 99
    d = await buckets.take("frank", 10, HOUR, 1)  # the tier's limit was lowered
    assert d.allowed and d.remaining == 9 and d.limit == 10


async def test_concurrent_takes_never_over_allow(buckets: BucketStore) -> None:
    decisions = await asyncio.gather(*(buckets.take("grace", 20, HOUR, 1) for _ in range(60)))
    assert sum(d.allowed for d in decisions) == 20


@pytest.mark.redis
async def test_redis_buckets_are_prefixed_hashes_with_a_ttl(redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    store = RedisBucketStore(redis_url, prefix=redis_prefix)  # Redis TIME as the clock
    d = await store.take("heidi", 100, HOUR, 10)
    assert d.allowed and d.remaining == 90
    r = aioredis.Redis.from_url(redis_url)
    try:
        assert await r.hgetall(redis_prefix + "heidi") != {}
        ttl_ms = await r.pttl(redis_prefix + "heidi")
        assert 0 < ttl_ms <= (d.reset_seconds + 1) * 1000 + 50
        assert d.reset_seconds == pytest.approx(360, abs=1)
    finally:
        await r.aclose()
        await store.close()


def _take_many(path: str, n: int, go, out: multiprocessing.Queue) -> None:  # type: ignore[no-untyped-def,type-arg]
    store = LocalBucketStore(path, slots=1024)
    store.open()
    go.wait(30)  # a barrier: the takes of all processes interleave
    out.put(sum(store.take_now("shared", 50, HOUR, 1).allowed for _ in range(n)))
    store.close_now()


def test_local_table_is_exact_across_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "buckets")
    ctx = multiprocessing.get_context("spawn")
    out, go = ctx.Queue(), ctx.Barrier(3)
    procs = [ctx.Process(target=_take_many, args=(path, 5000, go, out)) for _ in range(3)]
    for p in procs:
        p.start()
    allowed = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(allowed) == 50, allowed  # a refill of 50/h adds < 1 token while the test runs
    # The state is in the file: another process sees the empty bucket.
    again = LocalBucketStore(path)
    assert not again.take_now("shared", 50, HOUR, 1).allowed
    again.close_now()


def test_local_table_survives_being_full(tmp_path: Path) -> None:
    clock = Clock()
    store = LocalBucketStore(tmp_path / "b", slots=64, clock=clock)
    for i in range(200):
        assert store.take_now(f"key{i}", 10, HOUR, 1).allowed
    assert store.evictions > 0  # more live buckets than slots: the fullest were evicted
    clock.t += HOUR  # every bucket full again: slots are reused without eviction
    before = store.evictions
    for i in range(16):  # fewer than a probe run: never a run of live buckets only
        assert store.take_now(f"other{i}", 10, HOUR, 1).remaining == 9
    assert store.evictions == before
    store.close_now()


def test_local_table_refuses_a_foreign_file(tmp_path: Path) -> None:
    from server.ratelimit.buckets import BucketStoreError

    path = tmp_path / "not-a-table"
    path.write_bytes(b"hello world, this is not a bucket table" * 10)
    with pytest.raises(BucketStoreError, match="not a CredScope rate-limit table"):
        LocalBucketStore(path).open()


# --- failover: a real redis-server of the test's own that dies and comes back ---------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture()
def own_redis() -> Iterator[list]:  # type: ignore[type-arg]
    """[port, process] of a redis-server of this test's own (the test may stop and restart it)."""
    port = _free_port()
    box = [port, _start_redis(port)]
    yield box
    _stop(box[1])


async def test_failover_to_local_buckets_and_back(own_redis: list, tmp_path: Path,  # type: ignore[type-arg]
                                                  caplog: pytest.LogCaptureFixture) -> None:
    port = own_redis[0]
    mono = Clock(0.0)
    redis_store = RedisBucketStore(f"redis://127.0.0.1:{port}/0", prefix="t:", timeout=0.5)
    local = LocalBucketStore(tmp_path / "b")
    store = FailoverBucketStore(redis_store, local, retry_seconds=1.0, clock=mono)
    d = await store.take("ivan", 10, HOUR, 1)
    assert d.allowed and d.remaining == 9 and store.fallbacks == 0 and not store.degraded

    _stop(own_redis[1])  # Redis dies: calls are still limited, locally, and counted
    with caplog.at_level("ERROR", logger="credscope.ratelimit"):
        decisions = [await store.take("ivan", 10, HOUR, 1) for _ in range(12)]
    assert sum(d.allowed for d in decisions) == 10 and store.fallbacks == 12 and store.degraded
    assert store.outages == 1 and len([r for r in caplog.records if "failed" in r.message]) == 1

    own_redis[1] = _start_redis(port)  # Redis is back: after retry_seconds, the next take uses it again
    assert (await store.take("ivan", 10, HOUR, 1)).remaining == 0 and store.fallbacks == 13  # not retried yet
    mono.t += 1.5
    d = await store.take("ivan", 10, HOUR, 1)
    assert d.allowed and d.remaining == 9 and not store.degraded and store.fallbacks == 13  # Redis lost its state
    await store.close()


@pytest.mark.redis
async def test_redis_takes_of_one_loop_turn_share_a_round_trip(redis_url: str, redis_prefix: str,
                                                               tmp_path: Path) -> None:
    """Thirty takes on three subjects at once: one EVALSHA, and the very decisions the local table makes for
    the same takes in the same order."""
    clock = Clock()
    redis_store = RedisBucketStore(redis_url, prefix=redis_prefix, clock=clock, timeout=2.0)
    local = LocalBucketStore(tmp_path / "b", clock=clock)
    takes = [(f"s{i % 3}", 10, HOUR, 1 + i % 2) for i in range(30)]
    from_redis = await asyncio.gather(*(redis_store.take(*t) for t in takes))
    assert redis_store.round_trips == 1
    from_local = [local.take_now(*t) for t in takes]
    def rounded(ds):  # type: ignore[no-untyped-def]
        return [(d.allowed, d.limit, d.remaining, round(d.reset_seconds, 6), round(d.retry_after_seconds, 6))
                for d in ds]

    assert rounded(from_redis) == rounded(from_local)
    assert 0 < sum(d.allowed for d in from_redis) < 30
    await redis_store.close()
    local.close_now()
