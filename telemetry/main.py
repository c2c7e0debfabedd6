"""``credscope-telemetry``: the telemetry sidecar and its one-off reports.

    credscope-telemetry serve         /metrics + /healthz for the server workers, periodic drift and performance
    credscope-telemetry drift         drift report of recent audited inputs (or a CSV) vs. the model's reference
    credscope-telemetry performance   model performance over time from reported outcomes

Settings come from the same ``CREDSCOPE_*`` variables as the server (``CREDSCOPE_TELEMETRY__*``,
``CREDSCOPE_AUDIT__URL``, ``CREDSCOPE_MODEL__MODEL_DIR``); flags win.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from server.settings import Settings

log = logging.getLogger("credscope.telemetry")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audit-url", help="audit trail: sqlite:///path.db or postgresql://user@host/db "
                                       "(default: CREDSCOPE_AUDIT__URL, else sqlite:///credscope.db)")
    p.add_argument("--model-dir", type=Path, help="model store (default ./models)")
    p.add_argument("--model-version", help="model whose reference/holdout figures to use (default: ACTIVE)")
    p.add_argument("--out", type=Path, help="report directory (default ./reports)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default INFO)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="credscope-telemetry",
        description="CredScope's telemetry sidecar: serves the metrics of all server workers on one /metrics "
                    "(with drift and model-performance gauges) and writes drift and performance reports. "
                    "Without a command it runs 'serve'.")
    sub = p.add_subparsers(dest="command", metavar="{serve,drift,performance}")

    s = sub.add_parser("serve", help="run the sidecar: /metrics, /healthz, periodic drift and performance",
                       description="Serve /metrics (the server workers' multiprocess metrics summed, plus drift, "
                                   "performance and host gauges) and /healthz, and compute drift and performance "
                                   "periodically into the report directory and model_performance.")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="HTTP port (default 9464; 0 picks a free one)")
    s.add_argument("--metrics-dir", type=Path, help="the workers' prometheus multiprocess directory "
                                                    "(CREDSCOPE_TELEMETRY__METRICS_DIR; the server's --metrics-dir)")
    s.add_argument("--drift-interval", type=float, help="seconds between drift runs (default 300)")
    s.add_argument("--performance-interval", type=float, help="seconds between performance runs (default 600)")
    s.add_argument("--no-jobs", action="store_true", help="serve metrics only; no drift or performance jobs")
    s.add_argument("--no-prune", action="store_true",
                   help="keep the live gauges of workers whose pid is gone (use when the sidecar cannot see the "
                        "workers' processes, e.g. a container without a shared pid namespace)")
    _common(s)

    d = sub.add_parser("drift", help="drift report: PSI and KS per feature, as a table, JSON and PNG",
                       description="Compare recent audited inputs (or a CSV of applicants) with the model's "
                                   "reference profile, feature by feature: PSI (< 0.1 none, 0.1-0.2 moderate, "
                                   ">= 0.2 significant) and the KS test. Prints a table; writes drift.json and "
                                   "drift.png into the report directory.")
    d.add_argument("--rows", type=int, help="most recent audited inputs to use (default 5000)")
    d.add_argument("--hours", type=float, help="only inputs from this many hours back (default 24)")
    d.add_argument("--min-rows", type=int, help="fewest inputs to report on (default 200)")
    d.add_argument("--csv", type=Path, help="read applicants from a CSV with Home Credit column names instead "
                                            "of the audit trail")
    d.add_argument("--top", type=int, default=None, help="rows of the table (default: every feature)")
    d.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    d.add_argument("--fail-on", choices=("moderate", "significant"),
                   help="exit with status 3 when any feature drifts this much or more")
    _common(d)

    f = sub.add_parser("performance", help="model performance per time bucket from reported outcomes",
                       description="AUC, precision, recall, accuracy and approval rate per time bucket and model "
                                   "version, with the degradation against the holdout AUC; prints a table, writes "
                                   "performance.json and performance.png and stores the figures in "
                                   "model_performance.")
    f.add_argument("--days", type=float, help="how far back (default 30)")
    f.add_argument("--bucket-hours", type=float, help="bucket width in hours (default 24)")
    f.add_argument("--min-outcomes", type=int, help="fewest outcomes for figures that need them (default 50)")
    f.add_argument("--no-store", action="store_true", help="do not write model_performance")
    f.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    _common(f)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    return p.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    settings = Settings()
    t = settings.telemetry
    for flag, target, attr in (("audit_url", settings.audit, "url"), ("model_dir", settings.model, "model_dir"),
                               ("model_version", settings.model, "version"), ("out", t, "report_dir"),
                               ("host", t, "http_host"), ("port", t, "http_port"), ("metrics_dir", t, "metrics_dir"),
                               ("drift_interval", t, "drift_interval_seconds"),
                               ("performance_interval", t, "performance_interval_seconds"),
                               ("rows", t, "drift_window_rows"), ("hours", t, "drift_window_hours"),
                               ("min_rows", t, "drift_min_rows"), ("days", t, "performance_window_days"),
                               ("bucket_hours", t, "performance_bucket_hours"),
                               ("min_outcomes", t, "performance_min_outcomes")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(target, attr, value)
    if args.log_level:
        settings.log_level = args.log_level.upper()
    return settings


def serve(settings: Settings, args: argparse.Namespace) -> int:
    from telemetry.service import Sidecar

    sidecar = Sidecar(settings, jobs=not args.no_jobs, prune=not args.no_prune)
    port = sidecar.start()
    t = settings.telemetry
    print(f"credscope-telemetry listening on http://{t.http_host}:{port} (/metrics, /healthz); metrics dir "
          f"{sidecar.metrics_dir or '(none)'}, audit {sidecar.db}; Ctrl-C or SIGTERM stops it", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    sidecar.stop()
    log.info("stopped")
    return 0


def drift_command(settings: Settings, args: argparse.Namespace) -> int:
    from telemetry import drift
    from telemetry.auditdb import AuditDB
    from telemetry.service import ModelCache, run_drift

    models = ModelCache(settings.model.model_dir, settings.model.version)
    if args.csv:
        from tools.train import encode_frame, load_frame

        print(f"reading {args.csv} ...", file=sys.stderr, flush=True)
        raw = encode_frame(load_frame(args.csv))
        report = models.detector().compare(raw, source=args.csv.name)
    else:
        db = AuditDB(settings.audit.url)
        print(f"reading recent inputs from {db} ...", file=sys.stderr, flush=True)
        report = run_drift(settings, models, db)
    print(f"comparing {report.rows:,} inputs with model {report.model_version}'s reference ...",
          file=sys.stderr, flush=True)
    paths = drift.write_report(report, settings.telemetry.report_dir)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.table(args.top))
    print(f"wrote {paths['json']} and {paths['png']}", file=sys.stderr)
    if args.fail_on:
        levels = ("significant",) if args.fail_on == "significant" else ("significant", "moderate")
        if any(f.severity in levels for f in report.features):
            return 3
    return 0


def performance_command(settings: Settings, args: argparse.Namespace) -> int:
    from telemetry import performance
    from telemetry.auditdb import AuditDB
    from telemetry.service import ModelCache, run_performance

    db = AuditDB(settings.audit.url)
    print(f"reading predictions and outcomes from {db} ...", file=sys.stderr, flush=True)
    report = run_performance(settings, ModelCache(settings.model.model_dir, settings.model.version), db)
    stored = 0 if args.no_store else db.store_performance(report.rows())
    paths = performance.write_report(report, settings.telemetry.report_dir)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.table())
    print(f"wrote {paths['json']} and {paths['png']}" + ("" if args.no_store else f"; stored {stored} "
          "model_performance row(s)"), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = build_settings(args)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from server.model import ModelError
    from telemetry.auditdb import AuditUnavailable
    from telemetry.service import InsufficientData

    try:
        if args.command == "drift":
            return drift_command(settings, args)
        if args.command == "performance":
            return performance_command(settings, args)
        return serve(settings, args)
    except (AuditUnavailable, InsufficientData, ModelError, ValueError) as e:
        print(f"credscope-telemetry {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"credscope-telemetry {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
