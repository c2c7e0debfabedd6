"""AdminService: API keys, caches, statistics, models (admin-only)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import grpc

from credscope.v1 import admin_pb2, admin_pb2_grpc
from server.audit.writer import AuditWriter
from server.backends.cache import CacheUnavailable
from server.cached_scoring import Caches
from server.errors import BackendUnavailable, InvalidArgument, Unimplemented, Violation
from server.replay import Replayer
from server.runtime import Runtime
from server.services.audit import get_stats, list_top_features

if TYPE_CHECKING:
    from server.services.api_keys import ApiKeyAdmin

log = logging.getLogger("credscope.admin")


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    """Each RPC is implemented by the concern that owns it; until then it answers UNIMPLEMENTED."""

    def __init__(self, runtime: Runtime, *, api_keys: ApiKeyAdmin | None = None,
                 caches: Caches | None = None, audit: AuditWriter | None = None) -> None:
        self.runtime = runtime
        self.api_keys = api_keys
        self.caches = caches
        self.audit = audit
        self.replayer = Replayer(runtime)

    async def _unimplemented(self, name: str) -> Any:
        raise Unimplemented(f"AdminService.{name} is not available on this server")

    async def CreateApiKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.api_keys is None:
            return await self._unimplemented("CreateApiKey")
        return await self.api_keys.create(request)

    async def RevokeApiKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.api_keys is None:
            return await self._unimplemented("RevokeApiKey")
        return await self.api_keys.revoke(request)

    async def ListApiKeys(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.api_keys is None:
            return await self._unimplemented("ListApiKeys")
        return await self.api_keys.list(request)

    async def GetApiKeyStats(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.api_keys is None:
            return await self._unimplemented("GetApiKeyStats")
        return await self.api_keys.stats(request)

    async def ClearCache(self, request: admin_pb2.ClearCacheRequest, context: grpc.aio.ServicerContext
                         ) -> admin_pb2.ClearCacheResponse:
        """Empty the prediction and explanation caches (the embedded ones of this worker, or the shared
        Redis namespaces) and say how many entries each held."""
        if self.caches is None:
            return await self._unimplemented("ClearCache")
        try:
            predictions, explanations = await self.caches.clear()
        except CacheUnavailable as e:
            raise BackendUnavailable("the cache backend did not answer; nothing was cleared, retry shortly") from e
        log.info("cache cleared: %d predictions, %d explanations", predictions, explanations)
        return admin_pb2.ClearCacheResponse(predictions_removed=predictions, explanations_removed=explanations)

    async def GetStats(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await get_stats(self.audit, request, other_workers=self.runtime.settings.server.workers > 1)

    async def ListTopFeatures(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await list_top_features(self.audit, request)

    async def ReplayDecision(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.replayer.replay(self.audit, request)

    async def ActivateModel(self, request: admin_pb2.ActivateModelRequest, context: grpc.aio.ServicerContext
                            ) -> admin_pb2.ActivateModelResponse:
        if not request.version:
            raise InvalidArgument("version is required", [Violation("version", "name a version of the model store "
                                                                    "(GetModelInfo lists them)")])
        previous, active = await self.runtime.activate(request.version)
        return admin_pb2.ActivateModelResponse(previous_version=previous, active_version=active)
