"""Property-based and malformed-input tests over a real channel: every call gets a proper status with a
helpful message, nothing leaks internals, and the server keeps serving."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import CredScopeClient, CredScopeRpcError
from credscope.v1 import applicant_pb2, scoring_pb2
from server.schema import BY_FIELD, COLUMNS
from tests.test_api import applicant

FIELDS = applicant_pb2.Applicant.DESCRIPTOR.fields_by_name
LEAKS = ("Traceback", 'File "', "Exception", "sqlite", "asyncpg", "psycopg", "numpy", "onnxruntime")
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}

any_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
    [0.0, -0.0, 1e-320, -1e-320, 1e308, -1e308, 365243.0, 0.5, 1.0]))
any_int32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 365243, -20000]))


def value_for(field: str) -> st.SearchStrategy:
    f = FIELDS[field]
    if f.enum_type is not None:
        return st.integers(-5, 40)
    if f.type == f.TYPE_BOOL:
        return st.booleans()
    if f.type in (f.TYPE_INT32, f.TYPE_INT64):
        return any_int32
    return any_float


@st.composite
def applicants(draw: st.DrawFn) -> applicant_pb2.Applicant:
    a = applicant()
    for col in COLUMNS:
        choice = draw(st.sampled_from(("keep", "clear", "random")))
        if choice == "clear":
            a.ClearField(col.field)
        elif choice == "random":
            setattr(a, col.field, draw(value_for(col.field)))
    return a


def check_error(err: CredScopeRpcError) -> None:
    assert err.code in ALLOWED, (err.code, err.message)
    text = err.message + " ".join(v.description for v in err.field_violations)
    for leak in LEAKS:
        assert leak not in text, text
    assert err.field_violations, "INVALID_ARGUMENT must name the fields to fix"
    for v in err.field_violations:
        name = v.field.removeprefix("applicant.")
        assert name in BY_FIELD, v.field


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=applicants())
def test_random_applicants_get_a_score_or_named_violations(client: CredScopeClient, a: applicant_pb2.Applicant) -> None:
    try:
        r = client.score(a)
    except CredScopeRpcError as e:
        check_error(e)
        return
    assert 0.0 <= r.default_probability <= 1.0 and not math.isnan(r.default_probability)
    assert r.decision != scoring_pb2.DECISION_UNSPECIFIED and r.risk_level != scoring_pb2.RISK_LEVEL_UNSPECIFIED
    # What the server accepted is valid under the schema.
    for col in COLUMNS:
        if FIELDS[col.field].has_presence and not a.HasField(col.field):
            continue
        value = getattr(a, col.field)
        if col.kind == "categorical":
            assert value == 0 or 1 <= value <= len(col.categories)
        elif not (value == 0 and not FIELDS[col.field].has_presence):
            assert col.check(float(value)) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=512))
def test_random_bytes_as_messages(server, data: bytes) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as ch:
        for method in ("Score", "BatchScore", "GetModelInfo"):
            call = ch.unary_unary(f"/credscope.v1.ScoringService/{method}")
            try:
                call(data, timeout=5)
            except grpc.RpcError as e:
                assert e.code() in ALLOWED | {grpc.StatusCode.UNIMPLEMENTED}, (method, e.code(), e.details())
                for leak in LEAKS:
                    assert leak not in (e.details() or "")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rid=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
       key=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=200))
def test_random_metadata(server, rid: str, key: str) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as ch:
        call = ch.unary_unary("/credscope.v1.ScoringService/Score", request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=scoring_pb2.ScoreResponse.FromString)
        md = [("x-request-id", rid), ("x-api-key", key)]
        try:
            call(scoring_pb2.ScoreRequest(applicant=applicant()), metadata=md, timeout=5)
        except grpc.RpcError as e:
            assert e.code() in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED}, e.details()


def test_oversized_message_is_refused_and_server_keeps_serving(client: CredScopeClient) -> None:
    big = scoring_pb2.ScoreRequest(applicant=applicant(), request_id="x" * (17 * 1024 * 1024))
    with pytest.raises(CredScopeRpcError) as e:
        client.call(client.scoring.Score, big)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.score(applicant()).default_probability > 0


def test_huge_batch_is_refused_with_the_limit(client: CredScopeClient) -> None:
    with pytest.raises(CredScopeRpcError) as e:
        client.batch_score([applicant()] * 5000)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000" in e.value.field_violations[0].description


def test_expired_deadline_is_not_scored(client: CredScopeClient) -> None:
    with pytest.raises(CredScopeRpcError) as e:
        client.batch_score([applicant()] * 1000, timeout=0.0005)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
