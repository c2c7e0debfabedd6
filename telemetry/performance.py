"""Model performance over time, from the outcomes reported for audited predictions.

Predictions are grouped by model version and by time bucket of their ``created_at`` (buckets are
aligned to whole multiples of their width since the Unix epoch, so a bucket is the same in every run).
Per bucket, and over the whole window:

* from every prediction: ``predictions`` and ``approval_rate`` (share of APPROVE decisions);
* from the predictions with an outcome: ``outcomes``, ``default_rate``, ``auc`` (ROC-AUC of the
  probability), and, taking a decision other than APPROVE as the prediction "will default",
  ``precision``, ``recall`` and ``accuracy``;
* ``holdout_auc`` (from the model's metadata) and ``auc_degradation`` = (holdout AUC - AUC) / holdout AUC.

Figures that need outcomes are left out where a bucket has fewer than ``min_outcomes`` of them (and AUC
where only one class occurred). Per-bucket figures are stored in ``model_performance``; the window
figures become the sidecar's gauges.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from telemetry.auditdb import AuditDB, DecisionCount, Labelled, PerformanceRow

METRICS = ("predictions", "approval_rate", "outcomes", "default_rate", "auc", "precision", "recall", "accuracy",
           "holdout_auc", "auc_degradation")


def flagged(decision: str) -> bool:
    """A decision other than APPROVE flags the applicant as a likely default."""
    return not decision.upper().endswith("APPROVE")


def quality(labelled: Sequence[Labelled], min_outcomes: int) -> dict[str, float]:
    """Outcome-based figures of a set of labelled predictions (empty keys where too few)."""
    from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

    out: dict[str, float] = {"outcomes": float(len(labelled))}
    if not labelled:
        return out
    y = np.array([r.defaulted for r in labelled], dtype=np.int64)
    out["default_rate"] = float(y.mean())
    if len(labelled) < min_outcomes:
        return out
    p = np.array([r.probability for r in labelled], dtype=np.float64)
    pred = np.array([flagged(r.decision) for r in labelled], dtype=np.int64)
    if 0 < y.sum() < y.size:
        out["auc"] = float(roc_auc_score(y, p))
    out["precision"] = float(precision_score(y, pred, zero_division=0))
    out["recall"] = float(recall_score(y, pred, zero_division=0))
    out["accuracy"] = float(accuracy_score(y, pred))
    return out


def with_holdout(figures: dict[str, float], holdout_auc: float | None) -> dict[str, float]:
    if holdout_auc:
        figures["holdout_auc"] = float(holdout_auc)
        if "auc" in figures:
            figures["auc_degradation"] = (holdout_auc - figures["auc"]) / holdout_auc
    return figures


@dataclass
class Bucket:
    """One model version's figures in one time bucket."""

    model_version: str
    start: datetime
    end: datetime
    figures: dict[str, float]


@dataclass
class PerformanceReport:
    """Performance per model version: per bucket, and over the whole window."""

    generated_at: datetime
    window_start: datetime
    window_end: datetime
    bucket_seconds: float
    min_outcomes: int
    buckets: list[Bucket] = field(default_factory=list)
    window: dict[str, dict[str, float]] = field(default_factory=dict)
    """model version -> figures over the whole window."""

    def rows(self) -> list[PerformanceRow]:
        """model_performance rows: every figure of every bucket."""
        return [PerformanceRow(b.model_version, metric, value, b.start, b.end)
                for b in self.buckets for metric, value in b.figures.items() if math.isfinite(value)]

    def to_json(self) -> dict[str, Any]:
        def ts(d: datetime) -> str:
            return d.isoformat(timespec="seconds")

        return {
            "generated_at": ts(self.generated_at), "window_start": ts(self.window_start),
            "window_end": ts(self.window_end), "bucket_seconds": self.bucket_seconds,
            "min_outcomes": self.min_outcomes, "window": self.window,
            "buckets": [{**asdict(b), "start": ts(b.start), "end": ts(b.end)} for b in self.buckets],
        }

    def table(self) -> str:
        cols = ("predictions", "approval_rate", "outcomes", "default_rate", "auc", "precision", "recall",
                "accuracy", "auc_degradation")
        heads = ("preds", "approve", "outcomes", "defaults", "AUC", "precision", "recall", "accuracy", "degradation")

        def fmt(metric: str, figures: dict[str, float]) -> str:
            v = figures.get(metric)
            if v is None:
                return "-"
            if metric in ("predictions", "outcomes"):
                return f"{int(v):,}"
            if metric in ("approval_rate", "default_rate", "auc_degradation"):
                return f"{v:.1%}"
            return f"{v:.3f}"

        lines = [f"Model performance {self.window_start:%Y-%m-%d %H:%M} to {self.window_end:%Y-%m-%d %H:%M} UTC, "
                 f"buckets of {self.bucket_seconds / 3600:g} h (figures from outcomes need >= {self.min_outcomes})",
                 "", f"{'model':<17} {'bucket start':<17} " + " ".join(f"{h:>11}" for h in heads)]
        for b in self.buckets:
            lines.append(f"{b.model_version:<17} {b.start:%Y-%m-%d %H:%M} " +
                         " ".join(f"{fmt(m, b.figures):>11}" for m in cols))
        for version, figures in self.window.items():
            holdout = figures.get("holdout_auc")
            lines.append(f"{version:<17} {'whole window':<17} " + " ".join(f"{fmt(m, figures):>11}" for m in cols) +
                         (f"   (holdout AUC {holdout:.3f})" if holdout else ""))
        if not self.buckets:
            lines.append("(no predictions in the window)")
        return "\n".join(lines)


def compute(db: AuditDB, *, now: datetime | None = None, window: timedelta = timedelta(days=30),
            bucket: timedelta = timedelta(days=1), min_outcomes: int = 50,
            holdout_auc: Callable[[str], float | None] = lambda _v: None) -> PerformanceReport:
    """Read the audit trail and compute the figures (``holdout_auc(version)`` gives a model's holdout AUC)."""
    now = now or datetime.now(UTC)
    width = bucket.total_seconds()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    start = epoch + timedelta(seconds=math.floor((now - window - epoch).total_seconds() / width) * width)
    counts: list[DecisionCount] = db.decision_counts(start, width)
    labelled = db.labelled(start)
    by_bucket: dict[tuple[str, int], list[Labelled]] = defaultdict(list)
    by_version: dict[str, list[Labelled]] = defaultdict(list)
    for r in labelled:
        k = int((r.created_at - start).total_seconds() // width)
        by_bucket[(r.model_version, k)].append(r)
        by_version[r.model_version].append(r)
    decisions: dict[tuple[str, int], DecisionCount] = {(c.model_version, c.bucket): c for c in counts}
    report = PerformanceReport(generated_at=now, window_start=start, window_end=now, bucket_seconds=width,
                               min_outcomes=min_outcomes)
    holdouts: dict[str, float | None] = {}
    for version, k in sorted(set(decisions) | set(by_bucket), key=lambda vk: (vk[1], vk[0])):
        if version not in holdouts:
            holdouts[version] = holdout_auc(version)
        figures = quality(by_bucket.get((version, k), []), min_outcomes)
        c = decisions.get((version, k))
        if c is not None and c.predictions:
            figures["predictions"] = float(c.predictions)
            figures["approval_rate"] = c.approved / c.predictions
        b_start = start + timedelta(seconds=k * width)
        report.buckets.append(Bucket(version, b_start, b_start + timedelta(seconds=width),
                                     with_holdout(figures, holdouts[version])))
    for version in sorted(holdouts):
        figures = quality(by_version.get(version, []), min_outcomes)
        total = sum(c.predictions for c in counts if c.model_version == version)
        if total:
            figures["predictions"] = float(total)
            figures["approval_rate"] = sum(c.approved for c in counts if c.model_version == version) / total
        report.window[version] = with_holdout(figures, holdouts[version])
    return report


def write_report(report: PerformanceReport, out_dir: Path) -> dict[str, Path]:
    """Write ``performance.json`` and ``performance.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "performance.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    png_path = out_dir / "performance.png"
    plot(report, png_path)
    return {"json": json_path, "png": png_path}


def plot(report: PerformanceReport, path: Path) -> None:
    """AUC (with the holdout AUC and the 5 % / 10 % degradation lines), precision, recall, accuracy
    and approval rate per bucket, one line per model version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 8), sharex=True, constrained_layout=True)
    versions = sorted({b.model_version for b in report.buckets})
    for version in versions:
        mine = [b for b in report.buckets if b.model_version == version]
        xs = [b.start for b in mine]

        def series(metric: str, buckets: list[Bucket] = mine) -> list[float]:
            return [b.figures.get(metric, float("nan")) for b in buckets]

        line = ax1.plot(xs, series("auc"), marker="o", label=f"AUC {version}")[0]
        holdout = report.window.get(version, {}).get("holdout_auc")
        if holdout:
            ax1.axhline(holdout, color=line.get_color(), linestyle="--", linewidth=1,
                        label=f"holdout AUC {holdout:.3f}")
            ax1.axhline(holdout * 0.95, color="#ff7f0e", linestyle=":", linewidth=1, label="-5 % (warning)")
            ax1.axhline(holdout * 0.90, color="#d62728", linestyle=":", linewidth=1, label="-10 % (critical)")
        for metric, style in (("precision", "-"), ("recall", "--"), ("accuracy", "-."), ("approval_rate", ":")):
            ax2.plot(xs, series(metric), linestyle=style, marker=".", label=f"{metric} {version}")
    ax1.set_ylabel("ROC-AUC")
    ax1.set_title(f"Model performance from reported outcomes, buckets of {report.bucket_seconds / 3600:g} h")
    ax2.set_ylabel("share")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    if not versions:
        ax1.text(0.5, 0.5, "no predictions in the window", ha="center", va="center", transform=ax1.transAxes)
    fig.autofmt_xdate()
    fig.savefig(path, dpi=90)
    plt.close(fig)
