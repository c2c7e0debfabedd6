"""One contract for every cache backend: the embedded LRU and Redis pass the same suite.

The embedded cache runs on an injected clock; the Redis one on the real test Redis (``redis_url``) under
this test's own key prefix (``redis_prefix``), where Redis itself expires the entries.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from server.backends.cache import (
    CacheBackend,
    CacheSpec,
    MemoryCache,
    RedisCache,
    RedisLink,
    backend_kind,
    open_backends,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """Makes caches of one kind and lets time pass for them."""

    kind: str
    make: Callable[..., CacheBackend]
    advance: Callable[[float], Awaitable[None]]
    short_ttl: float
    """A TTL short enough to wait out (real seconds for Redis, fake ones for the embedded cache)."""


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    made: list[CacheBackend] = []
    if request.param == "memory":
        clock = FakeClock()

        def make_memory(max_items: int = 100, ttl: float = 60.0, namespace: str = "pred") -> CacheBackend:
            cache = MemoryCache(max_items, ttl, clock=clock)
            made.append(cache)
            return cache

        async def tick(seconds: float) -> None:
            clock.now += seconds

        yield Harness("memory", make_memory, tick, short_ttl=5.0)
    else:
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")

        def make_redis(max_items: int = 100, ttl: float = 60.0, namespace: str = "pred") -> CacheBackend:
            link = RedisLink(url, timeout=2.0, retry_seconds=0.1)
            cache = RedisCache(link, f"{prefix}{namespace}:", ttl)
            made.append(cache)
            return cache

        async def sleep(seconds: float) -> None:
            await asyncio.sleep(seconds)

        yield Harness("redis", make_redis, sleep, short_ttl=1.5)
    for cache in made:
        await cache.close()


async def test_get_set_roundtrip_and_overwrite(harness: Harness) -> None:
    c = harness.make()
    assert await c.get("a") is None
    await c.set("a", b"1")
    await c.set("bin", b"\x00\xff" * 50)
    await c.set("empty", b"")
    assert await c.get("a") == b"1"
    assert await c.get("bin") == b"\x00\xff" * 50
    assert await c.get("empty") == b""
    await c.set("a", b"2")
    assert await c.get("a") == b"2"
    assert await c.size() == 3


async def test_mget_mset_keep_order_and_report_missing(harness: Harness) -> None:
    c = harness.make()
    assert await c.mget([]) == []
    await c.mset([])
    await c.mset([(f"k{i}", str(i).encode()) for i in range(10)])
    keys = ["k3", "nope", "k0", "k9", "k3"]
    assert await c.mget(keys) == [b"3", None, b"0", b"9", b"3"]
    assert await c.size() == 10


async def test_stats_count_hits_misses_and_rate(harness: Harness) -> None:
    c = harness.make()
    assert c.stats.hit_rate == 0.0
    await c.set("x", b"v")
    await c.get("x")
    await c.get("y")
    await c.mget(["x", "x", "z"])
    s = c.stats.as_dict()
    assert (s["hits"], s["misses"], s["errors"], s["sets"]) == (3, 2, 0, 1)
    assert s["hit_rate"] == pytest.approx(0.6)


async def test_clear_counts_removed_and_leaves_other_namespaces(harness: Harness) -> None:
    pred = harness.make(namespace="pred")
    expl = harness.make(namespace="expl")
    assert await pred.clear() == 0
    await pred.mset([(f"p{i}", b"x") for i in range(7)])
    await expl.mset([(f"e{i}", b"y") for i in range(3)])
    assert await pred.clear() == 7
    assert await pred.size() == 0
    assert await pred.get("p0") is None
    assert await expl.size() == 3 and await expl.get("e2") == b"y"
    await pred.set("p0", b"again")  # usable after a clear
    assert await pred.get("p0") == b"again"


async def test_entries_expire_after_the_ttl(harness: Harness) -> None:
    ttl = harness.short_ttl
    c = harness.make(ttl=ttl)
    long = harness.make(ttl=3600.0, namespace="long")
    await c.mset([("a", b"1"), ("b", b"2")])
    await long.set("a", b"kept")
    assert await c.size() == 2
    # Past the TTL (Redis expires on its own clock: allow it a bounded grace).
    await harness.advance(ttl * 1.5)
    for _ in range(40):
        if await c.mget(["a", "b"]) == [None, None]:
            break
        await harness.advance(ttl / 4)
    assert await c.mget(["a", "b"]) == [None, None]
    assert await c.size() == 0
    assert await long.get("a") == b"kept"


async def test_set_renews_the_ttl(harness: Harness) -> None:
    ttl = harness.short_ttl
    c = harness.make(ttl=ttl)
    await c.set("k", b"old")
    await harness.advance(ttl * 0.5)
    await c.set("k", b"new")  # a fresh write gets a fresh TTL
    await harness.advance(ttl * 0.6)  # past the first write's expiry, within the second's
    assert await c.get("k") == b"new"


async def test_redis_keys_carry_the_prefix_and_a_redis_ttl(redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    [(_, cache)] = open_backends(redis_url, {"pred": CacheSpec(10, 30.0)}, key_prefix=redis_prefix,
                                 timeout=2.0).items()
    try:
        await cache.mset([("v1:abc", b"x"), ("v1:def", b"y")])
        await cache.set("v1:ghi", b"z")
        r = aioredis.Redis.from_url(redis_url)
        try:
            keys = sorted([k.decode() async for k in r.scan_iter(match=f"{redis_prefix}*")])
            assert keys == [f"{redis_prefix}pred:v1:{k}" for k in ("abc", "def", "ghi")]
            for k in keys:
                assert 0 < await r.pttl(k) <= 30_000
        finally:
            await r.aclose()
    finally:
        await cache.close()


async def test_redis_clear_treats_glob_characters_in_the_prefix_literally(redis_url: str,
                                                                         redis_prefix: str) -> None:
    link = RedisLink(redis_url, timeout=2.0, retry_seconds=0.1)
    star = RedisCache(link, f"{redis_prefix}a*", 60)
    other = RedisCache(link, f"{redis_prefix}ab", 60)
    try:
        await star.set("1", b"x")
        await other.mset([("1", b"y"), ("2", b"z")])
        assert await star.clear() == 1
        assert await other.size() == 2
    finally:
        await link.close()


def test_memory_lru_evicts_the_least_recently_used() -> None:
    async def run() -> None:
        c = MemoryCache(3, 60.0)
        await c.mset([("a", b"1"), ("b", b"2"), ("c", b"3")])
        assert await c.get("a") == b"1"  # a is now the most recently used
        await c.set("d", b"4")  # evicts b
        assert await c.mget(["a", "b", "c", "d"]) == [b"1", None, b"3", b"4"]
        await c.set("c", b"33")  # an overwrite uses c, evicts nothing
        await c.mset([("e", b"5"), ("f", b"6")])  # evict a, d
        assert await c.mget(["a", "c", "d", "e", "f"]) == [None, b"33", None, b"5", b"6"]
        assert await c.size() == 3
        assert c.stats.evictions == 3

    asyncio.run(run())


def test_memory_batch_calls_equal_one_call_per_key() -> None:
    """mset / mget (one pass under one lock) leave the same entries, in the same LRU order, answer the same and
    count the same as set / get key by key — overwrites, repeated keys, a batch larger than the cache,
    expired keys — except that an mset counts as evicted the entries it pushed out (a key the same batch also
    writes stays, refreshed, where one set at a time may evict it first and write it back)."""
    clock = FakeClock()
    batches = [[("a", b"1"), ("b", b"2"), ("c", b"3")], [("b", b"22"), ("d", b"4"), ("b", b"222")],
               [(f"k{i}", bytes([i])) for i in range(7)] + [("a", b"11")]]

    async def run(batched: bool) -> tuple[list[tuple[str, bytes]], list[list[bytes | None]], dict[str, float]]:
        c = MemoryCache(5, 10.0, clock=clock)
        got = []
        for n, items in enumerate(batches):
            if batched:
                before, evicted = set(c._data), c.stats.evictions  # noqa: SLF001
                await c.mset(items)
                pushed_out = (before | {k for k, _ in items}) - set(c._data)  # noqa: SLF001
                assert c.stats.evictions - evicted == len(pushed_out)
            else:
                for k, v in items:
                    await c.set(k, v)
            clock.now += 4 if n == 0 else 0
            keys = ["a", "b", "zz", "k6", "k1", "a"]
            got.append(await c.mget(keys) if batched else [await c.get(k) for k in keys])
        clock.now += 11  # everything expired
        got.append(await c.mget(["a", "k6"]) if batched else [await c.get("a"), await c.get("k6")])
        stats = c.stats.as_dict()
        stats.pop("evictions")
        return [(k, v) for k, (_, v) in c._data.items()], got, stats  # noqa: SLF001

    start = clock.now
    one_by_one = asyncio.run(run(False))
    clock.now = start
    assert asyncio.run(run(True)) == one_by_one
    assert one_by_one[2]["expirations"] == 2 and one_by_one[2]["sets"] == 14


def test_memory_expired_entries_are_not_counted_as_removed() -> None:
    clock = FakeClock()

    async def run() -> None:
        c = MemoryCache(10, 10.0, clock=clock)
        await c.set("old", b"1")
        clock.now += 6
        await c.set("new", b"2")
        clock.now += 5  # old expired, new alive
        assert await c.clear() == 1

    asyncio.run(run())


def test_memory_cache_is_thread_safe_and_bounded() -> None:
    c = MemoryCache(50, 60.0)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        async def run() -> None:
            for i in range(2000):
                key = f"k{(seed * 7919 + i) % 200}"
                if i % 3:
                    await c.set(key, key.encode())
                else:
                    value = await c.get(key)
                    assert value in (None, key.encode())
        try:
            asyncio.run(run())
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert time.monotonic() - started < 60
    assert errors == []
    assert asyncio.run(c.size()) <= 50
    assert c.stats.hits + c.stats.misses == 4 * 667


def test_factory_by_url_scheme() -> None:
    assert backend_kind(None) == backend_kind("") == backend_kind("memory://") == "memory"
    assert backend_kind("redis://h:1/0") == backend_kind("rediss://h/0") == backend_kind("unix:///tmp/r.sock") == \
        "redis"
    with pytest.raises(ValueError, match="unsupported cache URL scheme 'memcached'"):
        backend_kind("memcached://h")
    caches = open_backends(None, {"pred": CacheSpec(5, 1.0), "expl": CacheSpec(2, 2.0)})
    assert {k: (type(v).__name__, v.ttl_seconds) for k, v in caches.items()} == {
        "pred": ("MemoryCache", 1.0), "expl": ("MemoryCache", 2.0)}
    assert isinstance(caches["pred"], CacheBackend)
