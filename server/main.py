"""``credscope-server``: run the CredScope gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from server.model import ModelNotFoundError
from server.settings import Settings, TlsSettings
from server.workers import run_workers

log = logging.getLogger("credscope.server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="credscope-server",
        description="Run the CredScope gRPC scoring server. Every setting can also be given as a "
                    "CREDSCOPE_* environment variable (e.g. CREDSCOPE_SERVER__PORT=50051); flags win.")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--model-dir", type=Path, help="model store folder (default ./models)")
    p.add_argument("--model-version", help="model version to serve (default: the store's ACTIVE one)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--metrics-dir", type=Path,
                   help="prometheus multiprocess directory that credscope-telemetry serves (default: none)")
    p.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM): serve TLS only (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")
    p.add_argument("--tls-client-ca", type=Path,
                   help="CA certificates (PEM) that client certificates must chain to: mutual TLS, clients "
                        "without a valid certificate are refused")
    p.add_argument("--workers", type=int, help="worker processes sharing the port (default: the host's cores; "
                   "1 serves in this process)")
    args = p.parse_args(argv)
    if args.workers is not None and not 1 <= args.workers <= 64:
        p.error("--workers must be between 1 and 64")
    return args


def build_settings(args: argparse.Namespace) -> Settings:
    settings = Settings()
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    if args.model_dir:
        settings.model.model_dir = args.model_dir
    if args.model_version:
        settings.model.version = args.model_version
    if args.log_level:
        settings.log_level = args.log_level.upper()
    if args.metrics_dir:
        settings.telemetry.metrics_dir = args.metrics_dir
    if args.workers is not None:
        settings.server.workers = args.workers
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        tls = settings.tls.model_dump()
        tls.update({k: v for k, v in (("cert_file", args.tls_cert), ("key_file", args.tls_key),
                                      ("client_ca_file", args.tls_client_ca)) if v is not None})
        settings.tls = TlsSettings(**tls)
    return settings


def settings_problem(e: ValidationError) -> str:
    """A ValidationError as lines naming each setting, without the values given (they may be secrets)."""
    lines = [f"  {'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
             for err in e.errors(include_input=False, include_url=False)]
    return "invalid settings:\n" + "\n".join(lines)


def prepare_metrics_dir(settings: Settings) -> None:
    """Point prometheus-client's multiprocess mode at ``telemetry.metrics_dir``. It must run before
    prometheus-client is first imported (server.app imports it), which picks its value class then."""
    metrics_dir = settings.telemetry.metrics_dir
    if metrics_dir is None:
        return
    if "prometheus_client" in sys.modules:
        log.warning("prometheus_client was imported before the metrics directory was set; "
                    "this worker's metrics will not reach %s", metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())


async def serve(settings: Settings, on_ready: Callable[[int, str], None] | None = None) -> None:
    from server import metrics, tracing
    from server.app import CredScopeServer

    tracing.setup(settings)
    sampler = asyncio.create_task(metrics.ProcessSampler().run(settings.telemetry.process_sample_seconds))
    try:
        server = CredScopeServer(settings)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await server.start()
        if on_ready is not None:  # a worker process: the parent prints the listening line once
            on_ready(server.port, server.runtime.scorer.version)
        else:
            print(f"CredScope listening on {settings.server.host}:{server.port} "
                  f"(model {server.runtime.scorer.version}); Ctrl-C or SIGTERM stops it", flush=True)
        await stopping.wait()
        log.info("shutting down: finishing calls in flight (grace %.1fs)", settings.server.grace_seconds)
        await server.stop()
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await asyncio.to_thread(tracing.shutdown)  # flushes the spans still waiting
        if settings.telemetry.metrics_dir is not None:
            metrics.mark_dead(settings.telemetry.metrics_dir)
    log.info("stopped")


def run(settings: Settings, on_ready: Callable[[int, str], None] | None = None) -> int:
    """Serve in this process until SIGTERM/SIGINT; the exit status."""
    try:
        asyncio.run(serve(settings, on_ready))
    except ModelNotFoundError as e:
        print(f"credscope-server: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"credscope-server: {e}", file=sys.stderr)
        return 1
    return 0


def _forget_worker(settings: Settings) -> Callable[[int], None] | None:
    """Drop a stopped worker's live gauges from the metrics directory (a SIGKILLed one cannot itself)."""
    metrics_dir = settings.telemetry.metrics_dir
    if metrics_dir is None:
        return None

    def forget(pid: int) -> None:
        # prometheus-client itself, not server.metrics: importing that would make the parent a metrics writer
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(metrics_dir))

    return forget


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = build_settings(args)
    except ValidationError as e:
        print(f"credscope-server: {settings_problem(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    prepare_metrics_dir(settings)  # before the workers fork: each inherits PROMETHEUS_MULTIPROC_DIR
    if settings.server.workers > 1:
        try:
            return run_workers(settings, run, on_exit=_forget_worker(settings))
        except OSError as e:
            print(f"credscope-server: {e}", file=sys.stderr)
            return 1
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
