"""``credscope-roi``: what the model's decisions earned, against a baseline, and the profit-maximising threshold.

Two sources of decisions with known outcomes:

* ``--csv FILE``: a labelled CSV (Home Credit columns + ``TARGET``, e.g. ``python -m tools.datagen --seed 9
  --rows 20000 --out holdout.csv``) scored in-process through a model of the store (``--model-dir``,
  ``--model-version``; the ACTIVE one by default) under its own decision policy;
* ``--audit``: the audit trail (``--audit-url``, default the server's ``audit.url`` setting,
  ``CREDSCOPE_AUDIT__URL``; SQLite or PostgreSQL): the recorded predictions that have a reported
  outcome (``predictions JOIN outcomes``) and the decisions recorded with them.

Baselines: approve everyone (default), approve ``p < --baseline-threshold``, or another model version
(``--baseline-model-version``: for a CSV, the same rows scored by that version under its policy; for
the audit trail, that version's own audited rows, scaled per application to this population).

The money figures follow :mod:`server.portfolio` (formulas in its docstring and the README). The
report goes to ``--out-dir`` (``reports/``): ``<name>.json`` (every figure and the profit curve),
``<name>.png`` (profit, approval rate and default rate against the threshold, policy and optimum
marked) and ``<name>.txt`` (the table printed on standard output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from server.portfolio import (
    LoanParameters,
    ProfitCurve,
    approvals_below,
    compare,
    decision_matrix,
    outcome_figures,
    profit_curve,
)

__all__ = ["Baseline", "RoiError", "Scored", "build_report", "main", "read_audit", "render_table",
           "score_csv", "write_plot"]

SCORE_CHUNK = 50_000
Say = Callable[[str], None]


class RoiError(Exception):
    """A report cannot be made (no data, unknown model, unreachable database); the message says why."""


@dataclass
class Scored:
    """Applications with a default probability, a decision and an observed outcome."""

    probabilities: np.ndarray
    decisions: list[str]
    defaulted: np.ndarray
    model_version: str
    approve_below: float
    review_below: float

    def __len__(self) -> int:
        return int(self.probabilities.size)

    @property
    def approved(self) -> np.ndarray:
        return np.fromiter((d == "APPROVE" for d in self.decisions), dtype=bool, count=len(self.decisions))


@dataclass(frozen=True)
class Baseline:
    """What the model is compared with: ``approve_all``, ``threshold`` or ``model_version``."""

    kind: str = "approve_all"
    threshold: float | None = None
    model_version: str | None = None

    def describe(self) -> str:
        if self.kind == "threshold":
            return f"threshold p<{self.threshold:g}"
        if self.kind == "model_version":
            return f"model {self.model_version}"
        return "approve all"


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------


def _quiet(_message: str) -> None:
    pass


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_model(model_dir: Path, version: str | None) -> Any:
    from server.model import ModelError, load_model

    try:
        return load_model(model_dir, version)
    except ModelError as e:
        raise RoiError(str(e)) from None


def score_csv(path: Path, model_dir: Path, version: str | None = None, *, say: Say = _quiet,
              frame: Any = None) -> Scored:
    """Score a labelled CSV with a model of the store under its policy (``frame``: the already read CSV)."""
    from server.scoring import Scorer
    from tools.train import encode_frame, load_frame

    if frame is None:
        try:
            frame = load_frame(path)
        except (OSError, ValueError) as e:
            raise RoiError(f"cannot read {path}: {e}") from None
    scorer = Scorer(_load_model(model_dir, version))
    n = len(frame)
    probs = np.empty(n, dtype=np.float64)
    decisions: list[str] = []
    started = time.perf_counter()
    for start in range(0, n, SCORE_CHUNK):
        part = frame.iloc[start:start + SCORE_CHUNK]
        results = scorer.score(encode_frame(part))
        probs[start:start + len(results)] = [r.probability for r in results]
        decisions.extend(r.decision for r in results)
        say(f"scored {start + len(results):,}/{n:,} rows with model {scorer.version} "
            f"({time.perf_counter() - started:.1f}s)")
    defaulted = frame["TARGET"].to_numpy().astype(int).astype(bool)
    return Scored(probs, decisions, defaulted, scorer.version, scorer.policy.approve_below,
                  scorer.policy.review_below)


_AUDIT_SQL = ("SELECT p.probability, p.decision, p.model_version, o.defaulted "
              "FROM predictions p JOIN outcomes o ON o.request_id = p.request_id "
              "WHERE p.probability IS NOT NULL AND o.defaulted IS NOT NULL "
              "AND p.decision IN ('APPROVE', 'REVIEW', 'REJECT')")
AuditRow = tuple[float, str, str, bool]


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "t", "true", "y", "yes")
    return bool(v)


def _read_sqlite(url: str) -> list[AuditRow]:
    from server.db import sqlite_path

    path = sqlite_path(url)
    if not path.is_file():
        raise RoiError(f"no audit database at {path}: run the server with auditing on (audit.url = {url}), "
                       f"or pass --audit-url")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute(_AUDIT_SQL + " ORDER BY p.created_at, p.request_id").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise RoiError(f"cannot read the audit trail in {path}: {e} (is it a CredScope audit database, "
                       "migrated with credscope-migrate?)") from None
    return [(float(p), str(d), str(v), _as_bool(y)) for p, d, v, y in rows]


async def _read_postgres(url: str) -> list[AuditRow]:
    import asyncpg

    from server.db import redact

    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (TimeoutError, OSError, asyncpg.PostgresError) as e:
        raise RoiError(f"cannot connect to the audit database {redact(url)}: {type(e).__name__}") from None
    try:
        rows = await conn.fetch(_AUDIT_SQL + " ORDER BY p.created_at, p.request_id")
    except asyncpg.PostgresError as e:
        raise RoiError(f"cannot read the audit trail in {redact(url)}: {e.__class__.__name__}: "
                       f"{getattr(e, 'message', '')} (migrated with credscope-migrate?)") from None
    finally:
        await conn.close()
    return [(float(r["probability"]), str(r["decision"]), str(r["model_version"]), _as_bool(r["defaulted"]))
            for r in rows]


def read_audit(url: str, *, say: Say = _quiet) -> list[AuditRow]:
    """Predictions with a reported outcome: ``(probability, decision, model_version, defaulted)`` rows."""
    from server.db import dialect, redact

    try:
        kind = dialect(url)
    except ValueError as e:
        raise RoiError(str(e)) from None
    say(f"reading predictions with outcomes from {redact(url)}")
    rows = _read_sqlite(url) if kind == "sqlite" else asyncio.run(_read_postgres(url))
    say(f"read {len(rows):,} predictions with outcomes")
    return rows


def _policy_of(model_dir: Path, version: str) -> tuple[float, float]:
    """The decision thresholds of a stored version; the seed policy when it is not in the store."""
    from server.model import ModelError, read_metadata
    from server.policy import Policy

    try:
        policy = Policy.from_metadata(read_metadata(model_dir, version).get("policy"))
    except ModelError:
        policy = Policy()
    return policy.approve_below, policy.review_below


def audit_scored(rows: Sequence[AuditRow], versions: set[str] | None, model_dir: Path, label: str) -> Scored:
    """The rows of the given model versions (all when None) as a :class:`Scored`."""
    chosen = [r for r in rows if versions is None or r[2] in versions]
    if not chosen:
        which = f" of model version {', '.join(sorted(versions))}" if versions else ""
        raise RoiError(f"the audit trail has no predictions{which} with a reported outcome ({label}); "
                       "report outcomes with the ReportOutcome RPC (credscope report-outcome)")
    seen: dict[str, int] = {}
    for r in chosen:
        seen[r[2]] = seen.get(r[2], 0) + 1
    main_version = max(seen, key=lambda v: seen[v])
    approve_below, review_below = _policy_of(model_dir, main_version)
    return Scored(np.array([r[0] for r in chosen], dtype=np.float64), [r[1] for r in chosen],
                  np.array([r[3] for r in chosen], dtype=bool), ",".join(sorted(seen)), approve_below, review_below)


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------


def build_report(model: Scored, baseline: Baseline, params: LoanParameters, *, baseline_scored: Scored | None = None,
                 same_applications: bool = True, points: int = 201, source: dict[str, Any] | None = None
                 ) -> tuple[dict[str, Any], ProfitCurve]:
    """Every figure of the report as a JSON-ready dict, and the profit curve."""
    if len(model) == 0:
        raise RoiError("no applications with an outcome: nothing to report")
    params.validated()
    policy = outcome_figures(model.approved, model.defaulted, params)
    base_info: dict[str, Any] = {"kind": baseline.kind, "description": baseline.describe()}
    if baseline.kind == "approve_all":
        base = outcome_figures(np.ones(len(model), dtype=bool), model.defaulted, params)
    elif baseline.kind == "threshold":
        assert baseline.threshold is not None
        base_info["threshold"] = baseline.threshold
        base = outcome_figures(approvals_below(model.probabilities, baseline.threshold), model.defaulted, params)
    elif baseline.kind == "model_version":
        if baseline_scored is None:
            raise ValueError("a model_version baseline needs its scored applications")
        base_info.update(model_version=baseline_scored.model_version, approve_below=baseline_scored.approve_below,
                         same_applications=same_applications)
        base = outcome_figures(baseline_scored.approved, baseline_scored.defaulted, params)
    else:
        raise ValueError(f"unknown baseline {baseline.kind!r}")
    same = same_applications or baseline.kind != "model_version"
    curve = profit_curve(model.probabilities, model.defaulted, params, points)
    best = outcome_figures(approvals_below(model.probabilities, curve.optimum_threshold), model.defaulted, params)
    defaults = int(np.count_nonzero(model.defaulted))
    report: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {**(source or {}), "applications": len(model), "defaults": defaults,
                   "default_rate": defaults / len(model), "model_version": model.model_version},
        "loan_parameters": params.as_dict(),
        "unit_economics": params.unit_economics(),
        "policy": {"approve_below": model.approve_below, "review_below": model.review_below,
                   "decision_matrix": decision_matrix(model.decisions, model.defaulted), **policy.as_dict()},
        "baseline": {**base_info, **base.as_dict()},
        "comparison": compare(policy, base, same_applications=same).as_dict(),
        "optimum": {"threshold": curve.optimum_threshold, **best.as_dict(),
                    "vs_policy": compare(best, policy).as_dict(),
                    "vs_baseline": compare(best, base, same_applications=same).as_dict()},
        "profit_curve": {"thresholds": curve.thresholds.tolist(), "net_profit": curve.net_profit.tolist(),
                         "approved": curve.approved.tolist(), "approved_defaulted": curve.approved_defaulted.tolist()},
    }
    return report, curve


def _money(x: float) -> str:
    return f"{x:,.0f}"


def _signed(x: float, money: bool = False) -> str:
    return f"{x:+,.0f}" if money or abs(x - round(x)) < 1e-9 else f"{x:+,.1f}"


def render_table(report: dict[str, Any]) -> str:
    """The report as a readable text table."""
    src, lp, ue = report["source"], report["loan_parameters"], report["unit_economics"]
    pol, base, best, cmp = report["policy"], report["baseline"], report["optimum"], report["comparison"]
    where = src.get("path") or src.get("url") or ""
    lines = [
        f"CredScope ROI report: {src.get('kind', '')} {where}".rstrip(),
        f"{src['applications']:,} applications with outcomes, {src['defaults']:,} defaults "
        f"({src['default_rate']:.2%}); model {src['model_version']}",
        f"loan: {_money(lp['average_loan_amount'])} at {lp['interest_rate']:.2%} over {lp['term_months']} months, "
        f"LGD {lp['loss_given_default']:.0%}, processing {_money(lp['processing_cost'])}, "
        f"operating {_money(lp['operating_cost_per_year'])}/year",
        f"per loan: a repaid loan earns {ue['net_revenue_repaid']:,.2f}, a default loses "
        f"{ue['loss_defaulted']:,.2f}; break-even default probability {ue['break_even_probability']:.3f}",
        "",
    ]
    cols = [f"policy (p<{pol['approve_below']:g})", f"baseline ({base['description']})",
            f"optimum (p<{best['threshold']:g})"]
    figures = (pol, base, best)
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("applications", lambda f: f"{f['total']:,}"),
        ("approved", lambda f: f"{f['approved']:,}"),
        ("approval rate", lambda f: f"{f['approval_rate']:.2%}"),
        ("good loans (approved, repaid)", lambda f: f"{f['approved_repaid']:,}"),
        ("bad loans (approved, defaulted)", lambda f: f"{f['approved_defaulted']:,}"),
        ("good applicants declined", lambda f: f"{f['declined_repaid']:,}"),
        ("defaults declined", lambda f: f"{f['declined_defaulted']:,}"),
        ("revenue from good loans", lambda f: _money(f["revenue"])),
        ("losses from defaults", lambda f: _money(f["losses"])),
        ("net profit", lambda f: _money(f["net_profit"])),
        ("opportunity cost", lambda f: _money(f["opportunity_cost"])),
        ("profit per loan", lambda f: _money(f["profit_per_loan"])),
        ("default rate among approved", lambda f: f"{f['default_rate_approved']:.2%}"),
    ]
    width0 = max(len(name) for name, _ in rows)
    widths = [max(len(c), *(len(fmt(f)) for _, fmt in rows)) for c, f in zip(cols, figures, strict=True)]
    lines.append(" " * width0 + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for name, fmt in rows:
        lines.append(name.ljust(width0) + "  " + "  ".join(
            fmt(f).rjust(w) for f, w in zip(figures, widths, strict=True)))
    scaled = " (baseline scaled per application to this population)" if cmp["scaled"] else ""
    lines += [
        "",
        f"policy vs baseline{scaled}: profit {_signed(cmp['profit_improvement'], True)}, defaults prevented "
        f"{_signed(cmp['defaults_prevented'])}, extra approvals {_signed(cmp['extra_approvals'])}",
        f"optimum vs policy: profit {_signed(best['vs_policy']['profit_improvement'], True)}, defaults prevented "
        f"{_signed(best['vs_policy']['defaults_prevented'])}, extra approvals "
        f"{_signed(best['vs_policy']['extra_approvals'])}",
        "",
        "decisions by outcome (policy):  " + "   ".join(
            f"{d} {c['repaid']:,} repaid / {c['defaulted']:,} defaulted" for d, c in pol["decision_matrix"].items()),
    ]
    return "\n".join(lines) + "\n"


def write_plot(report: dict[str, Any], curve: ProfitCurve, path: Path) -> None:
    """Profit curve (top) and approval / default rates (bottom) against the threshold, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = report["source"]["applications"]
    pol, base, best = report["policy"], report["baseline"], report["optimum"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True, height_ratios=(2, 1), layout="constrained")
    try:
        scale = 1e6
        ax.plot(curve.thresholds, curve.net_profit / scale, color="tab:blue", lw=2,
                label="net profit, approving p < threshold")
        ax.axhline(0, color="grey", lw=0.8)
        base_profit = base["net_profit"] * (total / base["total"] if base["total"] and report["comparison"]["scaled"]
                                            else 1)
        ax.axhline(base_profit / scale, color="tab:gray", ls="-.", lw=1.2,
                   label=f"baseline ({base['description']}): {_money(base_profit)}")
        ax.axvline(pol["approve_below"], color="tab:orange", ls="--", lw=1.5,
                   label=f"policy p<{pol['approve_below']:g}: {_money(pol['net_profit'])}")
        ax.axvline(best["threshold"], color="tab:red", ls=":", lw=2,
                   label=f"optimum p<{best['threshold']:g}: {_money(best['net_profit'])}")
        ax.plot([best["threshold"]], [best["net_profit"] / scale], "o", color="tab:red")
        ax.set_ylabel("net profit (millions)")
        ax.set_title(f"CredScope profit curve: {total:,} applications, model {report['source']['model_version']}")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        ax2.plot(curve.thresholds, curve.approval_rate(total) * 100, color="tab:green", label="approval rate")
        ax2.plot(curve.thresholds, curve.default_rate_approved() * 100, color="tab:purple",
                 label="default rate among approved")
        ax2.axvline(pol["approve_below"], color="tab:orange", ls="--", lw=1.5)
        ax2.axvline(best["threshold"], color="tab:red", ls=":", lw=2)
        ax2.set_xlabel("approval threshold on the default probability")
        ax2.set_ylabel("%")
        ax2.set_xlim(0, 1)
        ax2.legend(loc="best", fontsize=8)
        ax2.grid(alpha=0.3)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="credscope-roi",
        description="Profit of the model's decisions from outcomes (a labelled CSV or the audit trail), "
                    "against a baseline, with the profit-maximising threshold. Writes <out-dir>/<name>.json, "
                    ".png and .txt and prints the table. Formulas: server/portfolio.py and the README.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, metavar="FILE",
                     help="labelled CSV (Home Credit columns + TARGET), scored in-process by --model-version")
    src.add_argument("--audit", action="store_true",
                     help="use the audit trail's predictions with reported outcomes (see --audit-url)")
    p.add_argument("--audit-url", default=None,
                   help="audit database (sqlite:///path or postgresql://...); default: the server's audit.url "
                        "setting (CREDSCOPE_AUDIT__URL, sqlite:///credscope.db)")
    p.add_argument("--model-dir", type=Path, default=Path("models"), help="model store (default %(default)s)")
    p.add_argument("--model-version", default=None,
                   help="CSV: the version that scores (default: ACTIVE); audit: only this version's rows "
                        "(default: all rows, less the baseline version's)")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline-threshold", type=float, default=None, metavar="T",
                      help="baseline: approve p < T (default baseline: approve everyone)")
    base.add_argument("--baseline-model-version", default=None, metavar="VERSION",
                      help="baseline: another model version (CSV: scores the same rows; audit: its own rows)")
    d = LoanParameters()
    loan = p.add_argument_group("loan parameters (defaults: the seed's)")
    loan.add_argument("--loan-amount", type=float, default=d.average_loan_amount,
                      help="average loan amount (default %(default)s)")
    loan.add_argument("--interest-rate", type=float, default=d.interest_rate,
                      help="yearly interest rate, 0 to 1 (default %(default)s)")
    loan.add_argument("--term-months", type=int, default=d.term_months, help="term in months (default %(default)s)")
    loan.add_argument("--lgd", type=float, default=d.loss_given_default,
                      help="loss given default, 0 to 1 (default %(default)s)")
    loan.add_argument("--processing-cost", type=float, default=d.processing_cost,
                      help="one-off processing cost per loan (default %(default)s)")
    loan.add_argument("--operating-cost", type=float, default=d.operating_cost_per_year,
                      help="operating cost per loan per year (default %(default)s)")
    p.add_argument("--points", type=int, default=201, help="thresholds on the profit curve (default %(default)s)")
    p.add_argument("--out-dir", type=Path, default=Path("reports"), help="where to write (default %(default)s)")
    p.add_argument("--name", default="roi", help="file name stem of the report files (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress on standard error")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    say: Say = _quiet if args.quiet else _stderr
    params = LoanParameters(args.loan_amount, args.interest_rate, args.term_months, args.lgd,
                            args.processing_cost, args.operating_cost)
    problems = params.problems()
    if problems:
        raise RoiError("bad loan parameters: " + "; ".join(f"{n} {why}" for n, why in problems))
    if args.points < 2:
        raise RoiError("--points must be at least 2")
    if args.baseline_threshold is not None and not 0 <= args.baseline_threshold <= 1:
        raise RoiError("--baseline-threshold must be from 0 to 1")
    baseline = Baseline()
    if args.baseline_threshold is not None:
        baseline = Baseline("threshold", threshold=args.baseline_threshold)
    elif args.baseline_model_version:
        baseline = Baseline("model_version", model_version=args.baseline_model_version)
    baseline_scored, same = None, True
    if args.csv is not None:
        from tools.train import load_frame

        try:
            frame = load_frame(args.csv)
        except (OSError, ValueError) as e:
            raise RoiError(f"cannot read {args.csv}: {e}") from None
        if len(frame) == 0:
            raise RoiError(f"{args.csv} has no labelled rows (TARGET 0 or 1): nothing to report")
        say(f"read {len(frame):,} labelled rows from {args.csv}")
        source: dict[str, Any] = {"kind": "labelled CSV", "path": str(args.csv)}
        model = score_csv(args.csv, args.model_dir, args.model_version, say=say, frame=frame)
        if baseline.kind == "model_version":
            baseline_scored = score_csv(args.csv, args.model_dir, baseline.model_version, say=say, frame=frame)
    else:
        from server.db import redact
        from server.settings import Settings

        url = args.audit_url or Settings().audit.url
        source = {"kind": "audit trail", "url": redact(url)}
        rows = read_audit(url, say=say)
        if args.model_version:
            versions: set[str] | None = {args.model_version}
        elif baseline.kind == "model_version":
            versions = {r[2] for r in rows} - {baseline.model_version or ""}
        else:
            versions = None
        model = audit_scored(rows, versions, args.model_dir, source["url"])
        if baseline.kind == "model_version":
            baseline_scored = audit_scored(rows, {baseline.model_version or ""}, args.model_dir, source["url"])
            same = False
    report, curve = build_report(model, baseline, params, baseline_scored=baseline_scored, same_applications=same,
                                 points=args.points, source=source)
    if args.csv is None:  # champion vs challenger on the same applicants, when a challenger ran
        from tools import roi_challenger

        shadow = roi_challenger.section(roi_challenger.read_pairs(url), params)
        if shadow is not None:
            report["challenger"] = shadow
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / f"{args.name}.json", "png": out / f"{args.name}.png", "table": out / f"{args.name}.txt"}
    report["files"] = {k: str(v) for k, v in files.items()}
    table = render_table(report)
    if "challenger" in report:
        from tools.roi_challenger import render

        table += render(report["challenger"])
    write_plot(report, curve, files["png"])
    files["table"].write_text(table, encoding="utf-8")
    files["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(table)
    say(f"wrote {files['json']}, {files['png']} and {files['table']}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except RoiError as e:
        print(f"credscope-roi: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
