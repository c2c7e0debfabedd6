"""Server assembly: the grpc.aio server, its interceptor chain, servicers, health and reflection."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from credscope.v1 import admin_pb2, admin_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from server import db, tracing, transport, wire
from server.audit.writer import AuditWriter
from server.auth.throttle import FailedAuthThrottle
from server.cached_scoring import open_caches
from server.challenger import Challenger
from server.interceptors.audit import AuditInterceptor
from server.interceptors.auth import AuthInterceptor
from server.interceptors.metrics import MetricsInterceptor
from server.interceptors.ratelimit import RateLimitInterceptor
from server.interceptors.request_id import RequestIdInterceptor
from server.interceptors.throttle import AuthThrottleInterceptor
from server.interceptors.tracing import TracingInterceptor
from server.readiness import Readiness
from server.runtime import Runtime
from server.security import Security
from server.services.admin import AdminService
from server.services.api_keys import ApiKeyAdmin
from server.services.scoring import ScoringService
from server.settings import Settings

log = logging.getLogger("credscope.server")

SCORING = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
SERVED = (SCORING, ADMIN)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    s = settings.server
    return [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.max_concurrent_streams", s.max_concurrent_streams),
        ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
    ]


class CredScopeServer:
    """One worker's server. ``start`` binds and serves (NOT_SERVING until the model is loaded)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime = Runtime(settings)
        self.audit = AuditWriter(settings.audit) if settings.audit.enabled else None
        self.caches = open_caches(settings.cache)
        self.health = health.aio.HealthServicer()
        self.security = Security(settings)
        self.auth_throttle = FailedAuthThrottle.from_settings(settings.auth)
        self.server = grpc.aio.server(interceptors=self.interceptors(), options=server_options(settings))
        self.scoring = ScoringService(self.runtime, settings, self.caches, audit=self.audit)
        scoring_pb2_grpc.add_ScoringServiceServicer_to_server(self.scoring, self.server)
        self.challenger: Challenger | None = None
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminService(self.runtime, api_keys=ApiKeyAdmin(self.security), caches=self.caches,
                         audit=self.audit), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*SERVED, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0
        self.draining = False
        self._watch: asyncio.Task[None] | None = None
        self._readiness: asyncio.Task[None] | None = None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        # tracing → metrics → request id → audit → auth → rate limit (the audit sees every call the chain
        # handles, including those auth and rate limiting refuse)
        traced: list[grpc.aio.ServerInterceptor] = [TracingInterceptor()] if tracing.enabled() else []
        audit: list[grpc.aio.ServerInterceptor] = [AuditInterceptor(self.audit)] if self.audit is not None else []
        return [*traced, MetricsInterceptor(),
                RequestIdInterceptor(accepting=lambda: not self.draining, defer_rejections=bool(audit)), *audit,
                AuthThrottleInterceptor(self.auth_throttle),
                AuthInterceptor(self.security.verifier, allow_anonymous=self.settings.auth.allow_anonymous,
                                on_reject=self.auth_throttle.rejected),
                RateLimitInterceptor(self.security.limiter, self.security.usage,
                                     max_batch=self.settings.server.max_batch_size)]

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", *SERVED):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind, serve, load the model, then report SERVING. Returns the bound port."""
        s = self.settings.server
        credentials = transport.server_credentials(self.settings.tls)
        address = f"{s.host}:{s.port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials is not None
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise RuntimeError(f"could not bind {s.host}:{s.port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await db.migrate(self.settings.auth.key_store_url)
        await self.security.start()
        if self.audit is not None:
            await self.audit.start()  # applies the migrations; spools (and says so) if the database is down
        await self.server.start()
        scorer = await asyncio.to_thread(self.runtime.load)
        await asyncio.to_thread(wire.warm)  # the first BatchScore of a worker does not compile them
        await self._start_challenger()
        await self._log_cache()
        # SERVING from here on unless the model is gone or nothing can record audits (server/readiness.py)
        self.readiness = Readiness(self.health, SERVED, model_loaded=lambda: self.runtime.ready,
                                   audit=self.audit, interval=self.settings.server.health_check_seconds)
        await self.readiness.update()
        self._readiness = asyncio.create_task(self.readiness.run())
        self._watch = asyncio.create_task(self.runtime.watch())
        log.info("serving model %s on %s:%d, %s", scorer.version, s.host, self.port,
                 transport.describe(self.settings.tls))
        return self.port

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Report NOT_SERVING and answer new calls UNAVAILABLE for the drain period (calls in flight go on),
        then stop, giving calls still in flight the grace period."""
        if self._readiness is not None:
            self._readiness.cancel()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.draining = True
        if self._watch is not None:
            self._watch.cancel()
        drain = self.settings.server.drain_seconds if drain is None else drain
        if drain > 0:
            await asyncio.sleep(drain)
        await self.server.stop(self.settings.server.grace_seconds if grace is None else grace)
        if self.challenger is not None:
            await self.challenger.close()  # shadow scores still queued are recorded first
        if self.audit is not None:
            await self.audit.close()  # drain: every queued record is written or spooled before exit
        await self.security.close()
        await self.caches.close()

    async def _start_challenger(self) -> None:
        """Champion/challenger: load the challenger version and shadow-score a share of applicants."""
        version = self.settings.model.challenger_version
        if not version:
            return
        if self.audit is None:
            log.warning("challenger %s not started: the audit trail, where it records, is off", version)
            return
        self.challenger = await asyncio.to_thread(Challenger, self.settings, self.audit.store)
        self.challenger.start()
        self.scoring.challenger = self.challenger
        log.info("challenger %s scores %.0f%% of applicants in shadow", version,
                 100 * self.settings.model.challenger_share)

    async def _log_cache(self) -> None:
        """Say which cache serves (a Redis that does not answer yet is not fatal: scoring goes uncached)."""
        c = self.caches
        answers = c.enabled and await c.check()
        log.info("caches: %s (%s)%s", c.kind, c.where, "" if answers else
                 " - disabled" if not c.enabled else " - not answering yet; scoring goes on uncached until it does")

    async def wait(self) -> None:
        await self.server.wait_for_termination()
