"""Rate limiting: a token bucket per API key (per peer for anonymous dev-mode calls), sized by tier.

Runs after :mod:`server.interceptors.auth`. Every answered call carries ``x-ratelimit-limit`` (the bucket's
capacity = the tier's hourly limit), ``x-ratelimit-remaining`` (whole tokens left) and ``x-ratelimit-reset``
(whole seconds until the bucket is full again). A call the bucket cannot pay for gets RESOURCE_EXHAUSTED
with ``QuotaFailure`` and ``RetryInfo`` (when it may pay later); a BatchScore that costs more than the
whole bucket gets ``QuotaFailure`` only: retrying cannot help, smaller batches can. BatchScore costs
``rate_limit.batch_cost_per_applicant`` tokens per applicant (at least 1; counted up to
``server.max_batch_size``), every other call 1. Each call is counted for the per-key usage statistics.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from google.protobuf import any_pb2

from server import context as rc
from server import metrics
from server.auth.usage import UsageRecorder
from server.errors import RateLimited
from server.interceptors.auth import ANONYMOUS
from server.interceptors.base import AroundInterceptor, Behavior
from server.ratelimit.limiter import Limited, RateLimiter

BATCH_SCORE = "/credscope.v1.ScoringService/BatchScore"


class CostOverLimit(RateLimited):
    """A call that costs more than the whole bucket: no RetryInfo, since waiting cannot help."""

    reason = "COST_OVER_LIMIT"

    def details(self) -> list[any_pb2.Any]:
        return super().details()[:1]


def headers(limited: Limited) -> dict[str, str]:
    d = limited.decision
    return {"x-ratelimit-limit": str(d.limit), "x-ratelimit-remaining": str(max(0, d.remaining)),
            "x-ratelimit-reset": str(math.ceil(d.reset_seconds - 1e-6) if d.reset_seconds > 0 else 0)}


class RateLimitInterceptor(AroundInterceptor):
    """``limiter`` None = limits off (calls are still counted); ``max_batch`` caps the BatchScore cost."""

    def __init__(self, limiter: RateLimiter | None, usage: UsageRecorder | None = None, *,
                 max_batch: int = 1000) -> None:
        self.limiter = limiter
        self.usage = usage
        self.max_batch = max_batch

    async def around(self, method: str, behavior: Behavior, request: Any,
                     context: grpc.aio.ServicerContext) -> Any:
        ctx = rc.current()
        principal = ctx.principal if ctx is not None else None
        if principal is None:  # auth did not run for this method: nothing to charge
            return await behavior(request, context)
        usage_id = ANONYMOUS if principal.key_id.startswith(ANONYMOUS + ":") else principal.key_id
        if self.limiter is None:
            if self.usage is not None:
                self.usage.record(usage_id, principal.tier, rate_limited=False)
            return await behavior(request, context)
        applicants = min(len(request.applicants), self.max_batch) if method == BATCH_SCORE else None
        limited = await self.limiter.take(principal.key_id, principal.tier, self.limiter.cost(applicants))
        d = limited.decision
        ctx.response_metadata.update(headers(limited))  # type: ignore[union-attr]
        if self.usage is not None:
            self.usage.record(usage_id, principal.tier, rate_limited=not d.allowed)
        if d.allowed:
            return await behavior(request, context)
        metrics.ratelimit_rejected(principal.tier)
        quota = f"{d.limit} tokens an hour for the {principal.tier} tier"
        subject = f"api_key:{principal.key_id}" if usage_id != ANONYMOUS else principal.key_id
        if math.isinf(d.retry_after_seconds):
            raise CostOverLimit(f"this call costs {limited.cost} tokens, more than the {principal.tier} tier's "
                                f"whole bucket of {d.limit}; send smaller batches",
                                subject=subject, retry_after_seconds=0, limit_description=quota)
        raise RateLimited(f"rate limit exceeded: {quota}, this call costs {limited.cost}; retry in "
                          f"{math.ceil(d.retry_after_seconds)}s", subject=subject,
                          retry_after_seconds=d.retry_after_seconds, limit_description=quota)
