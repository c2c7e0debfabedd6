"""Converters between the protobuf API and :mod:`server.portfolio` (messages only, no grpc)."""

from __future__ import annotations

from collections.abc import Iterable

from credscope.v1 import scoring_pb2
from server.errors import Violation
from server.portfolio import LoanParameters, PortfolioMetrics, portfolio_metrics
from server.settings import PortfolioSettings

_FIELDS = tuple(f.name for f in scoring_pb2.LoanParameters.DESCRIPTOR.fields)
_DECISION_NAME = {scoring_pb2.Decision.Value(f"DECISION_{d}"): d for d in ("APPROVE", "REVIEW", "REJECT")}
_RISK_NAME = {scoring_pb2.RiskLevel.Value(f"RISK_LEVEL_{r}"): r
              for r in ("VERY_LOW", "LOW", "MEDIUM", "HIGH", "VERY_HIGH")}


def default_loan_parameters(settings: PortfolioSettings) -> LoanParameters:
    """The server's default loan parameters (settings group ``portfolio``)."""
    return LoanParameters(**{name: getattr(settings, name) for name in _FIELDS})


def loan_parameters_from_proto(msg: scoring_pb2.LoanParameters, defaults: LoanParameters,
                               path: str = "loan_parameters") -> tuple[LoanParameters, list[Violation]]:
    """The request's loan parameters over the defaults, and a violation per out-of-range field."""
    params = defaults.replace(**{name: getattr(msg, name) for name in _FIELDS if msg.HasField(name)})
    return params, [Violation(f"{path}.{name}", why) for name, why in params.problems()]


def portfolio_of(predictions: Iterable[scoring_pb2.Prediction], params: LoanParameters) -> PortfolioMetrics:
    """Portfolio metrics over the returned predictions (errors excluded by the caller)."""
    probs, decisions, levels = [], [], []
    for p in predictions:
        probs.append(p.default_probability)
        decisions.append(_DECISION_NAME[p.decision])
        levels.append(_RISK_NAME[p.risk_level])
    return portfolio_metrics(probs, decisions, levels, params)


def fill_portfolio(msg: scoring_pb2.PortfolioMetrics, m: PortfolioMetrics) -> None:
    """Write the metrics into a PortfolioMetrics message (loan parameters echoed, defaults filled in)."""
    msg.total_applications = m.total_applications
    msg.approved = m.approved
    msg.review = m.review
    msg.rejected = m.rejected
    msg.approval_rate = m.approval_rate
    msg.expected_portfolio_value = m.expected_portfolio_value
    msg.expected_defaults = m.expected_defaults
    msg.expected_default_rate = m.expected_default_rate
    msg.expected_value_per_approval = m.expected_value_per_approval
    rd = msg.risk_distribution
    for level, count in m.risk_distribution.items():
        setattr(rd, level.lower(), count)
    lp = msg.loan_parameters
    for name in _FIELDS:
        setattr(lp, name, getattr(m.loan_parameters, name))
