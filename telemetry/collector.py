"""What the sidecar's ``/metrics`` shows: the workers' metrics summed, plus the sidecar's own figures.

* The server workers' files in the multiprocess directory, through prometheus-client's
  ``MultiProcessCollector`` (counters and histograms summed over workers, live and dead; gauges by
  their multiprocess mode). Workers that died without cleaning up (a crash, a kill -9) get their live
  gauges removed (``mark_process_dead``), when the sidecar can see the workers' pids.
* Drift (PSI, KS) per feature and model performance per model version, from the periodic jobs.
* Host memory and CPU use, and the state of the jobs.

The sidecar creates no metric objects of its own (which, in a process with ``PROMETHEUS_MULTIPROC_DIR``
set, would write files into the workers' directory): its figures are rendered at scrape time.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from telemetry.drift import DriftReport
from telemetry.performance import PerformanceReport

log = logging.getLogger("credscope.telemetry")

_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")

#: Performance gauges: metric -> (name, help).
PERFORMANCE_GAUGES = {
    "auc": ("credscope_model_auc", "ROC-AUC over the performance window, from reported outcomes."),
    "precision": ("credscope_model_precision", "Share of flagged (not approved) applicants that defaulted."),
    "recall": ("credscope_model_recall", "Share of defaulters that were flagged (not approved)."),
    "accuracy": ("credscope_model_accuracy", "Share of outcomes that the decision (approve or not) got right."),
    "approval_rate": ("credscope_model_approval_rate", "Share of predictions that were APPROVE."),
    "default_rate": ("credscope_model_observed_default_rate", "Share of reported outcomes that were defaults."),
    "outcomes": ("credscope_model_outcomes", "Outcomes reported for predictions in the performance window."),
    "holdout_auc": ("credscope_model_holdout_auc", "ROC-AUC of the model on its training holdout."),
    "auc_degradation": ("credscope_model_auc_degradation_ratio",
                        "(holdout AUC - current AUC) / holdout AUC; 0.1 = 10 % worse than at training."),
}


def live_pids(metrics_dir: Path) -> set[int]:
    """Pids that have live-gauge files in the directory."""
    pids = set()
    for f in metrics_dir.glob("gauge_live*_*.db"):
        m = _LIVE_FILE.match(f.name)
        if m:
            pids.add(int(m.group(1)))
    return pids


def prune_dead(metrics_dir: Path) -> list[int]:
    """Remove the live gauges of workers that are gone; return their pids."""
    dead = [pid for pid in live_pids(metrics_dir) if not psutil.pid_exists(pid)]
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(metrics_dir))
    if dead:
        log.info("removed the live gauges of %d dead worker(s): %s", len(dead), dead)
    return dead


class SidecarState:
    """The latest results of the periodic jobs, shared by the job threads and the scrapes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.drift: DriftReport | None = None
        self.performance: PerformanceReport | None = None
        self.runs: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.last_success: dict[str, float] = {}
        self.last_error: dict[str, str] = {}

    def succeeded(self, job: str, when: float) -> None:
        with self.lock:
            self.runs[job] = self.runs.get(job, 0) + 1
            self.last_success[job] = when
            self.last_error.pop(job, None)

    def failed(self, job: str, error: str) -> None:
        with self.lock:
            self.runs[job] = self.runs.get(job, 0) + 1
            self.failures[job] = self.failures.get(job, 0) + 1
            self.last_error[job] = error


class SidecarCollector(Collector):
    """Renders the sidecar's own figures at scrape time."""

    def __init__(self, state: SidecarState) -> None:
        self.state = state
        psutil.cpu_percent(interval=None)  # primes the CPU counter: the next call measures since now

    def collect(self) -> Iterator[Metric]:
        with self.state.lock:
            drift, perf = self.state.drift, self.state.performance
            runs, failures, last = dict(self.state.runs), dict(self.state.failures), dict(self.state.last_success)
        yield from self._drift(drift)
        yield from self._performance(perf)
        mem = psutil.virtual_memory()
        yield GaugeMetricFamily("credscope_host_memory_usage_ratio", "Share of the host's memory in use.",
                                value=mem.percent / 100.0)
        yield GaugeMetricFamily("credscope_host_memory_total_bytes", "The host's memory.", value=float(mem.total))
        yield GaugeMetricFamily("credscope_host_cpu_usage_ratio", "Share of the host's CPU time in use since the "
                                "previous scrape.", value=psutil.cpu_percent(interval=None) / 100.0)
        yield GaugeMetricFamily("credscope_host_cpus", "Logical CPUs of the host.", value=float(psutil.cpu_count() or 1))
        jobs = CounterMetricFamily("credscope_telemetry_job_runs", "Runs of the sidecar's periodic jobs.",
                                   labels=["job"])
        fails = CounterMetricFamily("credscope_telemetry_job_failures", "Failed runs of the sidecar's periodic jobs.",
                                    labels=["job"])
        stamp = GaugeMetricFamily("credscope_telemetry_job_last_success_timestamp_seconds",
                                  "When a sidecar job last succeeded (Unix time).", labels=["job"])
        for job in ("drift", "performance"):
            jobs.add_metric([job], float(runs.get(job, 0)))
            fails.add_metric([job], float(failures.get(job, 0)))
            if job in last:
                stamp.add_metric([job], last[job])
        yield jobs
        yield fails
        yield stamp

    @staticmethod
    def _drift(report: DriftReport | None) -> Iterator[Metric]:
        psi = GaugeMetricFamily("credscope_drift_psi", "Population stability index of a model feature, recent "
                                "inputs vs. the model's reference (0.1 moderate, 0.2 significant).", labels=["feature"])
        ks = GaugeMetricFamily("credscope_drift_ks_statistic", "Two-sample Kolmogorov-Smirnov statistic of a "
                               "numeric feature, recent inputs vs. the reference sample.", labels=["feature"])
        pv = GaugeMetricFamily("credscope_drift_ks_pvalue", "p-value of the KS test of a numeric feature.",
                               labels=["feature"])
        counts = GaugeMetricFamily("credscope_drift_features", "Model features by drift severity.",
                                   labels=["severity"])
        rows = GaugeMetricFamily("credscope_drift_window_rows", "Recent inputs the drift figures are based on.")
        if report is not None:
            for f in report.features:
                if f.psi is not None:
                    psi.add_metric([f.feature], f.psi)
                if f.ks_statistic is not None and f.ks_pvalue is not None:
                    ks.add_metric([f.feature], f.ks_statistic)
                    pv.add_metric([f.feature], f.ks_pvalue)
            for level in ("none", "moderate", "significant"):
                counts.add_metric([level], float(sum(1 for f in report.features if f.severity == level)))
            rows.add_metric([], float(report.rows))
        yield from (psi, ks, pv, counts, rows)

    @staticmethod
    def _performance(report: PerformanceReport | None) -> Iterator[Metric]:
        families = {m: GaugeMetricFamily(name, text, labels=["model_version"])
                    for m, (name, text) in PERFORMANCE_GAUGES.items()}
        if report is not None:
            for version, figures in report.window.items():
                for metric, value in figures.items():
                    if metric in families:
                        families[metric].add_metric([version], value)
        yield from families.values()


def build_registry(metrics_dir: Path | None, state: SidecarState) -> CollectorRegistry:
    """The registry ``/metrics`` renders: the workers' files (if any) and the sidecar's figures."""
    registry = CollectorRegistry(auto_describe=False)
    if metrics_dir is not None:
        multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    registry.register(SidecarCollector(state))
    return registry
