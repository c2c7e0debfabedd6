"""AdminService: API keys, caches, statistics, models (admin-only)."""

from __future__ import annotations

from typing import Any

import grpc

from credscope.v1 import admin_pb2_grpc
from server.audit.writer import AuditWriter
from server.errors import Unimplemented
from server.services.audit import get_stats, list_top_features


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    """Each RPC is implemented by the concern that owns it; until then it answers UNIMPLEMENTED."""

    def __init__(self, *, audit: AuditWriter | None = None) -> None:
        self.audit = audit

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

    async def ClearCache(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("ClearCache")

    async def GetStats(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await get_stats(self.audit, request)

    async def ListTopFeatures(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await list_top_features(self.audit, request)

    async def ReplayDecision(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("ReplayDecision")

    async def ActivateModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("ActivateModel")
