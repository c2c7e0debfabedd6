"""The server's health status while it runs: SERVING unless the model is not loaded or nothing can record
audits (the audit database is down and the spool cannot take batches either).

Backends that degrade do not make a server unhealthy: a Redis outage means uncached calls and host-local
rate limits, a PostgreSQL outage means audit batches go to the spool and keys are served from the local
cache. Taking the server out of a load balancer for those would turn a degraded service into no service.
What does: no model to score with, or calls that could no longer be audited (they would wait for room in
the audit queue, and nothing recorded could be guaranteed).

:class:`Readiness` re-evaluates every ``interval`` seconds and sets the status of the whole server and of
each served service on the ``grpc.health.v1`` servicer when it changes, logging why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from grpc_health.v1 import health_pb2

log = logging.getLogger("credscope.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Audit(Protocol):
    def healthy(self) -> bool: ...


class Readiness:
    def __init__(self, health: Any, services: Sequence[str], *, model_loaded: Callable[[], bool],
                 audit: _Audit | None, interval: float = 0.5) -> None:
        self.health = health
        self.services = ("", *services)
        self.model_loaded = model_loaded
        self.audit = audit
        self.interval = interval
        self.serving: bool | None = None
        self.changes = 0

    def problem(self) -> str | None:
        """Why the server cannot serve, or None."""
        if not self.model_loaded():
            return "no model is loaded"
        if self.audit is not None and not self.audit.healthy():
            return "nothing can record audits (the audit database is down and the spool cannot take batches)"
        return None

    async def update(self) -> bool:
        """Evaluate now; set the health status if it changed. Returns whether the server is serving."""
        problem = self.problem()
        serving = problem is None
        if serving != self.serving:
            for name in self.services:
                await self.health.set(name, SERVING if serving else NOT_SERVING)
            if self.serving is not None:
                self.changes += 1
                if serving:
                    log.warning("health: SERVING again")
                else:
                    log.error("health: NOT_SERVING: %s", problem)
            self.serving = serving
        return serving

    async def run(self) -> None:
        """Keep the status current until cancelled."""
        while True:
            try:
                await self.update()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed check must not stop the checks
                log.exception("health check failed")
            await asyncio.sleep(self.interval)
