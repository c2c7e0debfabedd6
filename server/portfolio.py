"""Portfolio economics of credit decisions: expected value of a scored batch, realised profit from outcomes.

Pure domain code (numpy only, nothing from grpc): BatchScore, the ``credscope-roi`` report and the
telemetry sidecar share it.

Loan parameters (defaults are the seed's; a BatchScore request or ``credscope-roi`` may override each)::

    A    average_loan_amount      500,000     > 0
    r    interest_rate            0.12        yearly, 0 to 1
    n    term_months              60          1 to 600
    LGD  loss_given_default       0.70        share of the amount lost on a default, 0 to 1
    c_p  processing_cost          500         one-off cost of originating a loan, >= 0
    c_o  operating_cost_per_year  1,000       cost of servicing a loan for a year, >= 0

Unit economics of one loan (undiscounted, no time value of money)::

    i  = r / 12                                monthly rate
    M  = A * i / (1 - (1 + i) ** -n)           annuity (level monthly payment); A / n when r = 0
    I  = n * M - A                             interest paid over the term of an amortising loan
    R  = I - c_p - c_o * n / 12                net revenue of a REPAID loan
    L  = LGD * A + c_p                         loss on a DEFAULTED loan

A repaid loan earns its interest and costs its origination and its servicing for the whole term. A
default is counted as if it happened before any interest was earned, with the full amount exposed
(conservative: payments received before the default are ignored); LGD is the economic loss share of
that exposure, which in the usual (Basel) sense already includes the costs of collection, so only
the origination cost is added. At the defaults: M = 11,122.22, I = 167,333.43, R = 161,833.43,
L = 350,500.

Expected value of approving an applicant with default probability p::

    EV(p) = (1 - p) * R - p * L

Approving pays on average when p < p* = R / (R + L), the break-even probability (0.3159 at the
defaults; 0 when R <= 0).

**Batch portfolio metrics** (:func:`portfolio_metrics`, BatchScore). Only APPROVE decisions are loans.
A REVIEW goes to a person whose decision is not known when the batch is scored, so REVIEW (like
REJECT) counts in its own count and in the risk distribution but adds nothing to the approvals, the
expected value or the expected defaults. Over the N scored applicants (errors excluded)::

    approval_rate                = approved / N                        (0 when N = 0)
    expected_portfolio_value     = sum over APPROVE of EV(p)
    expected_defaults            = sum over APPROVE of p
    expected_default_rate        = expected_defaults / approved        (0 with no approvals)
    expected_value_per_approval  = expected_portfolio_value / approved (0 with no approvals)

**Realised figures** (:func:`outcome_figures`, ROI) for applications with a decision and an observed
outcome (defaulted or repaid). "Approved" is a set of applications: APPROVE under the policy (REVIEW
and REJECT are declined: a REVIEW's final decision is not in the audit trail), ``p < t`` for a
threshold t, or everything (the approve-all baseline). Taking default as the positive class and
"declined" as the predicted positive, the confusion matrix is::

    true negative  TN = approved and repaid      (good loans)
    false negative FN = approved and defaulted   (bad loans)
    false positive FP = declined and repaid      (good applicants turned away)
    true positive  TP = declined and defaulted   (defaults prevented)

    revenue           = TN * R
    losses            = FN * L
    net profit        = revenue - losses
    opportunity cost  = FP * R        profit forgone on turned-away good applicants (reported, not subtracted)
    profit per loan   = net profit / approved                              (0 with no approvals)
    approval rate     = approved / total                                   (0 with no applications)
    default rate among approved = FN / approved                            (0 with no approvals)

**Profit curve** (:func:`profit_curve`): net profit when approving ``p < t``, for ``points`` thresholds
t evenly spaced over [0, 1]. The optimum is the threshold of the highest profit; of equal profits, the
lowest threshold (fewest loans for the same money).

**Comparison with a baseline** (:func:`compare`) on the same applications::

    profit improvement  = net profit - baseline net profit
    defaults prevented  = baseline FN - FN
    extra approvals     = approved - baseline approved       (negative: fewer approvals)

When the baseline was measured on other applications (another model version's rows of the audit
trail), the baseline's per-application figures are scaled to this population's size first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = [
    "DECISIONS",
    "approvals_below",
    "RISK_LEVELS",
    "Comparison",
    "LoanParameters",
    "OutcomeFigures",
    "PortfolioMetrics",
    "ProfitCurve",
    "compare",
    "decision_matrix",
    "expected_value",
    "outcome_figures",
    "portfolio_metrics",
    "profit_curve",
]

DECISIONS = ("APPROVE", "REVIEW", "REJECT")
RISK_LEVELS = ("VERY_LOW", "LOW", "MEDIUM", "HIGH", "VERY_HIGH")
MAX_TERM_MONTHS = 600


@dataclass(frozen=True)
class LoanParameters:
    """The loan economics behind the money figures (see the module docstring for the formulas)."""

    average_loan_amount: float = 500_000.0
    interest_rate: float = 0.12
    term_months: int = 60
    loss_given_default: float = 0.70
    processing_cost: float = 500.0
    operating_cost_per_year: float = 1_000.0

    def problems(self) -> list[tuple[str, str]]:
        """Every out-of-range parameter as ``(field name, what to send instead)``; empty when valid."""
        out: list[tuple[str, str]] = []

        def check(name: str, ok: bool, rule: str) -> None:
            value = getattr(self, name)
            if not ok:
                out.append((name, f"must be {rule}, got {value!r}"))

        def finite(v: float) -> bool:
            return isinstance(v, int | float) and math.isfinite(v)

        a, r, n = self.average_loan_amount, self.interest_rate, self.term_months
        lgd, cp, co = self.loss_given_default, self.processing_cost, self.operating_cost_per_year
        check("average_loan_amount", finite(a) and a > 0, "a finite amount greater than 0")
        check("interest_rate", finite(r) and 0 <= r <= 1, "a yearly rate from 0 to 1 (0.12 = 12%)")
        check("term_months", isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_TERM_MONTHS,
              f"a whole number of months from 1 to {MAX_TERM_MONTHS}")
        check("loss_given_default", finite(lgd) and 0 <= lgd <= 1, "a share from 0 to 1 (0.7 = 70%)")
        check("processing_cost", finite(cp) and cp >= 0, "a finite cost of 0 or more")
        check("operating_cost_per_year", finite(co) and co >= 0, "a finite cost of 0 or more")
        return out

    def validated(self) -> LoanParameters:
        """Self, or ValueError naming every bad parameter."""
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(f"{name} {why}" for name, why in problems))
        return self

    def replace(self, **overrides: float | int | None) -> LoanParameters:
        """A copy with the given parameters changed (``None`` keeps the current value)."""
        values = asdict(self)
        unknown = set(overrides) - set(values)
        if unknown:
            raise TypeError(f"unknown loan parameter(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return LoanParameters(**values)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @property
    def monthly_payment(self) -> float:
        """M: the annuity payment, ``A i / (1 - (1 + i)^-n)`` with i = r / 12 (``A / n`` at r = 0)."""
        a, n, i = self.average_loan_amount, self.term_months, self.interest_rate / 12.0
        if i == 0:
            return a / n
        return a * i / -math.expm1(-n * math.log1p(i))

    @property
    def total_interest(self) -> float:
        """I = n M - A: interest paid over the term."""
        return self.term_months * self.monthly_payment - self.average_loan_amount

    @property
    def net_revenue(self) -> float:
        """R = I - c_p - c_o n / 12: what a repaid loan earns after its costs."""
        return self.total_interest - self.processing_cost - self.operating_cost_per_year * self.term_months / 12.0

    @property
    def loss_on_default(self) -> float:
        """L = LGD A + c_p: what a defaulted loan loses."""
        return self.loss_given_default * self.average_loan_amount + self.processing_cost

    @property
    def break_even_probability(self) -> float:
        """p* = R / (R + L): approving pays on average below it (0 when a repaid loan earns nothing)."""
        r, loss = self.net_revenue, self.loss_on_default
        return r / (r + loss) if r > 0 else 0.0

    def unit_economics(self) -> dict[str, float]:
        """The per-loan figures, for reports."""
        return {"monthly_payment": self.monthly_payment, "total_interest": self.total_interest,
                "net_revenue_repaid": self.net_revenue, "loss_defaulted": self.loss_on_default,
                "break_even_probability": self.break_even_probability}


def expected_value(p: float | np.ndarray, params: LoanParameters) -> float | np.ndarray:
    """EV(p) = (1 - p) R - p L: expected profit of approving at default probability ``p``."""
    return (1.0 - p) * params.net_revenue - p * params.loss_on_default


# ---------------------------------------------------------------------------------------------------
# Expected figures of a scored batch
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortfolioMetrics:
    """Expected portfolio figures of a scored batch (see the module docstring)."""

    total_applications: int
    approved: int
    review: int
    rejected: int
    approval_rate: float
    expected_portfolio_value: float
    expected_defaults: float
    expected_default_rate: float
    expected_value_per_approval: float
    risk_distribution: dict[str, int]
    loan_parameters: LoanParameters


def portfolio_metrics(probabilities: Sequence[float], decisions: Sequence[str], risk_levels: Sequence[str],
                      params: LoanParameters) -> PortfolioMetrics:
    """Portfolio metrics of scored applicants: their default probabilities, decisions and risk levels.

    Decisions are ``APPROVE``/``REVIEW``/``REJECT``; risk levels ``VERY_LOW`` .. ``VERY_HIGH``.
    """
    if not len(probabilities) == len(decisions) == len(risk_levels):
        raise ValueError("probabilities, decisions and risk_levels differ in length")
    decisions, risk_levels = list(decisions), list(risk_levels)
    counts = {d: decisions.count(d) for d in DECISIONS}
    risk = {level: risk_levels.count(level) for level in RISK_LEVELS}
    total = len(decisions)
    if sum(counts.values()) != total:
        raise ValueError(f"unknown decision(s) {sorted(set(decisions) - set(DECISIONS))}")
    if sum(risk.values()) != total:
        raise ValueError(f"unknown risk level(s) {sorted(set(risk_levels) - set(RISK_LEVELS))}")
    approved = counts["APPROVE"]
    # sum over approvals of (1 - p) R - p L  =  approved R - (R + L) sum(p)
    defaults = math.fsum(float(p) for p, d in zip(probabilities, decisions, strict=True) if d == "APPROVE")
    value = approved * params.net_revenue - (params.net_revenue + params.loss_on_default) * defaults if approved else 0.0
    return PortfolioMetrics(
        total_applications=total, approved=approved, review=counts["REVIEW"], rejected=counts["REJECT"],
        approval_rate=_ratio(approved, total), expected_portfolio_value=value, expected_defaults=defaults,
        expected_default_rate=_ratio(defaults, approved), expected_value_per_approval=_ratio(value, approved),
        risk_distribution=risk, loan_parameters=params)


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


# ---------------------------------------------------------------------------------------------------
# Realised figures from outcomes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutcomeFigures:
    """Realised figures of one set of approvals over applications with known outcomes."""

    total: int
    approved: int
    approved_repaid: int
    approved_defaulted: int
    declined_repaid: int
    declined_defaulted: int
    revenue: float
    losses: float
    opportunity_cost: float
    net_profit: float
    profit_per_loan: float
    profit_per_application: float
    approval_rate: float
    default_rate_approved: float

    @property
    def declined(self) -> int:
        return self.total - self.approved

    def confusion_matrix(self) -> dict[str, int]:
        """Positive class = default; predicted positive = declined."""
        return {"true_negative": self.approved_repaid, "false_negative": self.approved_defaulted,
                "false_positive": self.declined_repaid, "true_positive": self.declined_defaulted}

    def as_dict(self) -> dict[str, float | int | dict[str, int]]:
        out: dict[str, float | int | dict[str, int]] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["declined"] = self.declined
        out["confusion_matrix"] = self.confusion_matrix()
        return out


def _as_bool(name: str, a: np.ndarray | Sequence[bool]) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    return arr.astype(bool)


def outcome_figures(approved: np.ndarray | Sequence[bool], defaulted: np.ndarray | Sequence[bool],
                    params: LoanParameters) -> OutcomeFigures:
    """Realised figures when ``approved[i]`` applications were granted and ``defaulted[i]`` is the outcome."""
    ap, df = _as_bool("approved", approved), _as_bool("defaulted", defaulted)
    if ap.shape != df.shape:
        raise ValueError(f"approved ({ap.size}) and defaulted ({df.size}) differ in length")
    total = int(ap.size)
    tn = int(np.count_nonzero(ap & ~df))
    fn = int(np.count_nonzero(ap & df))
    fp = int(np.count_nonzero(~ap & ~df))
    tp = int(np.count_nonzero(~ap & df))
    n_approved = tn + fn
    revenue = tn * params.net_revenue
    losses = fn * params.loss_on_default
    net = revenue - losses
    return OutcomeFigures(
        total=total, approved=n_approved, approved_repaid=tn, approved_defaulted=fn, declined_repaid=fp,
        declined_defaulted=tp, revenue=revenue, losses=losses, opportunity_cost=fp * params.net_revenue,
        net_profit=net, profit_per_loan=_ratio(net, n_approved), profit_per_application=_ratio(net, total),
        approval_rate=_ratio(n_approved, total), default_rate_approved=_ratio(fn, n_approved))


def decision_matrix(decisions: Sequence[str], defaulted: np.ndarray | Sequence[bool]) -> dict[str, dict[str, int]]:
    """Counts per policy decision and outcome: ``{"APPROVE": {"repaid": n, "defaulted": m}, ...}``."""
    df = _as_bool("defaulted", defaulted)
    if len(decisions) != df.size:
        raise ValueError("decisions and defaulted differ in length")
    out = {d: {"repaid": 0, "defaulted": 0} for d in DECISIONS}
    for d, y in zip(decisions, df, strict=True):
        if d not in out:
            raise ValueError(f"unknown decision {d!r}")
        out[d]["defaulted" if y else "repaid"] += 1
    return out


@dataclass(frozen=True)
class ProfitCurve:
    """Net profit (and approvals) when approving ``p < t``, for each threshold t."""

    thresholds: np.ndarray
    net_profit: np.ndarray
    approved: np.ndarray
    approved_defaulted: np.ndarray

    @property
    def optimum_index(self) -> int:
        """Index of the highest profit; the lowest threshold among equal profits."""
        return int(np.argmax(self.net_profit))  # argmax returns the first maximum

    @property
    def optimum_threshold(self) -> float:
        return float(self.thresholds[self.optimum_index])

    @property
    def optimum_profit(self) -> float:
        return float(self.net_profit[self.optimum_index])

    def approval_rate(self, total: int) -> np.ndarray:
        return self.approved / total if total else np.zeros_like(self.thresholds)

    def default_rate_approved(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.approved > 0, self.approved_defaulted / np.maximum(self.approved, 1), 0.0)


def profit_curve(probabilities: np.ndarray | Sequence[float], defaulted: np.ndarray | Sequence[bool],
                 params: LoanParameters, points: int = 201) -> ProfitCurve:
    """Realised net profit of approving ``p < t`` for ``points`` thresholds evenly spaced over [0, 1]."""
    if points < 2:
        raise ValueError("a profit curve needs at least 2 points")
    p = np.asarray(probabilities, dtype=np.float64)
    df = _as_bool("defaulted", defaulted)
    if p.shape != df.shape:
        raise ValueError("probabilities and defaulted differ in length")
    thresholds = np.linspace(0.0, 1.0, points)
    order = np.argsort(p, kind="stable")
    sorted_p, sorted_df = p[order], df[order]
    # Integer counts: exact, so equal profits compare equal and the optimum's tie-break is reliable.
    cum_good = np.concatenate(([0], np.cumsum(~sorted_df)))
    cum_bad = np.concatenate(([0], np.cumsum(sorted_df)))
    k = np.searchsorted(sorted_p, thresholds, side="left")  # how many have p < t
    good, bad = cum_good[k], cum_bad[k]
    profit = good * params.net_revenue - bad * params.loss_on_default
    return ProfitCurve(thresholds, profit, good + bad, bad)


# ---------------------------------------------------------------------------------------------------
# Comparison with a baseline
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """The model's figures against a baseline's (see the module docstring)."""

    profit_improvement: float
    defaults_prevented: float
    extra_approvals: float
    scaled: bool
    """True when the baseline was measured on other applications and scaled to this population."""

    def as_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def compare(model: OutcomeFigures, baseline: OutcomeFigures, *, same_applications: bool = True) -> Comparison:
    """Profit improvement, defaults prevented and extra approvals of ``model`` over ``baseline``.

    With ``same_applications=False`` the baseline's figures per application are scaled to ``model.total``.
    """
    if same_applications:
        return Comparison(model.net_profit - baseline.net_profit,
                          baseline.approved_defaulted - model.approved_defaulted,
                          model.approved - baseline.approved, scaled=False)
    scale = _ratio(model.total, baseline.total)
    return Comparison(model.net_profit - baseline.net_profit * scale,
                      baseline.approved_defaulted * scale - model.approved_defaulted,
                      model.approved - baseline.approved * scale, scaled=True)


def approvals_below(probabilities: np.ndarray | Iterable[float], threshold: float) -> np.ndarray:
    """Approvals when approving ``p < threshold``."""
    p = probabilities if isinstance(probabilities, np.ndarray) else np.fromiter(probabilities, dtype=np.float64)
    return p < threshold
