"""``credscope-bench-audit``: what the audit trail costs — Score throughput with audit on vs off.

Starts a server process per configuration (same model, port 0, loopback, the full interceptor chain with
anonymous dev-mode access), drives Score calls — each a different applicant, so a cache miss — over a real
channel from a grpc.aio client for a few seconds at a fixed concurrency, alternating off/on for several
rounds, and prints calls/s and latency percentiles per round and the median cost of audit. With audit on,
it checks afterwards that every answered call has its row. Besides calls/s it reports the server
process's CPU time per call in the measured window, a steadier figure than throughput on a busy
machine. ``--plot`` draws the rounds as a PNG.

Client and server share the machine: compare the two configurations with each other, not with figures
from elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from client.applicants import applicant_from_mapping
from credscope.v1 import scoring_pb2, scoring_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(r"CredScope listening on \S+:(\d+)")
APPLICANT = {
    "name_contract_type": "Cash loans", "amt_income_total": 202500, "amt_credit": 406597.5, "amt_annuity": 24700.5,
    "amt_goods_price": 351000, "name_income_type": "Working", "name_education_type": "Higher education",
    "days_birth": -12000, "days_employed": -2000, "ext_source_2": 0.6, "ext_source_3": 0.5, "cnt_fam_members": 2,
}


@dataclass
class Result:
    config: str
    round: int
    calls: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    server_cpu: float = 0.0

    @property
    def cpu_us_per_call(self) -> float:
        return self.server_cpu / self.calls * 1e6 if self.calls else 0.0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


class Server:
    def __init__(self, model_dir: Path, env: dict[str, str], cwd: Path) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("CREDSCOPE_")}
        full.update({"PYTHONUNBUFFERED": "1", "CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true",
                     "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "1000000000",
                     "CREDSCOPE_SERVER__DRAIN_SECONDS": "0", "CREDSCOPE_LOG_LEVEL": "WARNING", **env})
        self.proc = subprocess.Popen([sys.executable, "-m", "server.main", "--port", "0", "--model-dir",
                                      str(model_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=full, cwd=cwd)
        self.port = 0
        self.output: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = LISTEN_RE.search(line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(120) or not self.port:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.output))

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server: its process and the live ones it started (the
        workers and their audit store processes; Linux /proc). The parent alone did no gRPC work since the
        server runs one worker per core, and this read 0."""
        from tools.bench import tree_cpu

        return tree_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def drive(server: Server, seconds: float, concurrency: int, warmup: float
                ) -> tuple[int, float, list[float], list[str], float]:
    """Calls counted in the window, its length, their latencies, every answered request id, and the server's
    CPU seconds in the window."""
    target = f"127.0.0.1:{server.port}"
    # A different applicant every call (income + 1): every call is a cache miss that runs the model.
    template = scoring_pb2.ScoreRequest(applicant=applicant_from_mapping(APPLICANT))
    serial = iter(range(10**9))
    latencies: list[float] = []
    ids: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        loop = asyncio.get_running_loop()
        start = loop.time() + warmup
        end = start + seconds
        counted = 0

        async def worker() -> None:
            nonlocal counted
            while (now := loop.time()) < end:
                request = scoring_pb2.ScoreRequest()
                request.CopyFrom(template)
                request.applicant.amt_income_total += next(serial)
                r = await stub.Score(request, timeout=30)
                done = loop.time()
                ids.append(r.request_id)
                if now >= start:
                    counted += 1
                    latencies.append((done - now) * 1000.0)

        async def cpu_window() -> float:
            await asyncio.sleep(max(0.0, start - loop.time()))
            before = server.cpu_seconds()
            await asyncio.sleep(max(0.0, end - loop.time()))
            return server.cpu_seconds() - before

        *_, cpu = await asyncio.gather(*(worker() for _ in range(concurrency)), cpu_window())
    return counted, seconds, latencies, ids, cpu


async def count_rows(url: str, ids: list[str]) -> int:
    from server.db import dialect, sqlite_path

    if dialect(url) == "sqlite":
        import sqlite3

        conn = sqlite3.connect(sqlite_path(url))
        try:
            conn.execute("CREATE TEMP TABLE want (id TEXT PRIMARY KEY)")
            conn.executemany("INSERT OR IGNORE INTO want VALUES (?)", [(i,) for i in ids])
            return conn.execute("SELECT count(*) FROM predictions JOIN want ON want.id = request_id").fetchone()[0]
        finally:
            conn.close()
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT count(*) FROM predictions WHERE request_id = ANY($1::text[])", ids)
    finally:
        await conn.close()


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    for config, color in (("off", "tab:gray"), ("on", "tab:blue")):
        rs = [r for r in results if r.config == config]
        ax1.plot([r.round for r in rs], [r.rate for r in rs], "o-", color=color, label=f"audit {config}")
        ax2.plot([r.round for r in rs], [r.pct(0.5) for r in rs], "o-", color=color, label=f"p50 audit {config}")
        ax2.plot([r.round for r in rs], [r.pct(0.99) for r in rs], "s--", color=color, label=f"p99 audit {config}")
        ax3.plot([r.round for r in rs], [r.cpu_us_per_call for r in rs], "o-", color=color, label=f"audit {config}")
    ax1.set(title="Score throughput", xlabel="round", ylabel="calls/s")
    ax2.set(title="Score latency", xlabel="round", ylabel="ms")
    ax3.set(title="Server CPU per call", xlabel="round", ylabel="µs")
    rounds = sorted({r.round for r in results})
    for ax in (ax1, ax2, ax3):
        ax.set_ylim(bottom=0)
        ax.set_xticks(rounds)
    ax1.legend()
    ax2.legend(fontsize=8)
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="credscope-bench-audit", description=__doc__.split("\n\n")[0] + ".")
    p.add_argument("--model-dir", type=Path, default=Path("models"), help="model store (default ./models)")
    p.add_argument("--url", help="audit database for the 'on' runs (default: a fresh SQLite file); e.g. "
                                 "postgresql://postgres@127.0.0.1:5432/credscope_bench (must exist)")
    p.add_argument("--durability", choices=["async", "sync"], default="async", help="audit durability (async)")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run (3)")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each run (0.5)")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight (32)")
    p.add_argument("--rounds", type=int, default=2, help="off/on pairs, alternating (2)")
    p.add_argument("--plot", type=Path, help="write a PNG of the rounds here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="credscope-bench-audit-"))
    url = args.url or f"sqlite:///{work / 'audit.db'}"
    model_dir = args.model_dir.resolve()
    results: list[Result] = []
    missing = 0
    print(f"Score over a real channel, concurrency {args.concurrency}, {args.seconds:.0f}s per run, audit url "
          f"{url.split('@')[-1]}, durability {args.durability}", flush=True)
    for rnd in range(1, args.rounds + 1):
        for config in ("off", "on"):
            env = {"CREDSCOPE_AUDIT__ENABLED": "true" if config == "on" else "false", "CREDSCOPE_AUDIT__URL": url,
                   "CREDSCOPE_AUDIT__SPOOL_DIR": str(work / "spool"),
                   "CREDSCOPE_AUDIT__DURABILITY": args.durability}
            server = Server(model_dir, env, work)
            try:
                calls, secs, lat, ids, cpu = asyncio.run(drive(server, args.seconds, args.concurrency, args.warmup))
            finally:
                server.stop()  # drains the audit queue
            r = Result(config, rnd, calls, secs, lat, cpu)
            results.append(r)
            line = (f"round {rnd} audit {config:3}: {r.rate:8.0f} calls/s  p50 {r.pct(0.5):6.2f} ms  "
                    f"p99 {r.pct(0.99):6.2f} ms  server CPU {r.cpu_us_per_call:6.0f} µs/call")
            if config == "on":
                rows = asyncio.run(count_rows(url, ids))
                missing += len(ids) - rows
                line += f"  audit rows {rows}/{len(ids)}"
            print(line, flush=True)
    off = statistics.median(r.rate for r in results if r.config == "off")
    on = statistics.median(r.rate for r in results if r.config == "on")
    cpu_off = statistics.median(r.cpu_us_per_call for r in results if r.config == "off")
    cpu_on = statistics.median(r.cpu_us_per_call for r in results if r.config == "on")
    print(f"median: off {off:.0f} calls/s, on {on:.0f} calls/s: audit costs {100 * (1 - on / off):.1f}% "
          f"of throughput; server CPU per call off {cpu_off:.0f} µs, on {cpu_on:.0f} µs "
          f"({100 * (cpu_on / cpu_off - 1) if cpu_off else float('nan'):+.1f}%); {missing} answered call(s) without "
          "an audit row")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
