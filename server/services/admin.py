"""AdminService: API keys, caches, statistics, models (admin-only)."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from credscope.v1 import admin_pb2, admin_pb2_grpc
from server.backends.cache import CacheUnavailable
from server.cached_scoring import Caches
from server.errors import BackendUnavailable, Unimplemented

log = logging.getLogger("credscope.admin")


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    """Each RPC is implemented by the concern that owns it; until then it answers UNIMPLEMENTED."""

    def __init__(self, *, caches: Caches | None = None) -> None:
        self.caches = caches

    async def _unimplemented(self, name: str) -> Any:
        raise Unimplemented(f"AdminService.{name} is not available on this server")

    async def CreateApiKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("CreateApiKey")

    async def RevokeApiKey(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("RevokeApiKey")

    async def ListApiKeys(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("ListApiKeys")

    async def GetApiKeyStats(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("GetApiKeyStats")

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
        return await self._unimplemented("GetStats")

    async def ListTopFeatures(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("ListTopFeatures")

    async def ReplayDecision(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("ReplayDecision")

    async def ActivateModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("ActivateModel")
