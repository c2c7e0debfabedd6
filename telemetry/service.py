"""The sidecar process: ``/metrics`` and ``/healthz`` over HTTP, and the periodic drift and performance jobs.

Each job runs in its own thread: once at start, then every interval. A job that fails (no audit trail
yet, database down, no model) is logged once per distinct error, counted, and retried next interval;
it never stops the sidecar.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.model import ModelArtifact, ModelNotFoundError, active_version, load_model, read_metadata
from server.settings import Settings
from telemetry import drift, performance
from telemetry.auditdb import AuditDB, AuditUnavailable
from telemetry.collector import SidecarState, build_registry, live_pids, prune_dead

log = logging.getLogger("credscope.telemetry")


class ModelCache:
    """The model whose reference profile drift compares with: the configured version, else the store's
    ACTIVE one (reloaded when ACTIVE changes)."""

    def __init__(self, model_dir: Path, version: str | None) -> None:
        self.model_dir = model_dir
        self.version = version
        self._model: ModelArtifact | None = None
        self._detector: drift.DriftDetector | None = None

    def detector(self) -> drift.DriftDetector:
        wanted = self.version or active_version(self.model_dir)
        if self._detector is None or self._model is None or self._model.version != wanted:
            self._model = load_model(self.model_dir, wanted)
            self._detector = drift.DriftDetector(self._model)
        return self._detector

    def holdout_auc(self, version: str) -> float | None:
        try:
            value = read_metadata(self.model_dir, version).get("metrics", {}).get("roc_auc")
        except Exception:  # noqa: BLE001 - a version no longer in the store has no holdout figure
            return None
        return float(value) if isinstance(value, int | float) else None


def run_drift(settings: Settings, models: ModelCache, db: AuditDB, *, rows: int | None = None,
              hours: float | None = None) -> drift.DriftReport:
    """Drift of the most recent audited inputs (``rows`` at most, from ``hours`` back)."""
    t = settings.telemetry
    since = datetime.now(UTC) - timedelta(hours=hours or t.drift_window_hours)
    raw = db.recent_inputs(since, rows or t.drift_window_rows)
    if len(raw) < t.drift_min_rows:
        raise InsufficientData(f"{len(raw)} audited inputs in the last {hours or t.drift_window_hours:g} h, "
                               f"need {t.drift_min_rows} for drift")
    return models.detector().compare(raw, source=f"audit trail, last {hours or t.drift_window_hours:g} h")


def run_performance(settings: Settings, models: ModelCache, db: AuditDB) -> performance.PerformanceReport:
    t = settings.telemetry
    return performance.compute(db, window=timedelta(days=t.performance_window_days),
                               bucket=timedelta(hours=t.performance_bucket_hours),
                               min_outcomes=t.performance_min_outcomes, holdout_auc=models.holdout_auc)


class InsufficientData(Exception):
    """Too few rows for a figure; not a failure of the sidecar."""


class Sidecar:
    """The running sidecar: HTTP server plus job threads. ``start`` returns once it listens."""

    def __init__(self, settings: Settings, *, jobs: bool = True, prune: bool = True) -> None:
        self.settings = settings
        t = settings.telemetry
        self.metrics_dir = t.metrics_dir.resolve() if t.metrics_dir is not None else None
        if self.metrics_dir is not None:
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self.state = SidecarState()
        self.registry = build_registry(self.metrics_dir, self.state)
        self.models = ModelCache(settings.model.model_dir, settings.model.version)
        self.db = AuditDB(settings.audit.url)
        self.jobs = jobs
        self.prune = prune
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.httpd: ThreadingHTTPServer | None = None
        self.started = time.time()
        self._scrape_lock = threading.Lock()

    # --- jobs -------------------------------------------------------------------------------------

    def drift_job(self) -> None:
        report = run_drift(self.settings, self.models, self.db)
        drift.write_report(report, self.settings.telemetry.report_dir)
        with self.state.lock:
            self.state.drift = report

    def performance_job(self) -> None:
        report = run_performance(self.settings, self.models, self.db)
        stored = self.db.store_performance(report.rows())
        performance.write_report(report, self.settings.telemetry.report_dir)
        with self.state.lock:
            self.state.performance = report
        log.debug("performance: %d bucket(s), %d model_performance row(s)", len(report.buckets), stored)

    def _loop(self, name: str, job: Callable[[], None], interval: float) -> None:
        said: str | None = None
        while not self.stopping.is_set():
            try:
                job()
                self.state.succeeded(name, time.time())
                if said is not None:
                    log.info("%s: working again", name)
                said = None
            except Exception as e:  # noqa: BLE001 - a job failure is reported, never fatal
                message = f"{type(e).__name__}: {e}"
                self.state.failed(name, message)
                if message != said:
                    level = logging.INFO if isinstance(e, InsufficientData | AuditUnavailable | ModelNotFoundError) \
                        else logging.WARNING
                    log.log(level, "%s: %s (retrying every %gs)", name, message, interval)
                    said = message
            self.stopping.wait(interval)

    # --- HTTP -------------------------------------------------------------------------------------

    def metrics_text(self) -> bytes:
        with self._scrape_lock:
            if self.prune and self.metrics_dir is not None:
                prune_dead(self.metrics_dir)
            return generate_latest(self.registry)

    def health(self) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"status": "ok", "uptime_seconds": round(time.time() - self.started, 1)}
        if self.metrics_dir is not None:
            body["metrics_dir"] = str(self.metrics_dir)
            if not self.metrics_dir.is_dir():
                body["status"] = "metrics directory missing"
                return 503, body
            body["live_workers"] = len(live_pids(self.metrics_dir))
        with self.state.lock:
            body["jobs"] = {job: {"runs": self.state.runs.get(job, 0),
                                  "last_success": self.state.last_success.get(job),
                                  "last_error": self.state.last_error.get(job)}
                            for job in ("drift", "performance")}
        return 200, body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sidecar = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "credscope-telemetry"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        self._send(200, CONTENT_TYPE_LATEST, sidecar.metrics_text())
                    except Exception:  # noqa: BLE001 - answer 500 and log, never crash the server thread
                        log.exception("rendering /metrics failed")
                        self._send(500, "text/plain; charset=utf-8", b"error rendering metrics; see the logs\n")
                elif path == "/healthz":
                    code, body = sidecar.health()
                    self._send(code, "application/json", json.dumps(body).encode() + b"\n")
                elif path == "/":
                    self._send(200, "text/plain; charset=utf-8",
                               b"credscope-telemetry: /metrics (Prometheus), /healthz\n")
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                log.debug("%s %s", self.address_string(), format % args)

        return Handler

    def start(self) -> int:
        """Listen, start the jobs; return the bound port."""
        t = self.settings.telemetry
        self.httpd = ThreadingHTTPServer((t.http_host, t.http_port), self._handler())
        self.httpd.daemon_threads = True
        http_thread = threading.Thread(target=self.httpd.serve_forever, name="telemetry-http", daemon=True)
        http_thread.start()
        self.threads.append(http_thread)
        if self.jobs:
            for name, job, interval in (("drift", self.drift_job, t.drift_interval_seconds),
                                        ("performance", self.performance_job, t.performance_interval_seconds)):
                th = threading.Thread(target=self._loop, args=(name, job, interval), name=f"telemetry-{name}",
                                      daemon=True)
                th.start()
                self.threads.append(th)
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        self.stopping.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        for th in self.threads:
            th.join(timeout=10)
