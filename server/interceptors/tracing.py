"""Tracing interceptor (outermost): one SERVER span per RPC, following the OpenTelemetry RPC conventions.

The span continues the caller's W3C ``traceparent`` (and ``tracestate``) from the call metadata, is
named ``credscope.v1.ScoringService/Score``, and carries ``rpc.system=grpc``, ``rpc.service``,
``rpc.method`` and ``rpc.grpc.status_code``; server faults (UNKNOWN, DEADLINE_EXCEEDED,
UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) set the span status to ERROR, client faults do not.
Being outermost, it sees the rich-status aborts of the inner interceptors as the call's final status.

Written here rather than taken from opentelemetry-instrumentation-grpc, whose grpc.aio server side
mishandles ``abort(trailing_metadata=...)`` (opentelemetry-python-contrib #2065, #3066) — the path
every CredScope error takes — and which would not share this chain's wrapper and filters.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc.aio import AbortError
from opentelemetry import propagate
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from server import context as rc
from server import tracing
from server.interceptors.base import AroundInterceptor, Behavior
from server.metrics import split_method

#: Status codes that are the server's fault (OpenTelemetry's gRPC server-span rule).
SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                           grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


class _Metadata(Getter[dict[str, str]]):
    """A getter over the call metadata for the propagator (keys are lower case in gRPC)."""

    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        value = carrier.get(key.lower())
        return [value] if value is not None else None

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _Metadata()
#: Only these metadata entries reach the propagator (never x-api-key or anything else a caller sent).
_PROPAGATION_KEYS = frozenset({"traceparent", "tracestate", "baggage"})


def call_status(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    """The status code the call ended with (set by ``abort`` or ``set_code``), else ``default``."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - experimental API; fall back rather than fail the call
        return default
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c
    return default


class TracingInterceptor(AroundInterceptor):
    """Traces every application call (health checks and reflection pass untraced)."""

    async def around(self, method: str, behavior: Behavior, request: Any,
                     context: grpc.aio.ServicerContext) -> Any:
        carrier = {k: v for k, v in (context.invocation_metadata() or ())
                   if k in _PROPAGATION_KEYS and isinstance(v, str)}
        parent = propagate.extract(carrier, getter=_GETTER) if carrier else None
        service, name = split_method(method)
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        with tracing.tracer().start_as_current_span(
                f"{service}/{name}", context=parent, kind=SpanKind.SERVER, attributes=attributes,
                record_exception=False, set_status_on_exception=False) as span:
            code = grpc.StatusCode.OK
            try:
                response = await behavior(request, context)
                code = call_status(context, grpc.StatusCode.OK)
                return response
            except AbortError:
                code = call_status(context, grpc.StatusCode.UNKNOWN)
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:
                code = grpc.StatusCode.UNKNOWN
                span.record_exception(e)
                raise
            finally:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                ctx = rc.current()
                if ctx is not None:
                    span.set_attribute("credscope.request_id", ctx.request_id)
                    if ctx.principal is not None:
                        span.set_attribute("credscope.tier", ctx.principal.tier)
                if code in SERVER_FAULTS:
                    span.set_status(Status(StatusCode.ERROR, code.name))
