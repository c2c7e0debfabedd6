"""A Python client for CredScope over the generated stubs.

API key metadata, per-call deadlines, retries on UNAVAILABLE (gRPC's own retry policy, through the
channel's service config), and rich error decoding into :class:`CredScopeRpcError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from client.applicants import applicant_from_mapping
from credscope.v1 import admin_pb2, admin_pb2_grpc, applicant_pb2, scoring_pb2, scoring_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"

#: Retry ScoringService calls that fail with UNAVAILABLE (safe: scoring has no side effect but the
#: audit row, keyed by request id; ReportOutcome is idempotent).
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "credscope.v1.ScoringService"}],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


@dataclass
class FieldProblem:
    field: str
    description: str


@dataclass
class CredScopeRpcError(Exception):
    """A failed call, with the server's rich details decoded."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    field_violations: list[FieldProblem] = field(default_factory=list)
    quota_violations: list[FieldProblem] = field(default_factory=list)
    retry_delay_seconds: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.code.name}: {self.message}"]
        lines += [f"  {v.field}: {v.description}" for v in self.field_violations]
        lines += [f"  quota {v.field}: {v.description}" for v in self.quota_violations]
        if self.retry_delay_seconds is not None:
            lines.append(f"  retry after {self.retry_delay_seconds:.1f}s")
        return "\n".join(lines)

    @property
    def request_id(self) -> str | None:
        return self.metadata.get("x-request-id")

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> CredScopeRpcError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        message = e.details() if hasattr(e, "details") else str(e)
        metadata = {}
        for md in (_safe(e, "initial_metadata"), _safe(e, "trailing_metadata")):
            for k, v in md or ():
                if isinstance(v, str):
                    metadata[k] = v
        err = cls(code=code, message=message or "", metadata=metadata)
        # sync errors are grpc.Call objects, grpc.aio's AioRpcError has the same trailing_metadata()
        status = rpc_status.from_call(cast(grpc.Call, e)) if hasattr(e, "trailing_metadata") else None
        for detail in status.details if status else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                err.reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                detail.Unpack(br)
                err.field_violations += [FieldProblem(v.field, v.description) for v in br.field_violations]
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                qf = error_details_pb2.QuotaFailure()
                detail.Unpack(qf)
                err.quota_violations += [FieldProblem(v.subject, v.description) for v in qf.violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                detail.Unpack(ri)
                err.retry_delay_seconds = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
        return err


def _safe(e: grpc.RpcError, name: str) -> Any:
    try:
        return getattr(e, name)()
    except Exception:  # noqa: BLE001 - metadata is optional on some error kinds
        return None


ApplicantLike = applicant_pb2.Applicant | Mapping[str, Any]


def to_applicant(a: ApplicantLike) -> applicant_pb2.Applicant:
    return a if isinstance(a, applicant_pb2.Applicant) else applicant_from_mapping(a)


PathLike = str | os.PathLike[str]


def tls_credentials(ca: PathLike | None = None, cert: PathLike | None = None,
                    key: PathLike | None = None) -> grpc.ChannelCredentials:
    """Channel credentials for a TLS server: ``ca`` = the CA file (PEM) that signed the server's
    certificate (None: the system's trusted roots); ``cert`` and ``key`` = this client's certificate and
    key, for servers that require mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key and the other way round (tls_cert and tls_key)")

    def read(path: PathLike | None) -> bytes | None:
        return Path(path).read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key),
                                        certificate_chain=read(cert))


class CredScopeClient:
    """Synchronous client. Use as a context manager, or call :meth:`close`.

    ``last_metadata`` holds the response metadata of the last call (``x-request-id``,
    ``x-ratelimit-limit``, ``x-ratelimit-remaining``, ``x-ratelimit-reset``).
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None, timeout: float = 10.0,
                 credentials: grpc.ChannelCredentials | None = None, retries: bool = True,
                 options: Sequence[tuple[str, Any]] = (), tls: bool = False, tls_ca: PathLike | None = None,
                 tls_cert: PathLike | None = None, tls_key: PathLike | None = None) -> None:
        """``tls=True`` or any ``tls_*`` file: a TLS channel (see :func:`tls_credentials`); ``credentials``
        gives ready-made channel credentials instead."""
        if credentials is None and (tls or tls_ca or tls_cert or tls_key):
            credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        opts = [("grpc.enable_retries", 1 if retries else 0), ("grpc.service_config", SERVICE_CONFIG), *options]
        self.channel = (grpc.secure_channel(target, credentials, options=opts) if credentials
                        else grpc.insecure_channel(target, options=opts))
        self.api_key = api_key
        self.timeout = timeout
        self.scoring = scoring_pb2_grpc.ScoringServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.last_metadata: dict[str, str] = {}

    def __enter__(self) -> CredScopeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _metadata(self, request_id: str | None) -> list[tuple[str, str]]:
        md = []
        if self.api_key:
            md.append(("x-api-key", self.api_key))
        if request_id:
            md.append(("x-request-id", request_id))
        return md

    def call(self, method: Any, request: Any, *, timeout: float | None = None, request_id: str | None = None) -> Any:
        """Invoke a stub method with the key, deadline and error decoding."""
        try:
            response, call = method.with_call(request, timeout=timeout or self.timeout,
                                              metadata=self._metadata(request_id))
        except grpc.RpcError as e:
            err = CredScopeRpcError.from_rpc_error(e)
            self.last_metadata = err.metadata
            raise err from None
        self.last_metadata = {k: v for k, v in (*(call.initial_metadata() or ()), *(call.trailing_metadata() or ()))
                              if isinstance(v, str)}
        return response

    def score(self, applicant: ApplicantLike, *, request_id: str = "", explain: bool = False, top_k: int = 0,
              timeout: float | None = None) -> scoring_pb2.ScoreResponse:
        req = scoring_pb2.ScoreRequest(applicant=to_applicant(applicant), request_id=request_id,
                                       explain=scoring_pb2.ExplainOptions(enabled=explain, top_k=top_k))
        return self.call(self.scoring.Score, req, timeout=timeout)

    def batch_score(self, applicants: Iterable[ApplicantLike], *, request_id: str = "", explain: bool = False,
                    top_k: int = 0, loan_parameters: Mapping[str, Any] | None = None,
                    timeout: float | None = None) -> scoring_pb2.BatchScoreResponse:
        req = scoring_pb2.BatchScoreRequest(
            applicants=[to_applicant(a) for a in applicants], request_id=request_id,
            explain=scoring_pb2.ExplainOptions(enabled=explain, top_k=top_k),
            loan_parameters=scoring_pb2.LoanParameters(**(loan_parameters or {})))
        return self.call(self.scoring.BatchScore, req, timeout=timeout)

    def model_info(self, *, timeout: float | None = None) -> scoring_pb2.GetModelInfoResponse:
        return self.call(self.scoring.GetModelInfo, scoring_pb2.GetModelInfoRequest(), timeout=timeout)

    def report_outcome(self, request_id: str, defaulted: bool, *,
                       timeout: float | None = None) -> scoring_pb2.ReportOutcomeResponse:
        outcome = scoring_pb2.OUTCOME_DEFAULTED if defaulted else scoring_pb2.OUTCOME_REPAID
        req = scoring_pb2.ReportOutcomeRequest(request_id=request_id, outcome=outcome)
        return self.call(self.scoring.ReportOutcome, req, timeout=timeout)

    def admin_call(self, name: str, request: Any, *, timeout: float | None = None) -> Any:
        """Call an AdminService RPC by name, e.g. ``admin_call("ClearCache", ClearCacheRequest())``."""
        return self.call(getattr(self.admin, name), request, timeout=timeout)


__all__ = ["CredScopeClient", "CredScopeRpcError", "FieldProblem", "admin_pb2", "DEFAULT_TARGET", "tls_credentials"]
