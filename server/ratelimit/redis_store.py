"""Buckets in Redis, shared by every replica: one Lua script per round trip (EVALSHA), atomic.

A bucket is a hash at ``<prefix><subject>`` with fields ``t`` (tokens) and ``u`` (last update, seconds).
The script reads the clock with Redis ``TIME`` so replicas with skewed clocks agree, applies the same
refill-and-take rule as :func:`server.ratelimit.buckets.decide`, writes the bucket back and sets its TTL to
the time until it is full again (plus a second): a full bucket is the same as no bucket. Tests may pass a
clock; servers never do.

Takes that arrive in the same event-loop turn go to Redis together: one EVALSHA over all their buckets
(applied in arrival order, atomically), so under load a worker pays one round trip per turn instead of one
per call. A batch names several keys, which standalone Redis (and Sentinel) accept; a Redis Cluster would
need a hash tag in ``rate_limit.key_prefix`` (e.g. ``{credscope}:ratelimit:``).

Driver errors and timeouts become :class:`~server.ratelimit.buckets.BucketStoreError`. The client retries
once, at once, only when a connection turns out broken (a pooled connection left over from before a Redis
restart); never after a timeout, which may have charged already. The failover store decides the rest.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from server.ratelimit.buckets import BucketStoreError, Decision
from server.redis_packing import hiredis_packing

TAKE_LUA = """
-- KEYS: the buckets. ARGV[1]: now (s; '' = Redis TIME); then per bucket: capacity, period (s), cost.
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local out = {}
for i = 1, #KEYS do
  local capacity = tonumber(ARGV[i * 3 - 1])
  local rate = capacity / tonumber(ARGV[i * 3])
  local cost = tonumber(ARGV[i * 3 + 1])
  local state = redis.call('HMGET', KEYS[i], 't', 'u')
  local tokens = tonumber(state[1])
  local updated = tonumber(state[2])
  if tokens == nil or updated == nil then
    tokens = capacity
    updated = now
  end
  if now > updated then
    tokens = math.min(capacity, tokens + (now - updated) * rate)
    updated = now
  else
    tokens = math.min(capacity, tokens)
  end
  local allowed = 0
  local retry = 0
  if cost <= tokens then
    tokens = tokens - cost
    allowed = 1
  elseif cost > capacity then
    retry = -1
  else
    retry = (cost - tokens) / rate
  end
  local reset = (capacity - tokens) / rate
  redis.call('HSET', KEYS[i], 't', string.format('%.17g', tokens), 'u', string.format('%.6f', updated))
  redis.call('PEXPIRE', KEYS[i], math.ceil(reset * 1000) + 1000)
  out[#out + 1] = allowed
  out[#out + 1] = string.format('%.17g', tokens)
  out[#out + 1] = string.format('%.17g', reset)
  out[#out + 1] = string.format('%.17g', retry)
end
return out
"""

MAX_BATCH = 256

_Pending = tuple[str, int, float, int, "asyncio.Future[Decision]"]


class RedisBucketStore:
    name = "redis"

    def __init__(self, url: str, *, prefix: str = "credscope:ratelimit:", timeout: float = 0.1,
                 clock: Callable[[], float] | None = None) -> None:
        self.prefix = prefix
        self.clock = clock
        self.timeout = timeout
        self.redis = hiredis_packing(aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))))
        self._script = self.redis.register_script(TAKE_LUA)
        self._pending: list[_Pending] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self.round_trips = 0

    async def take(self, subject: str, capacity: int, period_seconds: float, cost: int) -> Decision:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        self._pending.append((subject, capacity, period_seconds, cost, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), MAX_BATCH):
            task = asyncio.get_running_loop().create_task(self._send(pending[i:i + MAX_BATCH]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        args: list[str | int | float] = ["" if self.clock is None else repr(self.clock())]
        for _, capacity, period, cost, _f in batch:
            args += [capacity, repr(float(period)), cost]
        try:
            self.round_trips += 1
            out = await self._script(keys=[self.prefix + p[0] for p in batch], args=args)
        except (TimeoutError, RedisError, OSError) as e:
            error = BucketStoreError(f"Redis rate-limit store failed: {type(e).__name__}")
            for p in batch:
                if not p[4].done():
                    p[4].set_exception(error)
            return
        except BaseException as e:  # cancelled at shutdown, or a bug: no caller waits forever
            for p in batch:
                if not p[4].done():
                    p[4].set_exception(BucketStoreError(f"Redis rate-limit take interrupted: {type(e).__name__}"))
            raise
        for i, p in enumerate(batch):
            if p[4].done():
                continue
            allowed, tokens, reset, retry = out[4 * i:4 * i + 4]
            retry_s = float(retry)
            p[4].set_result(Decision(bool(allowed), p[1], int(math.floor(float(tokens) + 1e-9)), float(reset),
                                     math.inf if retry_s < 0 else retry_s))

    async def close(self) -> None:
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        await self.redis.aclose()
