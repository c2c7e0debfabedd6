"""Outermost interceptor: gives every call a request id and turns errors into rich statuses.

The request id is the caller's ``x-request-id`` metadata (validated) or a new UUID; it is returned in
the ``x-request-id`` trailing metadata (with the rest of ``RequestContext.response_metadata``, e.g. the
rate-limit state, on success and on error alike), set in the :mod:`server.context` for the inner interceptors,
the servicers, the logs and the audit. Errors raised as :class:`~server.errors.CredScopeError` become
their rich status; anything else is logged with the request id and becomes INTERNAL, leaking nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import grpc
from grpc.aio import AbortError

from server import context as rc
from server.errors import CredScopeError, InvalidArgument, Unavailable, Violation, abort, internal
from server.interceptors.base import AroundInterceptor, Behavior, Undecodable, tolerant

log = logging.getLogger("credscope.server")

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
REQUEST_ID_HELP = "at most 128 characters of letters, digits and . _ : / -"


def valid_request_id(value: str) -> bool:
    return bool(REQUEST_ID_RE.match(value))


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


class RequestIdInterceptor(AroundInterceptor):
    """``accepting`` says whether new calls are taken (false while the server drains on SIGTERM)."""

    def __init__(self, accepting: Callable[[], bool] = lambda: True, *, defer_rejections: bool = False) -> None:
        self.accepting = accepting
        self.defer_rejections = defer_rejections
        """With an audit layer next in the chain: leave a malformed call's error in the context for the
        audit interceptor to raise (so the refusal is audited) instead of raising it here."""

    def deserializer(self, deserializer):  # type: ignore[no-untyped-def]
        return tolerant(deserializer)

    async def around(self, method: str, behavior: Behavior, request: Any,
                     context: grpc.aio.ServicerContext) -> Any:
        given = metadata_value(context, "x-request-id")
        bad_id = given is not None and not valid_request_id(given)
        ctx = rc.begin(given if given and not bad_id else rc.new_request_id(), method)
        ctx.response_metadata["x-request-id"] = ctx.request_id
        try:
            if not self.accepting():
                raise Unavailable("the server is shutting down; retry, another replica will answer")
            if bad_id:
                ctx.rejection = InvalidArgument("metadata x-request-id is not a valid request id",
                                                [Violation("metadata.x-request-id", REQUEST_ID_HELP)])
            elif isinstance(request, Undecodable):
                ctx.rejection = InvalidArgument(f"the request is not a valid {method.rsplit('/', 1)[-1]}Request "
                                                "protobuf message; send it with the generated stubs of credscope.v1")
            if ctx.rejection is not None and not self.defer_rejections:
                raise ctx.rejection
            response = await behavior(request, context)
            # Trailers, not headers: they travel with the status in the call's last batch, while an explicit
            # send_initial_metadata is one more batch through gRPC core (~70 us of server CPU per call here).
            context.set_trailing_metadata(tuple(ctx.response_metadata.items()))
            return response
        except AbortError:
            raise
        except CredScopeError as e:
            ctx.error = e.code.name
            await abort(context, e)
        except Exception:
            ctx.error = grpc.StatusCode.INTERNAL.name
            log.exception("unexpected error in %s (request id %s)", method, ctx.request_id)
            await abort(context, internal(ctx.request_id))
