"""Traces end to end: a server process exports over OTLP/gRPC to a collector endpoint in the test."""

from __future__ import annotations

import secrets
import threading
import time
from concurrent import futures

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from client.applicants import applicant_from_mapping
from credscope.v1 import scoring_pb2, scoring_pb2_grpc
from tests.helpers import ServerProcess, make_api_key, start_server

#: Distinctive applicant values: no span attribute may contain them.
APPLICANT = {
    "name_contract_type": "Cash loans", "amt_income_total": 173456.25, "amt_credit": 654321.5,
    "amt_annuity": 31987.75, "amt_goods_price": 600123, "name_income_type": "Working",
    "name_education_type": "Higher education", "days_birth": -13579, "days_employed": -2468,
    "ext_source_2": 0.613579, "ext_source_3": 0.524681, "cnt_fam_members": 2,
}


def fresh() -> dict:
    """APPLICANT with a new EXT_SOURCE_1, so that the prediction cache misses and the model runs."""
    return {**APPLICANT, "ext_source_1": 0.05 + 0.9 * secrets.randbelow(10**6) / 10**6}


SECRET_FRAGMENTS = ("173456", "654321", "31987", "600123", "13579", "2468", "0.613579", "0.524681")


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace endpoint that keeps what it receives."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict, trace_pb2.Span]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802 - the proto's name
        with self.lock:
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans.extend((resource, s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout: float = 20.0, count: int = 1) -> list[trace_pb2.Span]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for _, s in self.spans if predicate(s)]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        with self.lock:
            names = [s.name for _, s in self.spans]
        raise AssertionError(f"no matching span within {timeout}s; received: {names}")


def _value(v):  # type: ignore[no-untyped-def]
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(span: trace_pb2.Span) -> dict:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture(scope="module")
def collector():  # type: ignore[no-untyped-def]
    c = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    c.port = port  # type: ignore[attr-defined]
    yield c
    server.stop(0)


@pytest.fixture(scope="module")
def traced_server(model_dir, collector, tmp_path_factory) -> ServerProcess:  # type: ignore[no-untyped-def]
    sp = start_server(model_dir, cwd=tmp_path_factory.mktemp("traced"), env={
        "CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "ignored-the-setting-wins",
    })
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def api_key(traced_server: ServerProcess) -> str:
    """A pro-tier key in the traced server's key store."""
    return make_api_key(traced_server.cwd, tier="pro", admin=False, name="tracing-test")


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def test_rpc_span_continues_the_callers_trace_with_child_spans(traced_server, collector, api_key) -> None:  # type: ignore[no-untyped-def]
    header, trace_id, parent_id = traceparent()
    with grpc.insecure_channel(traced_server.target) as ch:
        response = scoring_pb2_grpc.ScoringServiceStub(ch).Score(
            scoring_pb2.ScoreRequest(applicant=applicant_from_mapping(APPLICANT)), timeout=10,
            metadata=[("traceparent", header), ("x-api-key", api_key)])

    def mine(s: trace_pb2.Span) -> bool:
        return s.trace_id.hex() == trace_id

    rpc = collector.wait_for(lambda s: mine(s) and s.name == "credscope.v1.ScoringService/Score")[0]
    assert rpc.parent_span_id.hex() == parent_id  # continues the caller's span
    assert rpc.kind == trace_pb2.Span.SPAN_KIND_SERVER
    a = attrs(rpc)
    assert a["rpc.system"] == "grpc" and a["rpc.service"] == "credscope.v1.ScoringService"
    assert a["rpc.method"] == "Score" and a["rpc.grpc.status_code"] == 0
    assert a["credscope.model_version"] == response.model_version
    assert a["credscope.decision"] == scoring_pb2.Decision.Name(response.decision).removeprefix("DECISION_")
    assert a["credscope.from_cache"] is False
    assert a["credscope.request_id"] == response.request_id
    assert a["credscope.tier"] == "pro"
    assert rpc.status.code == trace_pb2.Status.STATUS_CODE_UNSET

    inference = collector.wait_for(lambda s: mine(s) and s.name == "credscope.inference")[0]
    assert inference.parent_span_id == rpc.span_id
    assert rpc.start_time_unix_nano <= inference.start_time_unix_nano <= inference.end_time_unix_nano \
        <= rpc.end_time_unix_nano
    ia = attrs(inference)
    assert ia["credscope.batch_size"] == 1 and ia["credscope.model_version"] == response.model_version
    assert ia["credscope.decision"] == a["credscope.decision"]

    resource = next(r for r, s in collector.spans if s.span_id == rpc.span_id)
    assert resource["service.name"] == "credscope"


def test_error_path_keeps_rich_status_and_records_the_code(traced_server, collector, api_key) -> None:  # type: ignore[no-untyped-def]
    header, trace_id, parent_id = traceparent()
    bad = applicant_from_mapping({**APPLICANT})
    bad.amt_credit = -5
    with grpc.insecure_channel(traced_server.target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            scoring_pb2_grpc.ScoringServiceStub(ch).Score(scoring_pb2.ScoreRequest(applicant=bad), timeout=10,
                                                          metadata=[("traceparent", header), ("x-api-key", api_key)])
    err = info.value
    # The tracing interceptor leaves the abort intact: code, rich details and trailing metadata.
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)
    assert status is not None
    violations = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            violations = [v.field for v in br.field_violations]
    assert "applicant.amt_credit" in violations
    assert dict(err.trailing_metadata()).get("x-request-id")

    rpc = collector.wait_for(lambda s: s.trace_id.hex() == trace_id and s.kind == trace_pb2.Span.SPAN_KIND_SERVER)[0]
    assert rpc.parent_span_id.hex() == parent_id
    assert attrs(rpc)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rpc.status.code == trace_pb2.Status.STATUS_CODE_UNSET  # a client fault is no server error


def test_auth_abort_keeps_rich_status_inside_the_span(traced_server, collector, api_key) -> None:  # type: ignore[no-untyped-def]
    """The auth interceptor aborts (inside the span) with ErrorInfo details and trailing metadata."""
    header, trace_id, parent_id = traceparent()
    unknown = "csk_unknown_" + secrets.token_hex(16)
    with grpc.insecure_channel(traced_server.target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            scoring_pb2_grpc.ScoringServiceStub(ch).Score(
                scoring_pb2.ScoreRequest(applicant=applicant_from_mapping(APPLICANT)), timeout=10,
                metadata=[("traceparent", header), ("x-api-key", unknown)])
    err = info.value
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    status = rpc_status.from_call(err)
    assert status is not None and any(d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in status.details)
    assert dict(err.trailing_metadata()).get("x-request-id")
    rpc = collector.wait_for(lambda s: s.trace_id.hex() == trace_id and s.kind == trace_pb2.Span.SPAN_KIND_SERVER)[0]
    assert rpc.parent_span_id.hex() == parent_id
    assert attrs(rpc)["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert rpc.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    for v in attrs(rpc).values():
        assert unknown not in str(v)


def test_batch_inference_span_and_a_new_trace_without_traceparent(traced_server, collector, api_key) -> None:  # type: ignore[no-untyped-def]
    applicants = [applicant_from_mapping(fresh()) for _ in range(3)]
    request_id = "trace-batch-" + secrets.token_hex(4)
    with grpc.insecure_channel(traced_server.target) as ch:
        scoring_pb2_grpc.ScoringServiceStub(ch).BatchScore(
            scoring_pb2.BatchScoreRequest(applicants=applicants, request_id=request_id), timeout=10)
    rpc = collector.wait_for(lambda s: attrs(s).get("credscope.request_id") == request_id)[0]
    assert rpc.name == "credscope.v1.ScoringService/BatchScore" and rpc.parent_span_id == b""  # a new root
    assert attrs(rpc)["credscope.batch_size"] == 3
    children = {s.name: s for s in collector.wait_for(lambda s: s.parent_span_id == rpc.span_id, count=3)}
    # New applicants: looked up (missed), scored, then audited.
    assert set(children) == {"credscope.cache.get", "credscope.inference", "credscope.audit.enqueue"}
    assert attrs(children["credscope.audit.enqueue"])["credscope.predictions"] == 3
    assert attrs(children["credscope.cache.get"])["credscope.keys"] == 3
    assert attrs(children["credscope.cache.get"])["credscope.hits"] == 0
    assert attrs(children["credscope.inference"])["credscope.batch_size"] == 3


def test_no_applicant_data_or_key_in_any_span(traced_server, collector, api_key) -> None:  # type: ignore[no-untyped-def]
    header, trace_id, _ = traceparent()
    with grpc.insecure_channel(traced_server.target) as ch:
        stub = scoring_pb2_grpc.ScoringServiceStub(ch)
        stub.Score(scoring_pb2.ScoreRequest(applicant=applicant_from_mapping(fresh())), timeout=10,
                   metadata=[("traceparent", header), ("x-api-key", api_key)])
        stub.BatchScore(scoring_pb2.BatchScoreRequest(applicants=[applicant_from_mapping(APPLICANT)]), timeout=10,
                        metadata=[("x-api-key", api_key)])
    collector.wait_for(lambda s: s.trace_id.hex() == trace_id and s.name == "credscope.inference")
    with collector.lock:
        spans = list(collector.spans)
    assert spans
    for resource, span in spans:
        values = [str(v) for v in (*attrs(span).values(), *resource.values(), span.name)]
        values += [str(_value(a.value)) for e in span.events for a in e.attributes]
        for v in values:
            assert api_key not in v and api_key.split("_", 2)[2] not in v
            for fragment in SECRET_FRAGMENTS:
                assert fragment not in v, f"span {span.name} carries applicant data: {v!r}"
        keys = " ".join(attrs(span))
        assert "amt_" not in keys.lower() and "api_key" not in keys and "x-api-key" not in keys
