"""Buckets in Redis, shared by every replica: one Lua script per take (EVALSHA, one round trip, atomic).

A bucket is a hash at ``<prefix><subject>`` with fields ``t`` (tokens) and ``u`` (last update, seconds).
The script reads the clock with Redis ``TIME`` so replicas with skewed clocks agree, applies the same
refill-and-take rule as :func:`server.ratelimit.buckets.decide`, writes the bucket back and sets its TTL to
the time until it is full again (plus a second): a full bucket is the same as no bucket. Tests may pass a
clock; servers never do.

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

TAKE_LUA = """
-- KEYS[1]: the bucket. ARGV: capacity, period (s), cost, now (s; '' = Redis TIME)
local capacity = tonumber(ARGV[1])
local rate = capacity / tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now
if ARGV[4] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[4])
end
local state = redis.call('HMGET', KEYS[1], 't', 'u')
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
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'u', string.format('%.6f', updated))
redis.call('PEXPIRE', KEYS[1], math.ceil(reset * 1000) + 1000)
return {allowed, string.format('%.17g', tokens), string.format('%.17g', reset), string.format('%.17g', retry)}
"""


class RedisBucketStore:
    name = "redis"

    def __init__(self, url: str, *, prefix: str = "credscope:ratelimit:", timeout: float = 0.1,
                 clock: Callable[[], float] | None = None) -> None:
        self.prefix = prefix
        self.clock = clock
        self.timeout = timeout
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                             retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        self._script = self.redis.register_script(TAKE_LUA)

    async def take(self, subject: str, capacity: int, period_seconds: float, cost: int) -> Decision:
        now = "" if self.clock is None else repr(self.clock())
        try:
            allowed, tokens, reset, retry = await self._script(
                keys=[self.prefix + subject], args=[capacity, repr(float(period_seconds)), cost, now])
        except (TimeoutError, RedisError, OSError) as e:
            raise BucketStoreError(f"Redis rate-limit store failed: {type(e).__name__}") from e
        left = float(tokens)
        retry_s = float(retry)
        return Decision(bool(allowed), capacity, int(math.floor(left + 1e-9)), float(reset),
                        math.inf if retry_s < 0 else retry_s)

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), timeout=self.timeout * 2))
        except (TimeoutError, RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.redis.aclose()
