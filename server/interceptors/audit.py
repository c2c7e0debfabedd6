"""Audit interceptor: every call (success or error) leaves an entry in the audit trail.

Placed right after the request-id interceptor, so it sees every call the chain handles, including those
that auth or rate limiting reject. It watches the call's outcome on the way out (a
:class:`~server.errors.CredScopeError`, an abort by an inner interceptor, a cancellation, anything
unexpected) and, in its ``finally``, hands the :class:`~server.audit.records.AuditEntry` — the call's
``api_usage`` row plus the prediction records the servicer left in the
:class:`~server.context.RequestContext` — to the worker's :class:`~server.audit.writer.AuditWriter`.

In ``async`` durability that is a queue append and the call answers at once. In ``sync`` durability the
call answers only once its record is durable; if that cannot happen in time, a call that would have
succeeded answers UNAVAILABLE instead (a failed call keeps its own error).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from grpc.aio import AbortError

from server import context as rc
from server import tracing
from server.audit.records import AuditEntry, PredictionBatch, PredictionRecord, UsageRecord
from server.audit.writer import AuditUnavailable, AuditWriter
from server.errors import CredScopeError, Unavailable, internal
from server.interceptors.base import AroundInterceptor, Behavior

log = logging.getLogger("credscope.audit")


class AuditInterceptor(AroundInterceptor):
    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer

    async def around(self, method: str, behavior: Behavior, request: Any,
                     context: grpc.aio.ServicerContext) -> Any:
        created = time.time()
        started = time.perf_counter()
        status = "OK"
        message: str | None = None
        try:
            ctx = rc.current()
            if ctx is not None and ctx.rejection is not None:  # refused by the request-id layer: audit it
                raise ctx.rejection
            return await behavior(request, context)
        except CredScopeError as e:
            status, message = e.code.name, e.message
            raise
        except AbortError:
            code = context.code()
            status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            message = context.details() or None
            raise
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED.name
            raise
        except Exception:
            ctx = rc.current()
            status, message = grpc.StatusCode.INTERNAL.name, internal(ctx.request_id if ctx else "?").message
            raise
        finally:
            entry = _entry(method, created, (time.perf_counter() - started) * 1000.0, status, message)
            if status == grpc.StatusCode.CANCELLED.name:
                self.writer.record_nowait(entry)
            else:
                try:
                    with tracing.span("credscope.audit.enqueue", predictions=entry.weight - 1):
                        await self.writer.record(entry)
                except AuditUnavailable as e:
                    if status == "OK":
                        raise Unavailable("the audit trail cannot record this call right now; retry") from e
                    log.warning("request %s: %s", entry.usage.request_id, e)


def _entry(method: str, created: float, duration_ms: float, status: str, message: str | None) -> AuditEntry:
    ctx = rc.current()
    principal = ctx.principal if ctx else None
    usage = UsageRecord(request_id=ctx.request_id if ctx else rc.new_request_id(), method=method,
                        status_code=status, duration_ms=duration_ms,
                        key_id=principal.key_id if principal else None, tier=principal.tier if principal else None,
                        error=message)
    predictions: list[PredictionRecord] = []
    batch: PredictionBatch | None = None
    if ctx is not None and status == "OK":
        for record in ctx.audit:
            if isinstance(record, PredictionBatch):
                if batch is not None:  # (a BatchScore leaves one; should a call leave more, none is lost)
                    predictions.extend(batch.records())
                batch = record
            else:
                predictions.append(record)
    return AuditEntry(created_at=created, usage=usage, predictions=predictions,
                      client_name=principal.name if principal else None, batch=batch)
