"""Refuses calls from a client address that failed authentication too often (see
:mod:`server.auth.throttle`), before the auth interceptor checks their key. Sits right outside
:class:`~server.interceptors.auth.AuthInterceptor`, whose ``on_reject`` hook feeds the counts."""

from __future__ import annotations

from typing import Any

import grpc

from server.auth.throttle import FailedAuthThrottle
from server.interceptors.auth import peer_host
from server.interceptors.base import AroundInterceptor, Behavior


class AuthThrottleInterceptor(AroundInterceptor):
    def __init__(self, throttle: FailedAuthThrottle) -> None:
        self.throttle = throttle

    async def around(self, method: str, behavior: Behavior, request: Any,
                     context: grpc.aio.ServicerContext) -> Any:
        self.throttle.check(peer_host(context))
        return await behavior(request, context)
