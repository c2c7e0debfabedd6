"""Redis buckets with a fall-back to the host-local ones: limiting never stops because Redis did.

While Redis answers, every take goes to it. When a take fails, that call and the following ones are
decided by the local store; the outage is logged once, every call decided locally is counted in
``fallbacks`` (exported as ``credscope_ratelimit_fallbacks_total``), and Redis is tried again at most every
``retry_seconds`` (so a dead Redis costs one timeout per period, not one per call). The first take Redis
answers again ends the outage. During an outage the limit holds per host, not across replicas.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from server import metrics
from server.ratelimit.buckets import BucketStore, BucketStoreError, Decision

log = logging.getLogger("credscope.ratelimit")


class FailoverBucketStore:
    def __init__(self, primary: BucketStore, fallback: BucketStore, *, retry_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.primary = primary
        self.fallback = fallback
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.name = f"{primary.name}+{fallback.name}"
        self.fallbacks = 0
        """Takes decided by the fallback because the primary failed."""
        self.outages = 0
        self._down_since: float | None = None
        self._next_try = 0.0

    @property
    def degraded(self) -> bool:
        return self._down_since is not None

    async def take(self, subject: str, capacity: int, period_seconds: float, cost: int) -> Decision:
        if self._down_since is None or self.clock() >= self._next_try:
            try:
                decision = await self.primary.take(subject, capacity, period_seconds, cost)
            except BucketStoreError as e:
                self._failed(e)
            else:
                if self._down_since is not None:
                    log.warning("rate limiting is back on %s after %.1fs on local buckets (%d calls)",
                                self.primary.name, self.clock() - self._down_since, self.fallbacks)
                    self._down_since = None
                return decision
        self.fallbacks += 1
        metrics.ratelimit_fallback()
        return await self.fallback.take(subject, capacity, period_seconds, cost)

    def _failed(self, error: BucketStoreError) -> None:
        now = self.clock()
        self._next_try = now + self.retry_seconds
        if self._down_since is None:
            self._down_since = now
            self.outages += 1
            log.error("rate-limit store %s failed (%s); limiting with local buckets until it answers",
                      self.primary.name, error)

    async def close(self) -> None:
        try:
            await self.primary.close()
        finally:
            await self.fallback.close()
