"""Alert rules (promtool check + unit tests) and the Grafana dashboard refer only to metrics that exist."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

import server.input_signals  # noqa: F401 - registers the input contract metrics
import server.metrics  # noqa: F401 - registers the worker metrics in the default registry
from telemetry.collector import SidecarCollector, SidecarState
from tests.telemetry_data import promtool

TELEMETRY = Path(__file__).resolve().parent.parent / "telemetry"
NAME = re.compile(r"\bcredscope_[a-z0-9_]+")
SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def series_names(text: str) -> set[str]:
    """The series names an exposition's ``# TYPE`` lines promise."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.update(name + s for s in SUFFIXES.get(kind, ("",)))
    return names


def known() -> set[str]:
    sidecar = CollectorRegistry()
    sidecar.register(SidecarCollector(SidecarState()))
    return {n for n in series_names(generate_latest(REGISTRY).decode() + generate_latest(sidecar).decode())
            if n.startswith("credscope_")}


def test_every_metric_name_follows_the_conventions() -> None:
    names = known()
    assert "credscope_grpc_requests_total" in names and "credscope_drift_psi" in names
    for n in names:
        assert re.fullmatch(r"credscope_[a-z0-9_]+", n)
        assert not re.search(r"_(milliseconds|ms|kb|mb|percent)(_|$)", n), f"{n}: use base units"


def test_alert_rules_pass_promtool() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(TELEMETRY / "alerts.yml")], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    rules = sum(1 for line in (TELEMETRY / "alerts.yml").read_text().splitlines() if line.strip().startswith("- alert:"))
    assert rules >= 10 and f"SUCCESS: {rules} rules found" in check.stdout  # promtool read every rule of the file
    test = subprocess.run([tool, "test", "rules", str(TELEMETRY / "alerts_test.yml")], capture_output=True,
                          text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_alert_rules_use_existing_metrics() -> None:
    used = set(NAME.findall((TELEMETRY / "alerts.yml").read_text()))
    assert used and used <= known(), f"unknown metrics in alerts.yml: {used - known()}"
    text = (TELEMETRY / "alerts.yml").read_text()
    for alert in ("CredScopeModelPerformanceDegraded", "CredScopeModelPerformanceDegrading",
                  "CredScopeFeatureDriftSignificant", "CredScopeFeatureDriftModerate", "CredScopeHighErrorRate",
                  "CredScopeHighLatency", "CredScopeLowCacheHitRate", "CredScopeHighMemoryUsage",
                  "CredScopeFrequentRateLimiting", "CredScopeInputOutOfRange"):
        assert f"alert: {alert}\n" in text


def test_dashboard_panels_use_existing_metrics() -> None:
    dashboard = json.loads((TELEMETRY / "dashboards" / "credscope.json").read_text())
    assert dashboard["uid"] and dashboard["title"] == "CredScope"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"] for p in panels)
    for wanted in ("Request rate", "Latency P50 / P95 / P99", "Cache hit rate", "Decisions", "Model performance",
                   "CPU", "Memory", "Key usage by tier", "Errors", "Approval rate", "Drift"):
        assert wanted in titles, f"no {wanted} panel"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    names = known()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            used = set(NAME.findall(t["expr"]))
            assert used and used <= names, f"panel {p['title']!r} uses unknown metrics {used - names}"
