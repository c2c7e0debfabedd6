"""``python -m tools.bench_profile``: where a server's time goes, under the bench's load.

Starts ``credscope-server`` (embedded backends, an enterprise API key, rate limits raised so nothing is
throttled; ``--env`` adds or overrides settings, e.g. ``CREDSCOPE_AUDIT__ENABLED=false`` or a Redis URL) —
or, with ``--echo``, the bench's empty grpc.aio echo server — drives it with the bench's load generator
(:mod:`tools.bench_load`, loopback, bounded by time and count) for ``--rounds`` rounds, and prints per
round: calls/s, p50/p90/p99 latency, the server's CPU time per call (its processes, the audit store's
included, until the server is idle again after the round, as ``credscope-bench`` counts it; each round
starts on an idle server) and its context switches per call by thread name. ``--py-spy OUT`` records the last round's
worker with py-spy (``pip install py-spy``; raw collapsed stacks, sampled at 200 Hz) and prints the
functions that hold the most samples of the serving thread. This is how the README's "where the time
goes" figures are made (and how A/B runs compare two settings: run it once per setting, alternating).

Example::

    python -m tools.bench_profile --workers 1 --concurrency 4 --rounds 3
    python -m tools.bench_profile --scenario batch-1000 --concurrency 1 --py-spy reports/profile.txt
    python -m tools.bench_profile --env CREDSCOPE_AUDIT__ENABLED=false
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess  # nosec B404 - starts our own server, credscope-keys and py-spy, no shell
import sys
import tempfile
from pathlib import Path
from typing import Any

from tools import bench
from tools.bench_load import LoadSpec, run_load
from tools.bench_peers import ECHO_METHOD

SCENARIOS = ("score-miss", "score-hit", "score-explain", "batch-100", "batch-1000")


def thread_counters(pid: int) -> dict[str, tuple[int, float]]:
    """(context switches, CPU seconds) so far, summed by thread name, over ``pid`` and its children: a
    process's main thread is ``python``, its other Python threads ``python#<thread id>`` (Python does not name
    them for the OS), a child process's threads have ``child `` in front."""
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for p in bench.process_tree(pid):
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                name = (task / "comm").read_text().strip()
                if name == "python" and task.name != str(p):
                    name += f"#{task.name}"
                if p != pid:
                    name = "child " + name
                status = (task / "status").read_text()
                cpu = bench.stat_cpu(task / "stat")
                row = out[name]
                row[0] += sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
                row[1] += cpu
        except (OSError, ValueError, IndexError):
            continue
    return {k: (int(v[0]), v[1]) for k, v in out.items()}


def summarize(raw: Path, top: int = 25, thread: str = "MainThread") -> list[tuple[float, str]]:
    """From py-spy's raw output: the share of ``thread``'s samples each function (file and name, any line)
    is on the stack of, largest first (those on every sample left out)."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if thread not in frames[0]:
            continue
        n = int(count)
        total += n
        for name in {re.sub(r":\d+\)$", ")", f) for f in frames[1:]}:
            inclusive[name] += n
    if not total:
        return []
    # frames on every sample (the interpreter's and the event loop's entry points) say nothing: left out
    return [(100.0 * n / total, name) for name, n in inclusive.most_common() if n < total][:top]


def payloads(apps: bench.Applicants, scenario: str, n: int) -> tuple[str, list[bytes], list[bytes], bool]:
    """(method, measured payloads, warm-up payloads, unique) of a scenario."""
    if scenario == "score-hit":
        fixed = bench.score_requests(apps.base[:64])
        return bench.SCORE, fixed, fixed, False
    if scenario.startswith("batch"):
        size = int(scenario.split("-")[1])
        return (bench.BATCH, bench.batch_requests(apps.take(size * max(1, n // size)), size),
                bench.batch_requests(apps.take(size * 3), size), True)
    explain = scenario == "score-explain"
    return bench.SCORE, bench.score_requests(apps.take(n), explain), bench.score_requests(apps.take(500), explain), True


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench_profile", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every run is bounded in time and count; the server is stopped at the end.")
    p.add_argument("--model-dir", type=Path, default=Path("models"), help="model store (default models)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="calls in flight (default 4; with --rate, at most this many, default "
                        f"{bench.OPEN_LOOP_IN_FLIGHT}, as in the bench's open-loop runs)")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: offer this many calls/s at random (Poisson) arrivals instead of keeping "
                        "--concurrency calls in flight (the bench's moderate load; latency from each arrival)")
    p.add_argument("--scenario", choices=SCENARIOS, default="score-miss", help="what is sent (default score-miss)")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per round (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per round (default 0.5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--requests", type=int, default=20_000, help="most calls per round (default 20000)")
    p.add_argument("--channels", type=int, default=4, help="channels per load process (default 4)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for the server (repeatable), e.g. CREDSCOPE_CACHE__ENABLED=false")
    p.add_argument("--echo", action="store_true", help="profile the bench's empty echo server instead")
    p.add_argument("--py-spy", type=Path, metavar="OUT", help="record the last round with py-spy into OUT (raw)")
    p.add_argument("--native", action="store_true", help="with --py-spy: native frames too (C extensions: "
                   "onnxruntime, gRPC's Cython, libc calls such as lock syscalls)")
    p.add_argument("--top", type=int, default=25, help="functions listed from the py-spy record (default 25)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.concurrency is None:
        a.concurrency = bench.OPEN_LOOP_IN_FLIGHT if a.rate else 4
    if a.concurrency < 1 or a.rounds < 1 or a.seconds <= 0 or (a.rate is not None and a.rate <= 0):
        parser().error("--concurrency and --rounds must be >= 1, --seconds and --rate > 0")
    settings: dict[str, str] = {}
    for kv in a.env:
        key, sep, value = kv.partition("=")
        if not sep or not key.startswith("CREDSCOPE_"):
            parser().error(f"--env takes CREDSCOPE_<SETTING>=<value>, got {kv!r}")
        settings[key] = value
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if a.py_spy and not Path(spy).exists():
        parser().error("--py-spy needs py-spy (pip install py-spy)")
    folder = Path(tempfile.mkdtemp(prefix="credscope-profile-"))
    env = {**bench.embedded_env(folder), **settings}  # (the rate-limit table: in the folder, the server's cwd)
    metadata: tuple[tuple[str, str], ...] = ()
    if a.echo:
        cmd = [sys.executable, "-m", "tools.bench_peers", "echo", "--port", "0", "--workers", str(a.workers)]
    else:
        try:
            metadata = (("x-api-key", bench.create_key(env, folder, name="profile")),)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        cmd = [sys.executable, "-m", "server.main", "--host", "127.0.0.1", "--port", "0", "--model-dir",
               str(a.model_dir.resolve()), "--workers", str(a.workers)]
    print(f"{'echo server' if a.echo else 'credscope-server'}: {a.workers} worker(s), {a.scenario}, "
          f"{f'open loop at {a.rate:g}/s' if a.rate else f'{a.concurrency} in flight'}, {a.rounds} x {a.seconds:g} s (work folder {folder})", flush=True)
    server = bench.start_process(cmd, env, folder, folder / "server.log")
    apps = bench.Applicants()
    try:
        for r in range(a.rounds):
            method, measured, warm, unique = payloads(apps, a.scenario, a.requests)
            spec = LoadSpec(target=server.target, method=ECHO_METHOD if a.echo else method, payloads=measured,
                            warmup_payloads=warm, unique=unique, concurrency=a.concurrency,
                            processes=min(2, a.concurrency), channels_per_process=a.channels, duration=a.seconds,
                            warmup=a.warmup, max_requests=a.requests, metadata=metadata, rate=a.rate)
            state: dict[str, Any] = {}
            record = a.py_spy is not None and r == a.rounds - 1

            def started(state: dict[str, Any] = state, record: bool = record) -> None:
                state["cpu"] = bench.tree_cpu(server.proc.pid)
                state["threads"] = thread_counters(server.proc.pid)
                if record:
                    state["spy"] = subprocess.Popen(  # noqa: S603  # nosec B603 - py-spy on our own server
                        [spy, "record", "-p", str(server.proc.pid), "-r", "200", "-d", str(max(1, int(a.seconds))),
                         "--format", "raw", "-o", str(a.py_spy), "--threads", *(["-s"] if a.workers > 1 else []),
                         *(["--native"] if a.native else [])],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

            bench.settle(server.proc.pid)  # (before the load starts: the previous round's leftovers are not this one's)
            res = run_load(spec, started)
            calls = max(1, res.requests)
            bench.settle(server.proc.pid)  # this round's own leftovers (queued audit rows) count in its CPU
            cpu = (bench.tree_cpu(server.proc.pid) - state["cpu"]) / calls * 1e6
            now = thread_counters(server.proc.pid)
            before = state["threads"]
            per_thread: dict[str, tuple[float, float]] = {}  # name -> (context switches, CPU µs) per call
            for k, (v, c) in now.items():
                v0, c0 = before.get(k, (0, 0.0))
                per_thread[k] = ((v - v0) / calls, (c - c0) / calls * 1e6)
            busiest = ", ".join(f"{k} {v:.1f}" for k, (v, _) in sorted(per_thread.items(), key=lambda kv: -kv[1][0])[:3])
            by_cpu = ", ".join(f"{k} {c:.0f}" for k, (_, c) in sorted(per_thread.items(), key=lambda kv: -kv[1][1])[:4])
            errors = f"  {res.errors} errors: {res.first_error}" if res.errors else ""
            print(f"round {r + 1}: {res.rps:7.0f} calls/s  p50 {res.p50:6.2f}  p90 {res.p90:6.2f}  p99 {res.p99:6.2f} ms"
                  f"  server CPU {cpu:5.0f} µs/call ({by_cpu})  context switches/call: {busiest}{errors}", flush=True)
            if "spy" in state:
                _, err = state["spy"].communicate(timeout=a.seconds + 60)
                if state["spy"].returncode != 0 or not a.py_spy.exists():
                    print(f"py-spy failed: {err.strip()[-400:]}", file=sys.stderr)
                else:
                    print(f"py-spy samples of the serving thread (inclusive), from {a.py_spy}:")
                    for share, name in summarize(a.py_spy, a.top):
                        print(f"  {share:5.1f}%  {name}")
    finally:
        status = server.stop()
    if status not in (0, None):
        print(f"server exited with status {status}:\n{server.tail()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
