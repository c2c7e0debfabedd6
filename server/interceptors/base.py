"""The one wrapper every interceptor uses: run code around a unary call's behaviour.

Like OpenTelemetry's ``_wrap_rpc_behavior``: the interceptor gets the request, the ServicerContext
(for abort, metadata and peer) and the inner behaviour. Streaming handlers and excluded methods (health,
reflection) pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]

#: Services that only the transport uses; interceptors leave them alone.
INFRA_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def is_infra(method: str) -> bool:
    return method.startswith(INFRA_PREFIXES)


class Undecodable:
    """Stands in for a request whose bytes are not a valid message, so that the chain answers it with
    INVALID_ARGUMENT (instead of grpc's bare UNKNOWN) after the request id and audit have run."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, upb sometimes others
            return Undecodable(e)

    return deserialize


class AroundInterceptor(grpc.aio.ServerInterceptor):
    """Base class: override :meth:`around`; :meth:`applies` filters methods."""

    def applies(self, method: str) -> bool:
        return not is_infra(method)

    def deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        return deserializer

    async def around(self, method: str, behavior: Behavior, request: Any,
                     context: grpc.aio.ServicerContext) -> Any:
        return await behavior(request, context)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not self.applies(method):
            return handler
        # The inner handler of a method is the same object call after call: wrap it once, not per call.
        cache: dict[str, tuple[Any, Any]] = self.__dict__.setdefault("_wrapped", {})
        hit = cache.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        cache[method] = (handler, wrapped := self._wrap(method, handler))
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Any:
        inner = handler.unary_unary
        around = self.around

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await around(method, inner, request, context)

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=self.deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer)
