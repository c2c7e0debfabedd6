"""The rate limiter: a token bucket per caller, sized by tier, in the configured bucket store.

Capacity = the tier's hourly limit (``rate_limit.{free,pro,enterprise}_per_hour``), refilled evenly over
the hour. BatchScore costs ``rate_limit.batch_cost_per_applicant`` tokens per applicant (at least 1); every
other call costs 1. Buckets live in Redis when ``rate_limit.redis_url`` is set (with the host-local table as
fall-back), else in the host-local table.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.ratelimit.buckets import BucketStore, Decision
from server.ratelimit.failover import FailoverBucketStore
from server.ratelimit.local import LocalBucketStore
from server.ratelimit.redis_store import RedisBucketStore
from server.settings import RateLimitSettings

PERIOD_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Limited:
    """What the interceptor needs to answer: the decision, the cost and the subject it applied to."""

    decision: Decision
    cost: int
    subject: str


class RateLimiter:
    def __init__(self, store: BucketStore, settings: RateLimitSettings) -> None:
        self.store = store
        self.settings = settings
        self.limits = {"free": settings.free_per_hour, "pro": settings.pro_per_hour,
                       "enterprise": settings.enterprise_per_hour}

    @classmethod
    def from_settings(cls, settings: RateLimitSettings) -> RateLimiter:
        local = LocalBucketStore(settings.local_path, slots=settings.local_slots)
        store: BucketStore = local
        if settings.redis_url:
            redis = RedisBucketStore(settings.redis_url, prefix=settings.key_prefix,
                                     timeout=settings.redis_timeout_seconds)
            store = FailoverBucketStore(redis, local, retry_seconds=settings.redis_retry_seconds)
        return cls(store, settings)

    def limit(self, tier: str) -> int:
        return self.limits.get(tier, self.settings.free_per_hour)

    def cost(self, applicants: int | None) -> int:
        """Tokens a call costs: 1, or for BatchScore the applicants times the per-applicant cost (min 1)."""
        if applicants is None:
            return 1
        return max(1, applicants * self.settings.batch_cost_per_applicant)

    async def take(self, subject: str, tier: str, cost: int) -> Limited:
        decision = await self.store.take(subject, self.limit(tier), PERIOD_SECONDS, cost)
        return Limited(decision, cost, subject)

    def open(self) -> None:
        """Attach to the host-local table now (it is otherwise opened by the first take)."""
        store = self.store.fallback if isinstance(self.store, FailoverBucketStore) else self.store
        if isinstance(store, LocalBucketStore):
            store.open()

    @property
    def fallbacks(self) -> int:
        """Calls limited with local buckets because Redis failed (0 without Redis)."""
        return self.store.fallbacks if isinstance(self.store, FailoverBucketStore) else 0

    async def close(self) -> None:
        await self.store.close()
