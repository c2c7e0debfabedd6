"""BatchScore's portfolio metrics over a real gRPC channel to a real server process."""

from __future__ import annotations

import math

import grpc
import pytest

from client import CredScopeClient, CredScopeRpcError
from credscope.v1 import scoring_pb2
from server.portfolio import LoanParameters, portfolio_metrics
from tests.test_api import applicant

SAFE = {"ext_source_1": 0.9, "ext_source_2": 0.9, "ext_source_3": 0.9}
RISKY = {"ext_source_1": 0.02, "ext_source_2": 0.02, "ext_source_3": 0.02, "days_birth": -7000,
         "days_employed": -30, "amt_annuity": 60000.0}


def _batch() -> list:  # type: ignore[type-arg]
    """Applicants spanning the policy, and one invalid one (index 3) that must not count."""
    return [applicant(**SAFE), applicant(), applicant(**RISKY), applicant(amt_credit=-1.0),
            applicant(ext_source_2=0.3), applicant(ext_source_2=0.05, ext_source_3=0.1), applicant(**SAFE)]


def _expected(r: scoring_pb2.BatchScoreResponse, params: LoanParameters):  # type: ignore[no-untyped-def]
    preds = [res.prediction for res in r.results if res.HasField("prediction")]
    return portfolio_metrics([p.default_probability for p in preds],
                             [scoring_pb2.Decision.Name(p.decision).removeprefix("DECISION_") for p in preds],
                             [scoring_pb2.RiskLevel.Name(p.risk_level).removeprefix("RISK_LEVEL_") for p in preds],
                             params)


def _assert_matches(got: scoring_pb2.PortfolioMetrics, want) -> None:  # type: ignore[no-untyped-def]
    assert (got.total_applications, got.approved, got.review, got.rejected) == (
        want.total_applications, want.approved, want.review, want.rejected)
    for name in ("approval_rate", "expected_portfolio_value", "expected_defaults", "expected_default_rate",
                 "expected_value_per_approval"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-12, abs=1e-9), name
    rd = got.risk_distribution
    assert {k: getattr(rd, k.lower()) for k in want.risk_distribution} == want.risk_distribution
    lp = got.loan_parameters
    for name, value in want.loan_parameters.as_dict().items():
        assert lp.HasField(name) and getattr(lp, name) == pytest.approx(value), name


def test_portfolio_metrics_match_the_returned_predictions(client: CredScopeClient) -> None:
    r = client.batch_score(_batch(), request_id="portfolio-1")
    assert r.results[3].HasField("error")
    want = _expected(r, LoanParameters())
    assert want.total_applications == 6  # the invalid applicant is excluded
    assert want.approved >= 1 and want.rejected + want.review >= 1, "the batch should span the policy"
    _assert_matches(r.portfolio, want)
    assert r.portfolio.loan_parameters.average_loan_amount == 500_000
    assert r.portfolio.loan_parameters.term_months == 60


def test_loan_parameters_override_the_defaults(client: CredScopeClient) -> None:
    overrides = {"interest_rate": 0.2, "term_months": 36, "loss_given_default": 0.45, "average_loan_amount": 25_000.0}
    r = client.batch_score(_batch(), loan_parameters=overrides)
    params = LoanParameters().replace(**overrides)
    want = _expected(r, params)
    _assert_matches(r.portfolio, want)
    assert r.portfolio.loan_parameters.processing_cost == 500  # unset fields keep the defaults
    default = client.batch_score(_batch()).portfolio
    assert r.portfolio.expected_portfolio_value != pytest.approx(default.expected_portfolio_value)


def test_zero_approvals_give_zero_rates(client: CredScopeClient) -> None:
    r = client.batch_score([applicant(**RISKY)] * 3)
    m = r.portfolio
    assert m.total_applications == 3 and m.approved == 0
    assert (m.approval_rate, m.expected_portfolio_value, m.expected_default_rate,
            m.expected_value_per_approval) == (0.0, 0.0, 0.0, 0.0)


def test_bad_loan_parameters_are_invalid_argument_with_field_violations(client: CredScopeClient) -> None:
    bad = {"average_loan_amount": -5.0, "interest_rate": 1.5, "term_months": 0, "loss_given_default": math.nan,
           "processing_cost": -1.0, "operating_cost_per_year": math.inf}
    with pytest.raises(CredScopeRpcError) as e:
        client.batch_score([applicant()], loan_parameters=bad)
    err = e.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "INVALID_ARGUMENT"
    fields = {v.field: v.description for v in err.field_violations}
    assert set(fields) == {f"loan_parameters.{name}" for name in bad}
    assert "from 0 to 1" in fields["loan_parameters.interest_rate"]
    assert "1 to 600" in fields["loan_parameters.term_months"]
    with pytest.raises(CredScopeRpcError) as e:
        client.batch_score([applicant()], loan_parameters={"term_months": 601})
    assert [v.field for v in e.value.field_violations] == ["loan_parameters.term_months"]
