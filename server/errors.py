"""Errors of the API: each carries its gRPC status code and reason; one mapper turns them into rich statuses.

Rich details follow google.rpc (``ErrorInfo`` with domain ``credscope.v1`` and an UPPER_SNAKE reason,
``BadRequest`` for field violations, ``QuotaFailure`` + ``RetryInfo`` for rate limits). Anything
unexpected becomes INTERNAL with a message that leaks nothing (the request id lets operators find the
traceback in the logs).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "credscope.v1"


@dataclass(frozen=True)
class Violation:
    """One invalid field: its path and what to fix."""

    field: str
    description: str


class CredScopeError(Exception):
    """An error the caller should see, with its status code and ErrorInfo reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata or {}

    def details(self) -> list[any_pb2.Any]:
        """Details beyond ErrorInfo (override)."""
        return []

    def to_status(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        packed = [_pack(info), *self.details()]
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


def _pack(msg) -> any_pb2.Any:  # type: ignore[no-untyped-def]
    a = any_pb2.Any()
    a.Pack(msg)
    return a


class InvalidArgument(CredScopeError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, violations: list[Violation] | None = None) -> None:
        super().__init__(message)
        self.violations = violations or []

    def details(self) -> list[any_pb2.Any]:
        if not self.violations:
            return []
        br = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in self.violations])
        return [_pack(br)]


class NotFound(CredScopeError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class Unauthenticated(CredScopeError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "API_KEY_INVALID"


class PermissionDenied(CredScopeError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "ADMIN_REQUIRED"


class FailedPrecondition(CredScopeError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unavailable(CredScopeError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "NOT_READY"


class BackendUnavailable(Unavailable):
    """A backend the call needs (e.g. the Redis cache for ClearCache) did not answer."""

    reason = "BACKEND_UNAVAILABLE"


class RateLimited(CredScopeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"

    def __init__(self, message: str, *, subject: str, retry_after_seconds: float, limit_description: str) -> None:
        super().__init__(message)
        self.subject = subject
        self.retry_after_seconds = retry_after_seconds
        self.limit_description = limit_description

    def details(self) -> list[any_pb2.Any]:
        qf = error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject=self.subject, description=self.limit_description)])
        secs = max(0.0, self.retry_after_seconds)
        delay = duration_pb2.Duration(seconds=int(secs), nanos=int((secs - int(secs)) * 1e9))
        return [_pack(qf), _pack(error_details_pb2.RetryInfo(retry_delay=delay))]


def internal(request_id: str) -> CredScopeError:
    """The error a caller sees for an unexpected failure: no internals, just the request id."""
    return CredScopeError(f"internal error; quote request id {request_id} to the operators")


async def abort(context: grpc.aio.ServicerContext, error: CredScopeError) -> None:
    """Abort the call with ``error`` as a rich status (never returns).

    The call's response metadata (request id, rate-limit state) goes with it as trailing metadata.
    """
    from server import context as rc

    status = rpc_status.to_status(error.to_status())
    ctx = rc.current()
    extra = tuple(ctx.response_metadata.items()) if ctx else ()
    await context.abort(status.code, status.details, trailing_metadata=extra + tuple(status.trailing_metadata))



class Unimplemented(CredScopeError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class DeadlineExceeded(CredScopeError):
    """The call's deadline passed before the server got to the work (nothing was scored)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"
