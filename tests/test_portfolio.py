"""server.portfolio: the formulas against hand-computed cases, the edge cases and the profit curve's optimum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.portfolio import (
    LoanParameters,
    approvals_below,
    compare,
    decision_matrix,
    expected_value,
    outcome_figures,
    portfolio_metrics,
    profit_curve,
)

# A small loan, easy to check by hand: 1,000 at 12% a year (1% a month) over 12 months, LGD 50%,
# processing 10, operating 20 a year.
#   M = 1000 * 0.01 / (1 - 1.01^-12) = 10 / (1 - 0.887449) = 88.848789
#   I = 12 * M - 1000 = 66.185464
#   R = I - 10 - 20 * 1 = 36.185464
#   L = 0.5 * 1000 + 10 = 510
SMALL = LoanParameters(average_loan_amount=1000, interest_rate=0.12, term_months=12, loss_given_default=0.5,
                       processing_cost=10, operating_cost_per_year=20)
M, INTEREST, R, L = 88.8487886783416, 66.18546414009916, 36.18546414009916, 510.0


def test_unit_economics_by_hand() -> None:
    assert SMALL.monthly_payment == pytest.approx(M, rel=1e-12)
    assert SMALL.total_interest == pytest.approx(INTEREST, rel=1e-12)
    assert SMALL.net_revenue == pytest.approx(R, rel=1e-12)
    assert SMALL.loss_on_default == L
    assert SMALL.break_even_probability == pytest.approx(R / (R + L))
    # EV(0.1) = 0.9 R - 0.1 L = 32.566918 - 51
    assert expected_value(0.1, SMALL) == pytest.approx(0.9 * 36.18546414 - 51.0, abs=1e-7)


def test_seed_defaults() -> None:
    d = LoanParameters()
    assert (d.average_loan_amount, d.interest_rate, d.term_months, d.loss_given_default, d.processing_cost,
            d.operating_cost_per_year) == (500_000, 0.12, 60, 0.70, 500, 1_000)
    # 500,000 at 1% a month over 60 months: M = 11,122.22, total interest 167,333.43; R = I - 500 - 5 * 1,000
    assert d.monthly_payment == pytest.approx(11_122.2238, abs=1e-4)
    assert d.total_interest == pytest.approx(167_333.43, abs=0.01)
    assert d.net_revenue == pytest.approx(161_833.43, abs=0.01)
    assert d.loss_on_default == 350_500.0
    assert d.break_even_probability == pytest.approx(0.31588, abs=1e-5)


def test_zero_interest_and_unprofitable_loans() -> None:
    free = LoanParameters(average_loan_amount=1200, interest_rate=0.0, term_months=12, processing_cost=5,
                          operating_cost_per_year=10)
    assert free.monthly_payment == 100.0
    assert free.total_interest == pytest.approx(0.0, abs=1e-9)
    assert free.net_revenue == pytest.approx(-15.0)
    assert free.break_even_probability == 0.0  # never worth approving


def test_portfolio_metrics_by_hand() -> None:
    m = portfolio_metrics([0.05, 0.15, 0.30, 0.60], ["APPROVE", "APPROVE", "REVIEW", "REJECT"],
                          ["VERY_LOW", "LOW", "MEDIUM", "VERY_HIGH"], SMALL)
    assert (m.total_applications, m.approved, m.review, m.rejected) == (4, 2, 1, 1)
    assert m.approval_rate == 0.5
    # (0.95 R - 0.05 L) + (0.85 R - 0.15 L) = 1.8 R - 0.2 L; REVIEW and REJECT add nothing
    assert m.expected_portfolio_value == pytest.approx(1.8 * R - 0.2 * L, rel=1e-12)
    assert m.expected_portfolio_value == pytest.approx(-36.866164548, abs=1e-8)
    assert m.expected_defaults == pytest.approx(0.20)
    assert m.expected_default_rate == pytest.approx(0.10)
    assert m.expected_value_per_approval == pytest.approx((1.8 * R - 0.2 * L) / 2)
    assert m.risk_distribution == {"VERY_LOW": 1, "LOW": 1, "MEDIUM": 1, "HIGH": 0, "VERY_HIGH": 1}
    assert m.loan_parameters is SMALL


def test_portfolio_with_zero_approvals_and_empty() -> None:
    m = portfolio_metrics([0.3, 0.7], ["REVIEW", "REJECT"], ["MEDIUM", "VERY_HIGH"], SMALL)
    assert (m.total_applications, m.approved, m.review, m.rejected) == (2, 0, 1, 1)
    assert (m.approval_rate, m.expected_portfolio_value, m.expected_defaults, m.expected_default_rate,
            m.expected_value_per_approval) == (0.0, 0.0, 0.0, 0.0, 0.0)
    e = portfolio_metrics([], [], [], LoanParameters())
    assert (e.total_applications, e.approved, e.approval_rate, e.expected_portfolio_value,
            e.expected_default_rate, e.expected_value_per_approval) == (0, 0, 0.0, 0.0, 0.0, 0.0)
    assert sum(e.risk_distribution.values()) == 0
    with pytest.raises(ValueError, match="unknown decision"):
        portfolio_metrics([0.1], ["MAYBE"], ["LOW"], SMALL)


def test_outcome_figures_by_hand() -> None:
    # approved: 3 (2 repaid, 1 defaulted); declined: 2 (1 repaid, 1 defaulted)
    f = outcome_figures([True, True, True, False, False], [False, False, True, False, True], SMALL)
    assert f.confusion_matrix() == {"true_negative": 2, "false_negative": 1, "false_positive": 1, "true_positive": 1}
    assert f.revenue == pytest.approx(2 * R)
    assert f.losses == pytest.approx(L)
    assert f.net_profit == pytest.approx(2 * R - L)
    assert f.opportunity_cost == pytest.approx(R)
    assert f.profit_per_loan == pytest.approx((2 * R - L) / 3)
    assert f.profit_per_application == pytest.approx((2 * R - L) / 5)
    assert f.approval_rate == pytest.approx(0.6)
    assert f.default_rate_approved == pytest.approx(1 / 3)
    assert f.declined == 2 and f.as_dict()["confusion_matrix"]["true_positive"] == 1


def test_outcome_figures_all_defaults_zero_approvals_empty() -> None:
    bad = outcome_figures([True, True, False], [True, True, True], SMALL)
    assert (bad.revenue, bad.losses, bad.net_profit) == (0.0, 2 * L, -2 * L)
    assert bad.profit_per_loan == -L and bad.default_rate_approved == 1.0 and bad.opportunity_cost == 0.0
    assert bad.declined_defaulted == 1
    none = outcome_figures([False, False], [False, True], SMALL)
    assert (none.approved, none.net_profit, none.profit_per_loan, none.default_rate_approved,
            none.approval_rate) == (0, 0.0, 0.0, 0.0, 0.0)
    assert none.opportunity_cost == pytest.approx(R)
    empty = outcome_figures([], [], SMALL)
    assert (empty.total, empty.net_profit, empty.profit_per_loan, empty.profit_per_application,
            empty.approval_rate, empty.default_rate_approved) == (0, 0.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="differ in length"):
        outcome_figures([True], [True, False], SMALL)


def test_decision_matrix() -> None:
    m = decision_matrix(["APPROVE", "APPROVE", "REVIEW", "REJECT"], [False, True, True, True])
    assert m == {"APPROVE": {"repaid": 1, "defaulted": 1}, "REVIEW": {"repaid": 0, "defaulted": 1},
                 "REJECT": {"repaid": 0, "defaulted": 1}}


def test_profit_curve_optimum_on_a_constructed_example() -> None:
    # Sorted by p: good, good, bad, good, good, good, bad, bad. One default (L = 510) costs more than
    # three good loans earn (3 R = 108.6), so the best is to approve exactly the first two: profit 2 R,
    # reached first at the grid threshold 0.15 (0.148 < 0.15 <= 0.252).
    p = [0.252, 0.052, 0.148, 0.351, 0.449, 0.553, 0.651, 0.749]
    y = [True, False, False, False, False, False, True, True]
    curve = profit_curve(p, y, SMALL, points=201)
    assert curve.thresholds[0] == 0.0 and curve.thresholds[-1] == 1.0 and len(curve.thresholds) == 201
    assert curve.optimum_threshold == pytest.approx(0.15)
    assert curve.optimum_profit == pytest.approx(2 * R)
    assert curve.net_profit[0] == 0.0                      # approve nobody
    assert curve.net_profit[-1] == pytest.approx(5 * R - 3 * L)  # approve everyone
    # every point equals the realised profit of approving p < t
    for t, profit, n in zip(curve.thresholds, curve.net_profit, curve.approved, strict=True):
        f = outcome_figures(approvals_below(np.array(p), t), y, SMALL)
        assert profit == pytest.approx(f.net_profit) and n == f.approved


def test_profit_curve_optimum_moves_with_the_economics() -> None:
    # The riskiest-looking applicants repay and the safest defaults. With cheap defaults
    # (L = 0.01 * 1000 + 10 = 20 < R) the two good loans pay for the bad one: approve everyone (the
    # first grid threshold above 0.9 is 1.0). With SMALL's L = 510 they do not: approve nobody.
    cheap = SMALL.replace(loss_given_default=0.01)
    p = [0.1, 0.5, 0.9]
    y = [True, False, False]
    curve = profit_curve(p, y, cheap, points=11)
    assert curve.optimum_threshold == pytest.approx(1.0)
    assert curve.optimum_profit == pytest.approx(2 * cheap.net_revenue - 20.0)
    curve = profit_curve(p, y, SMALL, points=11)
    assert curve.optimum_threshold == 0.0 and curve.optimum_profit == 0.0
    # Nothing repays: the best is to approve nobody, at the lowest threshold.
    curve = profit_curve([0.2, 0.4], [True, True], SMALL, points=5)
    assert curve.optimum_threshold == 0.0 and curve.optimum_profit == 0.0
    # Empty input: a flat zero curve, optimum at 0, no division by zero.
    curve = profit_curve([], [], SMALL)
    assert curve.optimum_profit == 0.0 and curve.optimum_threshold == 0.0
    assert not np.any(curve.default_rate_approved()) and not np.any(curve.approval_rate(0))


def test_compare_same_and_scaled_populations() -> None:
    policy = outcome_figures([True, True, False, False], [False, False, True, False], SMALL)
    approve_all = outcome_figures([True] * 4, [False, False, True, False], SMALL)
    c = compare(policy, approve_all)
    assert c.profit_improvement == pytest.approx(2 * R - (3 * R - L))  # = L - R
    assert (c.defaults_prevented, c.extra_approvals, c.scaled) == (1, -2, False)
    # Baseline on 2 other applications (1 repaid, 1 defaulted, both approved), scaled to 4.
    other = outcome_figures([True, True], [False, True], SMALL)
    s = compare(policy, other, same_applications=False)
    assert s.scaled
    assert s.profit_improvement == pytest.approx(2 * R - 2 * (R - L))
    assert s.defaults_prevented == pytest.approx(2.0) and s.extra_approvals == pytest.approx(-2.0)


def test_loan_parameter_validation_names_every_bad_field() -> None:
    assert LoanParameters().problems() == []
    bad = LoanParameters(average_loan_amount=-5, interest_rate=1.5, term_months=0, loss_given_default=math.nan,
                         processing_cost=-1, operating_cost_per_year=math.inf)
    names = [name for name, _ in bad.problems()]
    assert names == ["average_loan_amount", "interest_rate", "term_months", "loss_given_default",
                     "processing_cost", "operating_cost_per_year"]
    assert LoanParameters(term_months=601).problems()[0][0] == "term_months"
    assert LoanParameters(interest_rate=0.0, loss_given_default=1.0, processing_cost=0,
                          operating_cost_per_year=0, term_months=600).problems() == []
    with pytest.raises(ValueError, match="interest_rate must be a yearly rate from 0 to 1"):
        LoanParameters(interest_rate=2).validated()
    with pytest.raises(TypeError):
        LoanParameters().replace(rate=0.1)
    assert LoanParameters().replace(interest_rate=0.2, term_months=None).term_months == 60
