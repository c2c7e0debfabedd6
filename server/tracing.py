"""OpenTelemetry traces: the TracerProvider of a worker and a ``span`` helper for child spans.

Tracing is on when an OTLP endpoint is configured (``CREDSCOPE_TELEMETRY__OTLP_ENDPOINT`` or the
standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); spans then go in
batches to an OTLP/gRPC collector. The SDK reads its other standard variables itself
(``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_TRACES_SAMPLER``, ...).

When tracing is off, :func:`span` returns a shared no-op context manager, so instrumented code costs
next to nothing. The RPC span itself comes from :class:`server.interceptors.tracing.TracingInterceptor`.

Attributes carry what helps operators (model version, decision, from_cache, batch size, cache name);
never applicant data, API keys or anything a caller sent as a value.

Usage (the cache, explanation and audit components)::

    from server import tracing

    with tracing.span("credscope.cache.get", cache="prediction") as sp:
        hit = await cache.get(key)
        tracing.set_attributes(sp, hit=hit is not None)
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from server.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("credscope.tracing")

#: Instrumentation scope of CredScope's spans.
SCOPE = "credscope.server"
#: Prefix of CredScope's own span attributes (``model_version`` -> ``credscope.model_version``).
PREFIX = "credscope."

_NULL = contextlib.nullcontext(None)
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def endpoint(settings: Settings) -> str | None:
    """The OTLP endpoint traces go to, or None when tracing is off."""
    return settings.telemetry.otlp_endpoint or settings.otel_exporter_otlp_endpoint


def setup(settings: Settings, exporter: SpanExporter | None = None) -> bool:
    """Install this process's TracerProvider when tracing is configured (or ``exporter`` is given).

    Returns whether tracing is on. Call once per process, after any fork.
    """
    global _provider, _tracer
    target = endpoint(settings)
    if exporter is None and not target:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # The explicit setting wins; otherwise the exporter reads the OTEL_* variables (endpoint, headers,
        # certificates, insecure) itself.
        exporter = OTLPSpanExporter(endpoint=settings.telemetry.otlp_endpoint) \
            if settings.telemetry.otlp_endpoint else OTLPSpanExporter()
    resource = Resource.create({
        "service.name": settings.telemetry.service_name,
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
        "process.pid": os.getpid(),
    })
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    _tracer = provider.get_tracer(SCOPE)
    log.info("tracing on: OTLP/gRPC export to %s", target or "the given exporter")
    return True


def shutdown() -> None:
    """Flush the spans still waiting and stop exporting."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = None
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def tracer() -> trace.Tracer:
    """CredScope's tracer (a no-op one while tracing is off)."""
    return _tracer or trace.NoOpTracer()


def attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """``{"model_version": v}`` -> ``{"credscope.model_version": v}``; None values are left out."""
    return {(k if "." in k else PREFIX + k): v for k, v in attrs.items() if v is not None}


def span(name: str, **attrs: Any) -> contextlib.AbstractContextManager[trace.Span | None]:
    """A child span of the current one (``with span("credscope.inference", batch_size=3) as sp``).

    Keyword attributes get the ``credscope.`` prefix. Yields None while tracing is off.
    """
    t = _tracer
    if t is None:
        return _NULL
    return t.start_as_current_span(name, attributes=attributes(attrs))


def set_attributes(sp: trace.Span | None = None, **attrs: Any) -> None:
    """Add attributes to ``sp`` (default: the current span, e.g. the RPC span in a servicer)."""
    if _tracer is None:
        return
    target = sp if sp is not None else trace.get_current_span()
    if target.is_recording():
        target.set_attributes(attributes(attrs))
