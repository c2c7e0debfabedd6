"""ReportOutcome, GetStats and ListTopFeatures over a real channel to the shared server process (embedded
SQLite audit trail, the default); the admin RPCs with an admin key."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import timestamp_pb2

from client import CredScopeClient, CredScopeRpcError
from credscope.v1 import admin_pb2, scoring_pb2
from tests.audit_helpers import eventually, fetch
from tests.test_api import applicant


def outcome(client: CredScopeClient, request_id: str, value: int) -> scoring_pb2.ReportOutcomeResponse:
    return client.call(client.scoring.ReportOutcome,
                       scoring_pb2.ReportOutcomeRequest(request_id=request_id, outcome=value))


@pytest.fixture()
def admin(server, admin_key: str) -> Iterator[CredScopeClient]:  # type: ignore[no-untyped-def]
    with CredScopeClient(server.target, api_key=admin_key, timeout=10) as c:
        yield c


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def test_report_outcome(client: CredScopeClient) -> None:
    scored = client.score(applicant(amt_income_total=181_000))
    # reported at once: the prediction may still be queued; the server flushes before it looks
    first = outcome(client, scored.request_id, scoring_pb2.OUTCOME_DEFAULTED)
    assert first.request_id == scored.request_id and first.recorded
    assert not outcome(client, scored.request_id, scoring_pb2.OUTCOME_DEFAULTED).recorded  # idempotent
    assert outcome(client, scored.request_id, scoring_pb2.OUTCOME_REPAID).recorded  # a correction replaces it
    batch = client.call(client.scoring.BatchScore, scoring_pb2.BatchScoreRequest(
        applicants=[applicant(amt_income_total=181_001), applicant(amt_credit=500_001)]))
    assert outcome(client, batch.results[1].prediction.request_id, scoring_pb2.OUTCOME_REPAID).recorded

    with pytest.raises(CredScopeRpcError) as e:
        outcome(client, "never-scored-" + scored.request_id, scoring_pb2.OUTCOME_REPAID)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.reason == "NOT_FOUND"
    with pytest.raises(CredScopeRpcError) as e:
        outcome(client, "", scoring_pb2.OUTCOME_UNSPECIFIED)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in e.value.field_violations} == {"request_id", "outcome"}


def test_get_stats_counts_this_period(client: CredScopeClient, admin: CredScopeClient) -> None:
    start = time.time()  # (the server stamps calls when they arrive, after this)
    results = [client.score(applicant(amt_income_total=100_000 + i * 7_919, ext_source_2=0.05 + i * 0.09))
               for i in range(8)]
    with pytest.raises(CredScopeRpcError):
        client.score(applicant(amt_credit=-1.0))
    s = admin.call(admin.admin.GetStats, admin_pb2.GetStatsRequest(start_time=ts(start)))
    assert s.total_predictions == len(results)
    decisions = {c.label: c.count for c in s.by_decision}
    assert set(decisions) == {"APPROVE", "REVIEW", "REJECT"}
    for name in decisions:
        assert decisions[name] == sum(scoring_pb2.Decision.Name(r.decision) == f"DECISION_{name}" for r in results)
    assert sum(c.count for c in s.by_risk_level) == len(results)
    assert s.mean_probability == pytest.approx(sum(r.default_probability for r in results) / len(results))
    assert 0 < s.latency_p50_ms <= s.latency_p95_ms <= s.latency_p99_ms
    assert s.cache_hit_rate == 0.0 and s.error_calls == 1
    assert not s.HasField("challenger")

    later = admin.call(admin.admin.GetStats, admin_pb2.GetStatsRequest(start_time=ts(time.time() + 3600),
                                                                         end_time=ts(time.time() + 7200)))
    assert later.total_predictions == 0 and later.error_calls == 0
    with pytest.raises(CredScopeRpcError) as e:
        admin.call(admin.admin.GetStats, admin_pb2.GetStatsRequest(start_time=ts(time.time()),
                                                                     end_time=ts(time.time() - 60)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_list_top_features_limits(admin: CredScopeClient) -> None:
    top = admin.call(admin.admin.ListTopFeatures, admin_pb2.ListTopFeaturesRequest(
        decision=scoring_pb2.DECISION_APPROVE))
    assert len(top.features) <= 10
    assert [f.mean_abs_shap for f in top.features] == sorted((f.mean_abs_shap for f in top.features), reverse=True)
    for bad in (101, 1000):
        with pytest.raises(CredScopeRpcError) as e:
            admin.call(admin.admin.ListTopFeatures, admin_pb2.ListTopFeaturesRequest(limit=bad))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in e.value.field_violations] == ["limit"]


async def test_calls_auth_refuses_are_audited_and_keys_attributed(server, admin_key: str) -> None:  # type: ignore[no-untyped-def]
    with CredScopeClient(server.target, api_key="csk_not_a_real_key", timeout=10, retries=False) as bad:
        with pytest.raises(CredScopeRpcError) as e:
            bad.score(applicant())
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and e.value.request_id
    with CredScopeClient(server.target, api_key=admin_key, timeout=10) as admin:
        scored = admin.score(applicant(amt_income_total=133_000))
    url = f"sqlite:///{server.cwd / 'credscope.db'}"
    refused = await eventually(lambda: fetch(url, "SELECT status_code, key_id, error FROM api_usage "  # noqa: S608
                                                  f"WHERE request_id = '{e.value.request_id}'"))
    assert refused[0][0] == "UNAUTHENTICATED" and refused[0][1] is None and refused[0][2] == e.value.message
    rows = await eventually(lambda: fetch(url, "SELECT u.key_id, u.tier, p.key_id FROM api_usage u JOIN "  # noqa: S608
                                               "predictions p USING (request_id) "
                                               f"WHERE request_id = '{scored.request_id}'"))
    key_id, tier, pred_key_id = rows[0]
    assert key_id and key_id == pred_key_id and tier == "enterprise" and key_id not in admin_key.split("_")[-1]


async def test_explanations_are_recorded_and_ranked(server, admin_key: str) -> None:  # type: ignore[no-untyped-def]
    with CredScopeClient(server.target, api_key=admin_key, timeout=30) as admin:
        r = admin.call(admin.scoring.Score, scoring_pb2.ScoreRequest(
            applicant=applicant(amt_income_total=177_777), explain=scoring_pb2.ExplainOptions(enabled=True, top_k=4)))
        batch = admin.call(admin.scoring.BatchScore, scoring_pb2.BatchScoreRequest(
            applicants=[applicant(amt_income_total=166_666 + i) for i in range(3)],
            explain=scoring_pb2.ExplainOptions(enabled=True, top_k=3)))
        top = admin.call(admin.admin.ListTopFeatures, admin_pb2.ListTopFeaturesRequest(limit=100))
    url = f"sqlite:///{server.cwd / 'credscope.db'}"
    rows = await fetch(url, "SELECT rank, feature, value, shap_value FROM shap_explanations "  # noqa: S608
                            f"WHERE request_id = '{r.request_id}' ORDER BY rank")
    assert rows == [(k + 1, c.feature, c.value if c.HasField("value") else None, c.shap_value)
                    for k, c in enumerate(r.explanation.contributions)] and len(rows) == 4
    for p in (x.prediction for x in batch.results):
        n = await fetch(url, f"SELECT count(*) FROM shap_explanations WHERE request_id = '{p.request_id}'")  # noqa: S608
        assert n[0][0] == 3
    recorded = {c.feature for c in r.explanation.contributions}
    assert recorded <= {f.feature for f in top.features} and all(f.count >= 1 for f in top.features)


async def test_malformed_calls_are_audited_too(server) -> None:  # type: ignore[no-untyped-def]
    """Undecodable bytes and a bad x-request-id are refused (INVALID_ARGUMENT) and still get an api_usage row,
    without a prediction."""
    with grpc.insecure_channel(server.target) as ch:
        raw = ch.unary_unary("/credscope.v1.ScoringService/Score")
        with pytest.raises(grpc.RpcError) as garbage:
            raw(b"\xff\xff\xff\xff not a protobuf", timeout=10)
        score = ch.unary_unary("/credscope.v1.ScoringService/Score",
                               request_serializer=scoring_pb2.ScoreRequest.SerializeToString)
        with pytest.raises(grpc.RpcError) as bad_id:
            score(scoring_pb2.ScoreRequest(applicant=applicant()), metadata=[("x-request-id", "bad id!")], timeout=10)
    url = f"sqlite:///{server.cwd / 'credscope.db'}"
    for err in (garbage.value, bad_id.value):
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        rid = dict(err.trailing_metadata() or ())["x-request-id"]
        rows = await eventually(lambda rid=rid: fetch(url, "SELECT status_code, error FROM api_usage "  # noqa: S608
                                                           f"WHERE request_id = '{rid}'"))
        assert rows[0] == ("INVALID_ARGUMENT", err.details())
        assert await fetch(url, f"SELECT 1 FROM predictions WHERE request_id = '{rid}'") == []  # noqa: S608
