"""Metrics interceptor: counts every application call by method and status code and times it.

It sits right inside tracing and outside the request-id interceptor, so it sees the final status of
every call, including the rich-status aborts of the interceptors inside it. Health checks and
reflection are not counted.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from grpc.aio import AbortError

from server import context as rc
from server import metrics
from server.interceptors.base import AroundInterceptor, Behavior
from server.interceptors.tracing import call_status


class MetricsInterceptor(AroundInterceptor):
    async def around(self, method: str, behavior: Behavior, request: Any,
                     context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = "UNKNOWN"
        try:
            response = await behavior(request, context)
            code = call_status(context, grpc.StatusCode.OK).name
            return response
        except AbortError:
            code = call_status(context, grpc.StatusCode.UNKNOWN).name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            ctx = rc.current()
            principal = ctx.principal if ctx is not None else None
            # Key usage by tier: calls with a key (dev mode's anonymous callers are not counted).
            tier = principal.tier if principal is not None and not principal.key_id.startswith("anonymous:") else None
            metrics.rpc_done(method, code, time.perf_counter() - started, tier)
