"""AdminService: API keys, caches, statistics, models (admin-only)."""

from __future__ import annotations

from typing import Any

import grpc

from credscope.v1 import admin_pb2, admin_pb2_grpc
from server.errors import InvalidArgument, Unimplemented, Violation
from server.runtime import Runtime


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    """Each RPC is implemented by the concern that owns it; until then it answers UNIMPLEMENTED."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

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
        return await self._unimplemented("GetStats")

    async def ListTopFeatures(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("ListTopFeatures")

    async def ReplayDecision(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented("ReplayDecision")

    async def ActivateModel(self, request: admin_pb2.ActivateModelRequest, context: grpc.aio.ServicerContext
                            ) -> admin_pb2.ActivateModelResponse:
        if not request.version:
            raise InvalidArgument("version is required", [Violation("version", "name a version of the model store "
                                                                    "(GetModelInfo lists them)")])
        previous, active = await self.runtime.activate(request.version)
        return admin_pb2.ActivateModelResponse(previous_version=previous, active_version=active)
