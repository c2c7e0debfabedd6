"""In-process cost of a Score (or BatchScore) call: the servicer behind the interceptor stages, without gRPC.

Builds the server's own objects (``server.app.CredScopeServer``: runtime, caches, audit writer on SQLite in
a temporary folder, key store, rate limiter, metrics) and calls ``ScoringService.Score`` through the same
interceptor stages, in order, from a loop on this process, with a new applicant every call (cache misses).
Prints the CPU time of the whole process (every thread: audit writer, explain threads) per call, per round;
with ``--batch N`` it calls ``BatchScore`` with N new applicants per call and prints the wall time per call too;
``--explain K`` asks for an explanation (top K) in every call.

``--without`` switches parts off to see what each costs: ``reasons`` (adverse-action reasons, i.e.
TreeSHAP for REVIEW/REJECT applicants), ``audit``, ``cache``, ``signals`` (input-contract counters),
``metrics`` (every worker metric). Not part of the test suite; the figures move with the host's load.

    python -m tools.bench_handler --model-dir models
    python -m tools.bench_handler --without reasons --without audit
    python -m tools.bench_handler --batch 1000 --calls 20
    python -m tools.bench_handler --explain 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

PARTS = ("reasons", "audit", "cache", "signals", "metrics")
SCORE = "/credscope.v1.ScoringService/Score"
BATCH = "/credscope.v1.ScoringService/BatchScore"


class _Context:
    """The parts of a grpc.aio ServicerContext the stages and the servicer use on a successful call."""

    def __init__(self) -> None:
        self.trailing: Any = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = metadata

    def time_remaining(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"the call was aborted: {code} {details}")


def _switch_off(settings: Any, without: set[str]) -> None:
    if "audit" in without:
        settings.audit.enabled = False
    if "cache" in without:
        settings.cache.enabled = False
    if "signals" in without:
        import server.input_signals as signals

        signals.observe = lambda *a, **k: None  # type: ignore[assignment]
    if "metrics" in without:
        import server.metrics as metrics

        metrics._record = lambda *a, **k: None  # type: ignore[assignment]  # noqa: SLF001
    if "reasons" in without:
        import server.services.scoring as scoring

        scoring.needs_explanation = lambda *a, **k: False  # type: ignore[assignment]


def _chain(stages: list[Any], handler: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    """``handler`` behind the stages, the first outermost (what gRPC builds from the interceptors)."""
    behavior = handler
    for stage in reversed(stages):
        def wrap(stage: Any = stage, inner: Callable[..., Awaitable[Any]] = behavior) -> Callable[..., Awaitable[Any]]:
            async def call(request: Any, context: Any) -> Any:
                return await stage.around(method, inner, request, context)
            return call
        behavior = wrap()
    return behavior


async def run(args: argparse.Namespace) -> list[float]:
    from credscope.v1 import scoring_pb2
    from server import context as rc
    from server.app import CredScopeServer
    from server.settings import Settings
    from tools.bench import Applicants

    folder = Path(tempfile.mkdtemp(prefix="credscope-bench-handler-"))
    settings = Settings()
    settings.model.model_dir = args.model_dir
    settings.audit.url = f"sqlite:///{folder / 'audit.db'}"
    settings.audit.spool_dir = folder / "spool"
    settings.auth.key_store_url = f"sqlite:///{folder / 'keys.db'}"
    settings.auth.allow_anonymous = True
    settings.rate_limit.free_per_hour = 10 ** 9
    settings.rate_limit.local_path = folder / "ratelimit.buckets"  # (it was left in the working directory)
    _switch_off(settings, set(args.without))
    server = CredScopeServer(settings)
    await server.start()
    try:
        n = args.calls
        what = f"BatchScore of {args.batch}" if args.batch else "Score"
        if args.batch:
            people = Applicants().take(n * (args.rounds + 1) * args.batch)
            requests: list[Any] = [scoring_pb2.BatchScoreRequest(applicants=people[i:i + args.batch])
                                   for i in range(0, len(people), args.batch)]
            call = _chain(server.interceptors(), server.scoring.BatchScore, BATCH)
        else:
            requests = [scoring_pb2.ScoreRequest(applicant=a) for a in Applicants().take(n * (args.rounds + 1))]
            call = _chain(server.interceptors(), server.scoring.Score, SCORE)
        if args.explain:
            for r in requests:
                r.explain.enabled = True
                r.explain.top_k = args.explain

        async def one(request: Any) -> None:
            token = rc._current.set(None)  # noqa: SLF001 - each call starts without a request context
            try:
                await call(request, _Context())
            finally:
                rc._current.reset(token)  # noqa: SLF001

        for r in requests[:n]:  # warm-up round (not reported)
            await one(r)
        out = []
        for k in range(1, args.rounds + 1):
            started, wall = time.process_time(), time.perf_counter()
            for r in requests[k * n:(k + 1) * n]:
                await one(r)
            out.append((time.process_time() - started) / n * 1e6)
            elapsed = (time.perf_counter() - wall) / n * 1e3
            print(f"round {k}: {out[-1]:.0f} µs of CPU per {what} (all threads), {elapsed:.2f} ms wall per call, "
                  f"{n} calls", flush=True)
        return out
    finally:
        await server.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench_handler",
                                description="CPU per Score call of the servicer behind the interceptor stages, "
                                            "in process (no gRPC), with parts switched off on demand.")
    p.add_argument("--model-dir", type=Path, default=Path("models"), help="model store (default %(default)s)")
    p.add_argument("--calls", type=int, default=3000, help="calls per round (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up (default %(default)s)")
    p.add_argument("--batch", type=int, default=0,
                   help="call BatchScore with this many applicants per call instead of Score (default: Score)")
    p.add_argument("--explain", type=int, default=0, metavar="K",
                   help="ask for an explanation with the top K contributions in every call (default: none)")
    p.add_argument("--without", action="append", choices=PARTS, default=[],
                   help="switch a part off (repeatable): " + ", ".join(PARTS))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.calls < 1 or args.rounds < 1 or args.batch < 0:
        print("--calls and --rounds must be at least 1, --batch at least 0", file=sys.stderr)
        return 2
    os.environ.setdefault("CREDSCOPE_LOG_LEVEL", "WARNING")
    what = f"BatchScore of {args.batch}" if args.batch else "Score"
    print(f"{what} in process, without: {', '.join(args.without) or 'nothing'}", flush=True)
    rounds = asyncio.run(run(args))
    print(f"median {sorted(rounds)[len(rounds) // 2]:.0f} µs of CPU per {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
