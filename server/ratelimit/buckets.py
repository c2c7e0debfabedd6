"""The bucket-store protocol and the token-bucket rule every store applies.

A bucket holds at most ``capacity`` tokens and refills at ``capacity / period`` tokens a second (the
hourly limit spread over the hour). A call costing ``cost`` tokens is allowed when the bucket holds at least
``cost``; a refused call takes nothing. A cost above the capacity can never be allowed.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol


class BucketStoreError(Exception):
    """A bucket store could not answer (wraps the driver's errors)."""


class Decision(NamedTuple):
    """The outcome of one :meth:`BucketStore.take` (a named tuple: cheap to make on every call)."""

    allowed: bool
    limit: int
    """The bucket's capacity: calls per period."""
    remaining: int
    """Whole tokens left after this call."""
    reset_seconds: float
    """Seconds until the bucket is full again (0 when full)."""
    retry_after_seconds: float
    """For a refused call: seconds until the cost is available; ``inf`` when it never will be."""


class BucketStore(Protocol):
    """Where the buckets live. ``take`` is atomic: concurrent takes on one subject never over-allow."""

    name: str

    async def take(self, subject: str, capacity: int, period_seconds: float, cost: int) -> Decision:
        """Take ``cost`` tokens from ``subject``'s bucket if it holds them."""

    async def close(self) -> None:
        """Release connections and files."""


def refill(tokens: float, updated: float, now: float, capacity: float, rate: float) -> float:
    """Tokens in a bucket at ``now`` that held ``tokens`` at ``updated``."""
    return min(float(capacity), tokens + max(0.0, now - updated) * rate)


def decide(tokens: float, capacity: int, rate: float, cost: int) -> tuple[Decision, float]:
    """Apply a take to a refilled bucket: the decision and the tokens left. (The Redis Lua script does the
    same arithmetic.)"""
    if cost <= tokens:
        tokens -= cost
        allowed, retry = True, 0.0
    elif cost > capacity:
        allowed, retry = False, math.inf
    else:
        allowed, retry = False, (cost - tokens) / rate
    reset = (capacity - tokens) / rate
    return Decision(allowed, capacity, int(math.floor(tokens + 1e-9)), reset, retry), tokens
