"""Authentication: every call needs an API key (``x-api-key`` metadata); AdminService needs the admin flag.

Fills :attr:`server.context.RequestContext.principal`. A missing, malformed, unknown or revoked key gets
UNAUTHENTICATED (ErrorInfo reasons ``API_KEY_MISSING``, ``API_KEY_INVALID``, ``API_KEY_REVOKED``); an
AdminService call by a key without the admin flag gets PERMISSION_DENIED (``ADMIN_REQUIRED``); a key store
that cannot answer (and no recent cache entry) gets UNAVAILABLE. In dev mode (``auth.allow_anonymous``,
off by default) a call without a key runs as the free tier, one bucket per peer address; a call with a bad
key is refused all the same.

Health and reflection are left alone. Streaming handlers (none are declared today) are guarded too, so a
streaming RPC added later cannot bypass authentication. ``on_reject(peer, method, error)`` is the hook for
counting failed attempts per peer (brute-force slowing belongs to a later hardening step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from server import context as rc
from server.auth.verifier import KeyVerifier, MissingKey
from server.context import Principal
from server.errors import CredScopeError, PermissionDenied, Unauthenticated, abort
from server.interceptors.base import AroundInterceptor, Behavior
from server.interceptors.request_id import metadata_value

ADMIN_PREFIX = "/credscope.v1.AdminService/"
API_KEY_HEADER = "x-api-key"
ANONYMOUS = "anonymous"

RejectHook = Callable[[str, str, CredScopeError], None]


def peer_host(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without the port: ``ipv4:1.2.3.4:5678`` → ``ipv4:1.2.3.4``."""
    peer = context.peer() or "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


def anonymous(context: grpc.aio.ServicerContext) -> Principal:
    return Principal(key_id=f"{ANONYMOUS}:{peer_host(context)}", name=ANONYMOUS, tier="free", admin=False)


class AuthInterceptor(AroundInterceptor):
    def __init__(self, verifier: KeyVerifier, *, allow_anonymous: bool = False,
                 on_reject: RejectHook | None = None) -> None:
        self.verifier = verifier
        self.allow_anonymous = allow_anonymous
        self.on_reject = on_reject

    async def authenticate(self, method: str, context: grpc.aio.ServicerContext) -> Principal:
        """The caller's principal; raises the error the call must end with."""
        try:
            api_key = metadata_value(context, API_KEY_HEADER)
            if api_key is None:
                if not self.allow_anonymous:
                    raise MissingKey(f"an API key is required: send it as '{API_KEY_HEADER}' metadata")
                principal = anonymous(context)
            else:
                principal = await self.verifier.verify(api_key)
            ctx = rc.current()
            if ctx is not None:
                ctx.principal = principal  # known even when refused below, for the audit
            if method.startswith(ADMIN_PREFIX) and not principal.admin:
                raise PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs an API key with the admin flag")
        except (Unauthenticated, PermissionDenied) as e:
            if self.on_reject is not None:
                self.on_reject(peer_host(context), method, e)
            raise
        return principal

    async def around(self, method: str, behavior: Behavior, request: Any,
                     context: grpc.aio.ServicerContext) -> Any:
        await self.authenticate(method, context)
        return await behavior(request, context)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await super().intercept_service(continuation, handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is not None or not self.applies(method):
            return handler
        return self._guard_stream(handler, method)

    def _guard_stream(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """Wrap a streaming handler: authenticate before its behaviour runs (abort with the rich status)."""
        authenticate = self.authenticate

        async def admitted(context: grpc.aio.ServicerContext) -> None:
            try:
                await authenticate(method, context)
            except CredScopeError as e:
                await abort(context, e)

        def streaming(inner: Any) -> Any:
            async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admitted(context)
                result = inner(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:
                    await result
            return run

        def unary(inner: Any) -> Any:
            async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admitted(context)
                return await inner(request, context)
            return run

        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kw)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kw)
