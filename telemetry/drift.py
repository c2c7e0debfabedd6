"""Data drift: recent inputs against the model's reference profile, feature by feature.

For every model feature (the raw inputs and the engineered features, which the model's own ONNX graph
computes from the inputs) the current values are binned like the reference (``metadata["reference"]``,
written by ``credscope-train``: decile edges of the training split, right-closed, bin of ``v`` =
``searchsorted(edges, v, side="left")``; one bin per category for categoricals and flags), with
missing values as one more bin, and compared by:

* PSI, the population stability index ``sum((cur - ref) * ln(cur / ref))`` with empty bins floored at
  1e-4: below 0.1 no drift, 0.1 to 0.2 moderate, 0.2 and above significant (the seed's thresholds);
* for numeric features, the two-sample Kolmogorov-Smirnov statistic and p-value against the
  reference sample (2,000 training rows stored with the model).

The report comes as JSON, as a table and as a PNG plot of the most drifted features.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from server.model import ModelArtifact

MODERATE = 0.1
SIGNIFICANT = 0.2
EPSILON = 1e-4
#: Fewest present values on each side for a KS test.
KS_MIN = 20


def severity(psi: float | None) -> str:
    """``none`` (< 0.1), ``moderate`` (0.1 to 0.2) or ``significant`` (>= 0.2); ``unknown`` without a PSI."""
    if psi is None or not math.isfinite(psi):
        return "unknown"
    if psi >= SIGNIFICANT:
        return "significant"
    if psi >= MODERATE:
        return "moderate"
    return "none"


def psi(reference: np.ndarray, current: np.ndarray, eps: float = EPSILON) -> float:
    """Population stability index of two proportion vectors over the same bins."""
    ref = np.maximum(np.asarray(reference, dtype=np.float64), eps)
    cur = np.maximum(np.asarray(current, dtype=np.float64), eps)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


@dataclass
class FeatureDrift:
    """Drift of one feature."""

    feature: str
    kind: str
    psi: float | None
    severity: str
    ks_statistic: float | None
    ks_pvalue: float | None
    rows: int
    missing_rate: float
    reference_missing_rate: float
    bins: list[str] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    """Reference proportions per bin (the last bin is 'missing'), over all rows."""
    current: list[float] = field(default_factory=list)


@dataclass
class InputContract:
    """Input contract signals of one applicant field over the window: how often it is missing (against
    the training data) and how often an accepted value lies outside the range seen in training. (Values
    outside the schema's valid range are refused and never reach the audit trail: the server's
    ``credscope_input_out_of_range_total`` counter has them.)"""

    field: str
    rows: int
    missing_rate: float
    reference_missing_rate: float
    out_of_range_rate: float
    reference_min: float | None = None
    reference_max: float | None = None


@dataclass
class DriftReport:
    """Drift of every model feature for one window of inputs."""

    model_version: str
    generated_at: str
    rows: int
    source: str
    features: list[FeatureDrift]
    reference_rows: int = 0
    inputs: list[InputContract] = field(default_factory=list)
    """Input contract signals per applicant field (schema order)."""
    thresholds: dict[str, float] = field(default_factory=lambda: {"moderate": MODERATE, "significant": SIGNIFICANT})

    def by_severity(self, level: str) -> list[str]:
        return [f.feature for f in self.features if f.severity == level]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["summary"] = {level: self.by_severity(level) for level in ("significant", "moderate")}
        out["summary"]["max_psi"] = max((f.psi for f in self.features if f.psi is not None), default=None)
        return out

    def table(self, limit: int | None = None) -> str:
        """A readable table, most drifted first."""
        head = (f"Drift of {self.rows:,} inputs ({self.source}) against model {self.model_version}'s reference "
                f"({self.reference_rows:,} training rows); PSI: < {MODERATE} none, {MODERATE}-{SIGNIFICANT} "
                f"moderate, >= {SIGNIFICANT} significant")
        lines = [head, "",
                 f"{'feature':<28} {'kind':<11} {'PSI':>8}  {'drift':<11} {'KS':>6} {'KS p-value':>10}  "
                 f"{'missing ref -> now':>18}"]
        for f in self.features[:limit]:
            p = "-" if f.psi is None else f"{f.psi:8.4f}"
            ks = "-" if f.ks_statistic is None else f"{f.ks_statistic:6.3f}"
            pv = "-" if f.ks_pvalue is None else f"{f.ks_pvalue:10.2g}"
            miss = f"{f.reference_missing_rate:6.1%} -> {f.missing_rate:6.1%}"
            lines.append(f"{f.feature:<28} {f.kind:<11} {p:>8}  {f.severity:<11} {ks:>6} {pv:>10}  {miss:>18}")
        if self.inputs:
            lines += ["", "Input contract (missing: reference -> now; accepted values outside the training range):",
                      f"{'field':<28} {'missing ref -> now':>18} {'out of range':>13}"]
            for c in sorted(self.inputs, key=lambda c: (c.missing_rate - c.reference_missing_rate
                                                        + c.out_of_range_rate), reverse=True)[:limit]:
                miss = f"{c.reference_missing_rate:6.1%} -> {c.missing_rate:6.1%}"
                lines.append(f"{c.field:<28} {miss:>18} {c.out_of_range_rate:13.1%}")
        sig, mod = self.by_severity("significant"), self.by_severity("moderate")
        lines += ["", f"significant drift: {', '.join(sig) if sig else 'none'}",
                  f"moderate drift:    {', '.join(mod) if mod else 'none'}"]
        return "\n".join(lines)


def _bin_labels(entry: dict[str, Any]) -> list[str]:
    if entry.get("kind") in ("categorical", "flag"):
        return [str(c) for c in entry.get("categories", [])] + ["missing"]
    edges = entry.get("edges") or []
    if not edges:
        return ["present", "missing"]
    labels = [f"<= {edges[0]:.4g}"]
    labels += [f"({a:.4g}, {b:.4g}]" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    labels.append(f"> {edges[-1]:.4g}")
    return labels + ["missing"]


def _current_proportions(entry: dict[str, Any], values: np.ndarray) -> np.ndarray:
    """Proportions over the reference bins plus 'missing', over all rows."""
    n = values.size
    present = values[~np.isnan(values)]
    if entry.get("kind") in ("categorical", "flag"):
        k = len(entry.get("categories", []))
        codes = present.astype(np.int64)
        counts = np.bincount(codes[(codes >= 0) & (codes < k)], minlength=k).astype(np.float64)
    else:
        # The stored edges are the shortest decimals that read back to the float32 edges: compare as float32,
        # like training did (a value equal to an edge belongs to the bin the edge closes).
        edges = np.asarray(entry.get("edges") or [], dtype=np.float32).astype(np.float64)
        counts = np.bincount(np.searchsorted(edges, present, side="left"), minlength=edges.size + 1
                             ).astype(np.float64) if present.size else np.zeros(edges.size + 1)
    return np.append(counts, n - present.size) / max(n, 1)


def _reference_proportions(entry: dict[str, Any]) -> np.ndarray:
    missing = float(entry.get("missing_rate", 0.0))
    props = np.asarray(entry.get("proportions") or [], dtype=np.float64)
    if props.size == 0:
        props = np.zeros(len(entry.get("categories", [])) or len(entry.get("edges") or []) + 1)
    return np.append(props * (1.0 - missing), missing)


class DriftDetector:
    """Compares input matrices with one model's reference profile."""

    def __init__(self, model: ModelArtifact) -> None:
        self.model = model
        reference = model.metadata.get("reference")
        if not reference or "features" not in reference:
            raise ValueError(f"model {model.version} has no reference profile in its metadata; retrain it")
        self.reference = reference
        self.profile: dict[str, dict[str, Any]] = reference["features"]
        sample = reference.get("sample") or {}
        rows = np.array([[np.nan if v is None else v for v in row] for row in sample.get("rows", [])],
                        dtype=np.float32)
        self.sample_features = model.transform(rows) if rows.size else None

    def features_of(self, raw: np.ndarray) -> np.ndarray:
        """Raw input matrix -> the model's features (raw + engineered), by the model's ONNX graph."""
        return self.model.transform(raw)

    def input_contract(self, raw: np.ndarray) -> list[InputContract]:
        """Missing and out-of-training-range rates of every raw input field over ``raw``."""
        from server.schema import COLUMN_NAMES

        n = len(raw)
        out = []
        for j, name in enumerate(COLUMN_NAMES):
            entry = self.profile.get(name) or {}
            values = raw[:, j] if n else np.empty(0, np.float32)
            lo, hi = entry.get("min"), entry.get("max")
            outside = 0
            if entry.get("kind") == "numeric" and lo is not None and hi is not None and n:
                outside = int(((values < np.float32(lo)) | (values > np.float32(hi))).sum())
            out.append(InputContract(
                field=name, rows=n, missing_rate=float(np.isnan(values).mean()) if n else 0.0,
                reference_missing_rate=float(entry.get("missing_rate", 0.0)),
                out_of_range_rate=outside / n if n else 0.0,
                reference_min=None if lo is None else float(lo), reference_max=None if hi is None else float(hi)))
        return out

    def compare(self, raw: np.ndarray, source: str = "audit trail") -> DriftReport:
        """Drift of the inputs ``raw`` (float32 ``[N, len(COLUMNS)]``, NaN = missing)."""
        from scipy import stats

        features = self.features_of(raw) if len(raw) else np.empty((0, len(self.model.features)), np.float32)
        out: list[FeatureDrift] = []
        for j, name in enumerate(self.model.features):
            entry = self.profile.get(name)
            if entry is None:
                continue
            values = features[:, j].astype(np.float64)
            ref = _reference_proportions(entry)
            cur = _current_proportions(entry, values)
            value = psi(ref, cur) if len(values) else None
            ks_stat = ks_p = None
            kind = entry.get("kind", "numeric")
            if kind == "numeric" and self.sample_features is not None:
                a = self.sample_features[:, j].astype(np.float64)
                a = a[np.isfinite(a)]
                b = values[np.isfinite(values)]
                if a.size >= KS_MIN and b.size >= KS_MIN:
                    res = stats.ks_2samp(a, b)
                    ks_stat, ks_p = float(res.statistic), float(res.pvalue)
            out.append(FeatureDrift(
                feature=name, kind=kind, psi=value, severity=severity(value), ks_statistic=ks_stat, ks_pvalue=ks_p,
                rows=int(values.size), missing_rate=float(np.isnan(values).mean()) if values.size else 0.0,
                reference_missing_rate=float(entry.get("missing_rate", 0.0)), bins=_bin_labels(entry),
                reference=[round(float(x), 6) for x in ref], current=[round(float(x), 6) for x in cur]))
        out.sort(key=lambda f: -1.0 if f.psi is None else f.psi, reverse=True)
        return DriftReport(inputs=self.input_contract(raw), model_version=self.model.version, generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
                           rows=int(len(raw)), source=source, features=out,
                           reference_rows=int(self.reference.get("n_rows", 0)))


# --- report files ---------------------------------------------------------------------------------

def write_report(report: DriftReport, out_dir: Path, top: int = 4) -> dict[str, Path]:
    """Write ``drift.json`` and ``drift.png`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "drift.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    png_path = out_dir / "drift.png"
    plot(report, png_path, top=top)
    return {"json": json_path, "png": png_path}


def plot(report: DriftReport, path: Path, top: int = 4, bars: int = 20) -> None:
    """PSI of the most drifted features (bars, with the thresholds), then reference vs. current
    distributions of the ``top`` most drifted ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [f for f in report.features if f.psi is not None]
    shown = scored[:bars]
    detail = [f for f in scored[:top] if f.psi is not None]
    fig = plt.figure(figsize=(13, 5 + 3.2 * math.ceil(max(len(detail), 1) / 2)), constrained_layout=True)
    grid = fig.add_gridspec(1 + math.ceil(max(len(detail), 1) / 2), 2, height_ratios=[1.6] + [1] * math.ceil(
        max(len(detail), 1) / 2))
    ax = fig.add_subplot(grid[0, :])
    colors = {"significant": "#d62728", "moderate": "#ff7f0e", "none": "#2ca02c", "unknown": "#7f7f7f"}
    names = [f.feature for f in shown][::-1]
    values = [f.psi or 0.0 for f in shown][::-1]
    ax.barh(names, values, color=[colors[f.severity] for f in shown][::-1])
    ax.axvline(MODERATE, color=colors["moderate"], linestyle="--", linewidth=1, label=f"moderate ({MODERATE})")
    ax.axvline(SIGNIFICANT, color=colors["significant"], linestyle="--", linewidth=1,
               label=f"significant ({SIGNIFICANT})")
    ax.set_xlabel("PSI")
    ax.set_title(f"Drift of {report.rows:,} inputs ({report.source}) vs. model {report.model_version} reference "
                 f"(top {len(shown)} of {len(report.features)} features)")
    ax.legend(loc="lower right")
    ax.tick_params(axis="y", labelsize=8)
    for k, f in enumerate(detail):
        sub = fig.add_subplot(grid[1 + k // 2, k % 2])
        x = np.arange(len(f.bins))
        sub.bar(x - 0.2, f.reference, width=0.4, label="reference", color="#1f77b4")
        sub.bar(x + 0.2, f.current, width=0.4, label="recent", color=colors[f.severity])
        sub.set_xticks(x, f.bins, rotation=45, ha="right", fontsize=7)
        ks = "" if f.ks_statistic is None else f", KS {f.ks_statistic:.3f} (p={f.ks_pvalue:.2g})"
        sub.set_title(f"{f.feature}: PSI {f.psi:.3f} ({f.severity}){ks}", fontsize=9)
        sub.set_ylabel("share of rows")
        sub.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    plt.close(fig)
