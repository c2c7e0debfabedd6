"""ScoringService end to end over a real gRPC channel to a real server process."""

from __future__ import annotations

import math
import re
import uuid

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import CredScopeClient, CredScopeRpcError
from credscope.v1 import admin_pb2, applicant_pb2, scoring_pb2
from server.convert import applicant_to_row, rows_to_matrix
from server.policy import Policy

GOOD = {
    "name_contract_type": "Cash loans", "amt_income_total": 202500, "amt_credit": 406597.5, "amt_annuity": 24700.5,
    "amt_goods_price": 351000, "name_income_type": "Working", "name_education_type": "Higher education",
    "days_birth": -12000, "days_employed": -2000, "ext_source_2": 0.6, "ext_source_3": 0.5, "cnt_fam_members": 2,
}
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")  # UUIDv7, made by the server


def applicant(**overrides) -> applicant_pb2.Applicant:  # type: ignore[no-untyped-def]
    from client.applicants import applicant_from_mapping

    a = applicant_from_mapping(GOOD)
    for k, v in overrides.items():
        setattr(a, k, v)
    return a


def expected_probability(model, a: applicant_pb2.Applicant) -> float:  # type: ignore[no-untyped-def]
    row, violations = applicant_to_row(a)
    assert not violations
    return float(model.predict_proba(rows_to_matrix([row]))[0])


def violations_of(err: CredScopeRpcError) -> dict[str, str]:
    return {v.field: v.description for v in err.field_violations}


def test_health_serving_and_reflection(server) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "credscope.v1.ScoringService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"credscope.v1.ScoringService", "credscope.v1.AdminService", "grpc.health.v1.Health"} <= names


def test_score_matches_model_and_policy(client: CredScopeClient, model) -> None:  # type: ignore[no-untyped-def]
    # an applicant no other test sends (the server and its cache may be shared by the tests of the session)
    a = applicant(amt_income_total=GOOD["amt_income_total"] + 0.01 * (uuid.uuid4().int % 10_000 + 1))
    r = client.score(a)
    p = expected_probability(model, a)
    assert r.default_probability == pytest.approx(p, abs=1e-9)
    decision, risk, conf = Policy.from_metadata(model.metadata["policy"]).decide(p)
    assert scoring_pb2.Decision.Name(r.decision) == f"DECISION_{decision}"
    assert scoring_pb2.RiskLevel.Name(r.risk_level) == f"RISK_LEVEL_{risk}"
    assert r.confidence == pytest.approx(conf)
    assert r.model_version == model.version
    assert UUID_RE.match(r.request_id)
    assert client.last_metadata["x-request-id"] == r.request_id
    assert r.timestamp.seconds > 0 and r.processing_time_ms > 0
    assert r.from_cache is False


def test_score_decisions_span_the_policy(client: CredScopeClient) -> None:
    """A safe and a risky applicant land on opposite sides of the policy."""
    safe = client.score(applicant(ext_source_1=0.9, ext_source_2=0.9, ext_source_3=0.9))
    risky = client.score(applicant(ext_source_1=0.02, ext_source_2=0.02, ext_source_3=0.02, days_birth=-7000,
                                   days_employed=-30, amt_annuity=60000.0))
    assert safe.default_probability < risky.default_probability
    assert safe.decision == scoring_pb2.DECISION_APPROVE
    assert risky.decision in (scoring_pb2.DECISION_REVIEW, scoring_pb2.DECISION_REJECT)


def test_missing_optional_fields_are_scored(client: CredScopeClient, model) -> None:  # type: ignore[no-untyped-def]
    a = applicant_pb2.Applicant(amt_income_total=100000, amt_credit=300000, days_birth=-15000)
    r = client.score(a)
    assert r.default_probability == pytest.approx(expected_probability(model, a), abs=1e-9)
    assert 0 < r.default_probability < 1


def test_request_id_from_body_and_metadata(client: CredScopeClient) -> None:
    r = client.score(applicant(), request_id="loan-2026-000123")
    assert r.request_id == "loan-2026-000123" and client.last_metadata["x-request-id"] == "loan-2026-000123"
    rid = f"md-{uuid.uuid4()}"
    r = client.call(client.scoring.Score, scoring_pb2.ScoreRequest(applicant=applicant()), request_id=rid)
    assert r.request_id == rid
    with pytest.raises(CredScopeRpcError) as e:
        client.score(applicant(), request_id="bad id with spaces")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in violations_of(e.value)
    with pytest.raises(CredScopeRpcError) as e:
        client.call(client.scoring.Score, scoring_pb2.ScoreRequest(applicant=applicant()), request_id="x" * 200)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "metadata.x-request-id" in violations_of(e.value)


@pytest.mark.parametrize(("overrides", "field", "hint"), [
    ({"amt_credit": -5.0}, "applicant.amt_credit", "greater than 0"),
    ({"amt_income_total": math.nan}, "applicant.amt_income_total", "finite"),
    ({"amt_annuity": math.inf}, "applicant.amt_annuity", "finite"),
    ({"ext_source_2": 1.5}, "applicant.ext_source_2", "at most 1"),
    ({"ext_source_1": -0.1}, "applicant.ext_source_1", "at least 0"),
    ({"days_birth": 100}, "applicant.days_birth", "at most -6574"),
    ({"days_employed": 5000}, "applicant.days_employed", "365243"),
    ({"name_income_type": 99}, "applicant.name_income_type", "unknown value"),
    ({"region_rating_client": 7}, "applicant.region_rating_client", "at most 3"),
    ({"amt_credit": 0.0}, "applicant.amt_credit", "is required"),
])
def test_invalid_fields_are_named(client: CredScopeClient, overrides: dict, field: str, hint: str) -> None:
    with pytest.raises(CredScopeRpcError) as e:
        client.score(applicant(**overrides))
    err = e.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "INVALID_ARGUMENT"
    assert field in violations_of(err), violations_of(err)
    assert hint in violations_of(err)[field]
    assert "Traceback" not in err.message
    assert err.request_id


def test_every_bad_field_is_reported_at_once(client: CredScopeClient) -> None:
    with pytest.raises(CredScopeRpcError) as e:
        client.score(applicant(amt_credit=-1.0, ext_source_3=2.0, cnt_children=-3))
    assert {"applicant.amt_credit", "applicant.ext_source_3", "applicant.cnt_children"} <= set(violations_of(e.value))


def test_missing_applicant(client: CredScopeClient) -> None:
    with pytest.raises(CredScopeRpcError) as e:
        client.call(client.scoring.Score, scoring_pb2.ScoreRequest())
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "applicant" in violations_of(e.value)


def test_days_employed_unemployed_code_is_accepted(client: CredScopeClient) -> None:
    r = client.score(applicant(days_employed=365243, name_income_type=applicant_pb2.INCOME_TYPE_PENSIONER))
    assert 0 < r.default_probability < 1


def test_batch_scores_good_applicants_and_reports_bad_ones(client: CredScopeClient, model) -> None:  # type: ignore[no-untyped-def]
    apps = [applicant(), applicant(amt_credit=-1.0), applicant(ext_source_2=0.1),
            applicant(name_family_status=42, ext_source_1=7.0), applicant(amt_income_total=50000.0)]
    r = client.batch_score(apps, request_id="batch-1")
    assert [res.index for res in r.results] == list(range(5))
    bad = {res.index for res in r.results if res.HasField("error")}
    assert bad == {1, 3}
    err3 = r.results[3].error
    assert err3.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert {v.field for v in err3.field_violations} == {"applicants[3].name_family_status", "applicants[3].ext_source_1"}
    probs = model.predict_proba(rows_to_matrix([applicant_to_row(apps[i])[0] for i in (0, 2, 4)]))
    for i, p in zip((0, 2, 4), probs, strict=True):
        pred = r.results[i].prediction
        assert pred.default_probability == pytest.approx(float(p), abs=1e-9)
        assert pred.request_id == f"batch-1/{i}"
        assert pred.model_version == model.version
    assert r.request_id == "batch-1" and r.model_version == model.version


def test_batch_matches_single_scores(client: CredScopeClient) -> None:
    rng = np.random.default_rng(3)
    apps = [applicant(ext_source_2=float(x), amt_credit=float(c))
            for x, c in zip(rng.uniform(0, 1, 50), rng.uniform(1e5, 1e6, 50), strict=True)]
    batch = client.batch_score(apps)
    adverse = 0
    for a, res in zip(apps, batch.results, strict=True):
        single = client.score(a)
        pred = res.prediction
        assert pred.default_probability == pytest.approx(single.default_probability, abs=1e-7)
        assert (pred.decision, pred.risk_level, pred.model_version) == (
            single.decision, single.risk_level, single.model_version)
        assert pred.confidence == pytest.approx(single.confidence, abs=1e-7)
        assert [r.code for r in pred.reasons] == [r.code for r in single.reasons]  # adverse decisions' reasons
        assert [r.text for r in pred.reasons] == [r.text for r in single.reasons]
        adverse += bool(pred.reasons)
    assert adverse  # (the test needs a few adverse decisions to mean anything)


def test_batch_limits(client: CredScopeClient) -> None:
    with pytest.raises(CredScopeRpcError) as e:
        client.batch_score([])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "applicants" in violations_of(e.value)
    with pytest.raises(CredScopeRpcError) as e:
        client.batch_score([applicant()] * 1001)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000" in violations_of(e.value)["applicants"]
    assert len(client.batch_score([applicant()] * 1000).results) == 1000


def test_model_info(client: CredScopeClient, model) -> None:  # type: ignore[no-untyped-def]
    info = client.model_info()
    assert info.model_version == model.version
    assert list(info.model_features) == list(model.features)
    assert "AMT_CREDIT" in info.input_features and "PAYMENT_RATE" in info.model_features
    assert info.policy.approve_below == 0.20 and info.policy.review_below == 0.50
    assert 0.6 < info.metrics["roc_auc"] < 0.95
    assert [v.version for v in info.versions if v.active] == [model.version]
    assert info.training_source == "synthetic"


def test_admin_rpcs_are_not_open(client: CredScopeClient) -> None:
    with pytest.raises(CredScopeRpcError) as e:
        client.admin_call("ClearCache", admin_pb2.ClearCacheRequest())
    assert e.value.code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED,
                            grpc.StatusCode.UNAUTHENTICATED)


def test_garbage_bytes_get_a_status_and_server_keeps_serving(server, client: CredScopeClient) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as ch:
        raw = ch.unary_unary("/credscope.v1.ScoringService/Score")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff\xff not a protobuf", timeout=5)
        assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    assert client.score(applicant()).default_probability > 0
