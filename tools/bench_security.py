"""``credscope-bench-security``: what the security chain costs per call, measured piece by piece.

Times, on this machine: a take on the host-local bucket table, a take on Redis (one EVALSHA round trip; when
``--redis-url`` is given), a key verification served from the worker's cache, a usage-counter increment, and
the whole per-call work of the auth and rate-limit interceptors together. Each figure is the mean over
``--seconds`` of calls in a loop (one event loop, one process), as wall time and as this process's CPU time
(the cost a worker pays; steadier than wall time on a busy machine). Uses temporary files and its own Redis
key prefix (deleted afterwards); touches no real key store.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from server.auth import keys
from server.auth.store import open_key_store
from server.auth.usage import UsageRecorder
from server.auth.verifier import KeyVerifier
from server.ratelimit.limiter import RateLimiter
from server.ratelimit.local import LocalBucketStore
from server.ratelimit.redis_store import RedisBucketStore
from server.settings import RateLimitSettings

BIG = 10**9  # a bucket that never runs dry while measuring


async def _measure(name: str, seconds: float, fn: Callable[[int], Awaitable[object] | object]) -> float:
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    deadline = start + seconds
    while True:
        for _ in range(200):
            r = fn(n)
            if asyncio.iscoroutine(r):
                await r
            n += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    us = (now - start) / n * 1e6
    cpu_us = (time.process_time() - cpu) / n * 1e6
    print(f"{name:<50} {us:8.1f} µs/call wall {cpu_us:8.1f} µs CPU   ({n:,} calls)", flush=True)
    return us


async def _concurrent(name: str, seconds: float, fn: Callable[[int], Awaitable[object]], concurrency: int) -> None:
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        await asyncio.gather(*(fn(n + i) for i in range(concurrency)))
        n += concurrency
    rate = n / (time.perf_counter() - start)
    cpu_us = (time.process_time() - cpu) / n * 1e6
    print(f"{name:<50} {rate:8,.0f} takes/s  {cpu_us:8.1f} µs CPU   ({concurrency} in flight)", flush=True)


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalBucketStore(Path(tmp) / "buckets")
        local.open()
        await _measure("local table take (1 subject)", args.seconds,
                       lambda i: local.take_now("bench", BIG, 3600, 1))
        await _measure("local table take (10,000 subjects)", args.seconds,
                       lambda i: local.take_now(f"k{i % 10_000}", BIG, 3600, 1))
        if args.redis_url:
            prefix = f"credscope-bench:{uuid.uuid4().hex[:8]}:"
            redis = RedisBucketStore(args.redis_url, prefix=prefix, timeout=1.0)
            await redis.take("warm", BIG, 3600, 1)
            await _measure("Redis take, one at a time (EVALSHA round trip)", args.seconds,
                           lambda i: redis.take("bench", BIG, 3600, 1))
            await _concurrent("Redis take, concurrent", args.seconds,
                              lambda i: redis.take(f"k{i % 1000}", BIG, 3600, 1), 32)
            found = [k async for k in redis.redis.scan_iter(match=f"{prefix}*", count=1000)]
            if found:
                await redis.redis.delete(*found)
            await redis.close()
        store = await open_key_store(f"sqlite:///{tmp}/keys.db")
        record, api_key = keys.generate("bench", "enterprise")
        await store.create(record)
        verifier = KeyVerifier(store, cache_seconds=3600)
        await verifier.verify(api_key)
        await _measure("key verification (cache hit: SHA-256 + compare)", args.seconds,
                       lambda i: verifier.verify(api_key))
        usage = UsageRecorder(store, flush_seconds=3600)
        await _measure("usage counter increment", args.seconds,
                       lambda i: usage.record("k", "pro", rate_limited=False))
        limiter = RateLimiter(local, RateLimitSettings(enterprise_per_hour=BIG))

        async def chain(i: int) -> None:
            p = await verifier.verify(api_key)
            await limiter.take(p.key_id, p.tier, 1)
            usage.record(p.key_id, p.tier, rate_limited=False)

        await _measure("auth + rate limit + usage, local table", args.seconds, chain)
        await store.close()
        local.close_now()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="credscope-bench-security",
                                description="Measure the per-call cost of API-key auth and rate limiting.")
    p.add_argument("--seconds", type=float, default=1.0, help="time per measurement (default 1)")
    p.add_argument("--redis-url", help="also measure Redis buckets, e.g. redis://127.0.0.1:6379/0")
    args = p.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
