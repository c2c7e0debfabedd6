"""``credscope-bench`` (``make bench``): CredScope's throughput and latency, side by side with the gRPC
floor and a peer, on the same machine, in one run.

For each server configuration (``--configs``) the bench starts ``credscope-server`` (``--workers``
processes on one port) with the settings of that configuration as ``CREDSCOPE_*`` variables, probes
which features the server has, and drives each scenario with the multi-process grpc.aio load generator
(:mod:`tools.bench_load`) at each concurrency level: a warm-up, then a run bounded by time and count.

Configurations (full chain on: request id, auth, rate limit, audit, cache):

* ``embedded`` — the embedded backends (in-process cache and buckets, SQLite keys and audit).
* ``audit-off`` — the same with ``CREDSCOPE_AUDIT__ENABLED=false`` (Score cache miss only), for the
  cost of the audit trail; with ``embedded`` (in either order) it runs beside that server and the two
  are measured turn by turn, with the references when they run; the cost is the median over the
  concurrency levels of the paired figures.
* ``networked`` — Redis (cache, rate limit) and PostgreSQL (keys, audit) at ``--redis-url`` and
  ``--postgres-dsn``; skipped when they are unreachable.

Scenarios: ``score-miss`` (every call a new applicant), ``score-hit`` (a few applicants, cached in the
warm-up), ``score-explain`` (new applicants with an explanation), ``batch-100`` and ``batch-1000`` (new
applicants). A scenario whose feature the server does not have yet is reported as
``skipped: feature not available (...)``, never as a failure.

References, measured in the same run: ``echo``, an empty grpc.aio server with the same worker model
(the floor; it is sent the Score requests' bytes), and ``mlserver``, MLServer serving the same model
(the fitted scikit-learn pipeline of the served version) over the V2 gRPC inference protocol, sent the
same applicants as raw FP32 tensors (see :mod:`tools.bench_peers`; it needs ``.venv-bench``).

API keys (an optional, separate step): with ``--auth create-key`` (or ``auto`` when ``credscope-keys``
is installed) the bench creates a key with ``credscope-keys create --name bench --tier enterprise``
against the configuration's key store and sends it; otherwise it runs anonymous
(``CREDSCOPE_AUTH__ALLOW_ANONYMOUS=true``). Either way every tier's hourly limit is raised
(``CREDSCOPE_RATE_LIMIT__*_PER_HOUR``) so that the limiter runs but does not throttle the bench.

Output: a table on stdout, the targets with their measured values, ``--out`` (JSON, default
``reports/bench.json``) and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tools.bench_load import LoadResult, LoadSpec, cpu_count, run_load
from tools.bench_peers import ECHO_METHOD, MLSERVER_INFER, ROOT, MLServerProcess, read_frames, venv_python

SCORE = "/credscope.v1.ScoringService/Score"
BATCH = "/credscope.v1.ScoringService/BatchScore"
SCENARIOS = ("score-miss", "score-moderate", "score-hit", "score-explain", "batch-100", "batch-1000")
CONFIGS = ("embedded", "audit-off", "networked")
LISTEN_RE = re.compile(r"listening on (\S+):(\d+)")
UNLIMITED = str(10**12)
OPEN_LOOP_IN_FLIGHT = 64
"""The most calls in flight of an open-loop (fixed rate) run, over all load processes."""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------

class Applicants:
    """Distinct applicants from the synthetic generator. ``take(n)`` never returns the same applicant
    twice in a bench run, as the model and the cache see it (float32 rows), so a cache cannot answer a
    cache-miss scenario: once the base pool is used up it adds one currency unit to the income per
    round. (It added cents until 2026-12-03: an income above 2^17 has float32 steps of 1/64 or more,
    so ~21% of 40,000 "new" applicants were rows seen before, and cache hits.)"""

    def __init__(self, base: int = 4000, seed: int = 20261125) -> None:
        from client.applicants import applicant_from_mapping
        from server.convert import applicant_to_row
        from tools.datagen import generate

        frame = generate(base, seed)
        apps = [applicant_from_mapping({k: v for k, v in r.items() if v == v})  # NaN (missing) left unset
                for r in frame.to_dict("records")]
        self.base = [a for a in apps if not applicant_to_row(a)[1]]  # valid ones (the generator's tails may not be)
        self.used = 0

    def take(self, n: int) -> list[Any]:
        from credscope.v1 import applicant_pb2

        out = []
        b = len(self.base)
        for j in range(self.used, self.used + n):
            a = self.base[j % b]
            if j >= b:
                a2 = applicant_pb2.Applicant()
                a2.CopyFrom(a)
                a2.amt_income_total = a.amt_income_total + float(j // b)  # exact in float32 below 2^24
                a = a2
            out.append(a)
        self.used += n
        return out


def score_requests(applicants: list[Any], explain: bool = False) -> list[bytes]:
    from credscope.v1 import scoring_pb2

    out = []
    for a in applicants:
        req = scoring_pb2.ScoreRequest(applicant=a)
        if explain:
            req.explain.enabled = True
            req.explain.top_k = 5
        out.append(req.SerializeToString())
    return out


def batch_requests(applicants: list[Any], size: int) -> list[bytes]:
    from credscope.v1 import scoring_pb2

    return [scoring_pb2.BatchScoreRequest(applicants=applicants[i:i + size]).SerializeToString()
            for i in range(0, len(applicants) - size + 1, size)]


def rows_of(applicants: list[Any]) -> Any:
    from server.convert import applicant_to_row, rows_to_matrix

    return rows_to_matrix([applicant_to_row(a)[0] for a in applicants])


# --------------------------------------------------------------------------------------------
# Probes: run in a forked child, so that this process never starts gRPC (forking after gRPC has
# started its threads is unsafe, and the load generator forks)
# --------------------------------------------------------------------------------------------

def _child(fn: Callable[..., Any], args: tuple[Any, ...], out: Any) -> None:
    try:
        out.put(("ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put(("error", f"{type(e).__name__}: {e}"))


def in_child(fn: Callable[..., Any], *args: Any, timeout: float = 120) -> Any:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, out), daemon=True)
    p.start()
    try:
        status, value = out.get(timeout=timeout)
    finally:
        p.join(5)
        if p.exitcode is None:
            p.kill()
    if status != "ok":
        raise RuntimeError(value)
    return value


def _probe(target: str, metadata: tuple[tuple[str, str], ...], score: bytes, explain: bytes,
           batch: bytes) -> dict[str, Any]:
    """Which features answer: plain Score, cache hits, explanations, BatchScore."""
    import grpc

    from credscope.v1 import scoring_pb2

    found: dict[str, Any] = {}
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=15)
        call = ch.unary_unary(SCORE)
        md = metadata or None

        def try_call(method: Any, payload: bytes) -> tuple[bytes | None, str | None]:
            try:
                return method(payload, timeout=30, metadata=md), None
            except grpc.RpcError as e:
                return None, f"{e.code().name}: {e.details()}"

        first, err = try_call(call, score)
        found["score"] = err or "ok"
        if err:
            return found
        hit = False
        for _ in range(10):  # a networked cache is written behind the answer (within a few milliseconds)
            time.sleep(0.02)
            second, err = try_call(call, score)
            hit = second is not None and scoring_pb2.ScoreResponse.FromString(second).from_cache
            if hit or err:
                break
        found["cache"] = "ok" if hit else "feature not available (a repeated Score is not from_cache)"
        resp, err = try_call(call, explain)
        if err:
            found["explain"] = f"feature not available ({err})"
        else:
            has = scoring_pb2.ScoreResponse.FromString(resp).HasField("explanation")
            found["explain"] = "ok" if has else "feature not available (no explanation in the response)"
        resp, err = try_call(ch.unary_unary(BATCH), batch)
        found["batch"] = err or "ok"
        found["model_version"] = scoring_pb2.ScoreResponse.FromString(first).model_version
    return found


def _mlserver_ready(target: str, timeout: float) -> str:
    """Wait for MLServer's gRPC port to accept a ModelReady call (raw bytes: no MLServer protos here)."""
    import grpc

    ready = "/inference.GRPCInferenceService/ModelReady"
    request = b"\n" + bytes([len("credscope")]) + b"credscope"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(target) as ch:
                if ch.unary_unary(ready)(request, timeout=2) == b"\x08\x01":
                    return "ok"
                last = "model not ready"
        except grpc.RpcError as e:
            last = f"{e.code().name}: {e.details()}"
        time.sleep(0.3)
    return last


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------

@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_process(cmd: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float = 120) -> Started:
    """Start a server whose stdout says ``... listening on HOST:PORT``; wait for that line."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = LISTEN_RE.search(log.read_text(errors="replace"))
        if m:
            return Started(proc, int(m.group(2)), log)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    s = Started(proc, 0, log)
    s.stop()
    raise RuntimeError(f"{Path(cmd[0]).name} did not start (status {proc.returncode}):\n{s.tail()}")


def embedded_env(folder: Path) -> dict[str, str]:
    """The environment of a server on embedded backends kept in ``folder`` (SQLite keys and audit trail,
    spool), quiet, with every tier's hourly limit raised so the rate limiter runs without throttling."""
    env = base_env()
    env.update({
        "CREDSCOPE_LOG_LEVEL": "WARNING",
        "CREDSCOPE_SERVER__DRAIN_SECONDS": "0",
        "CREDSCOPE_SERVER__GRACE_SECONDS": "5",
        "CREDSCOPE_AUDIT__URL": f"sqlite:///{folder / 'audit.db'}",
        "CREDSCOPE_AUTH__KEY_STORE_URL": f"sqlite:///{folder / 'keys.db'}",
        "CREDSCOPE_AUDIT__SPOOL_DIR": str(folder / "spool"),
        "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": UNLIMITED,
        "CREDSCOPE_RATE_LIMIT__PRO_PER_HOUR": UNLIMITED,
        "CREDSCOPE_RATE_LIMIT__ENTERPRISE_PER_HOUR": UNLIMITED,
    })
    return env


def create_key(env: dict[str, str], folder: Path, name: str = "bench") -> str:
    """An enterprise API key made with ``credscope-keys create`` in the key store ``env`` names (RuntimeError
    when that fails)."""
    tool = Path(sys.executable).parent / "credscope-keys"
    out = subprocess.run([str(tool), "create", "--name", name, "--tier", "enterprise"], env=env, cwd=folder,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"credscope-keys create failed ({out.returncode}): {out.stderr.strip()[-400:]}")
    key = parse_key(out.stdout)
    if not key:
        raise RuntimeError(f"no key in the output of credscope-keys create: {out.stdout[-400:]!r}")
    return key


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDSCOPE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def tcp_problem(url: str, default_port: int) -> str | None:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or default_port), timeout=2):
            return None
    except OSError as e:
        return f"{u.hostname}:{u.port or default_port} unreachable ({e})"


async def _pg(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _pg_count(dsn: str, table: str) -> int | None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            return None
        return int(await conn.fetchval(f'SELECT count(*) FROM "{table}"'))  # noqa: S608 - a constant name  # nosec B608  # constant table/column names; values are bound parameters
    finally:
        await conn.close()


_TICK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> Iterator[int]:
    """Process ``pid`` and its live descendants (Linux /proc; processes gone meanwhile are skipped)."""
    todo = [pid]
    while todo:
        p = todo.pop()
        yield p
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue


def stat_cpu(stat_file: Path) -> float:
    """CPU seconds (user + system) in a ``/proc/<pid>/stat`` or ``/proc/<pid>/task/<tid>/stat`` file
    (OSError, ValueError or IndexError when it is gone or unreadable)."""
    fields = stat_file.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its live descendants."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += stat_cpu(Path(f"/proc/{p}/stat"))
        except (OSError, ValueError, IndexError):
            continue
    return total


SETTLE_WINDOW = 0.3
"""Seconds over which a server counts as idle when it used at most SETTLE_BUSY of one core."""
SETTLE_BUSY = 0.1
SETTLE_LIMIT = 30.0
"""Longest wait for a server to go idle before or after a run."""


def settle(pid: int, limit: float = SETTLE_LIMIT) -> float:
    """Wait (at most ``limit`` seconds) until process ``pid`` and its descendants are idle — at most
    SETTLE_BUSY of one core over SETTLE_WINDOW seconds — and return the CPU seconds they used meanwhile.

    A run leaves work behind it (the audit rows its calls queued, writes behind to Redis): settling after a
    run counts that work in the run's CPU per call, and settling before the next keeps it out of the next
    run's latency."""
    start = tree_cpu(pid)
    deadline = time.monotonic() + limit
    before = start
    while time.monotonic() < deadline:
        time.sleep(SETTLE_WINDOW)
        now = tree_cpu(pid)
        if now - before <= SETTLE_BUSY * SETTLE_WINDOW:
            return now - start
        before = now
    print(f"  (the server, pid {pid}, was still busy after {limit:.0f} s; measuring anyway)", file=sys.stderr,
          flush=True)
    return tree_cpu(pid) - start


def sqlite_count(path: Path, table: str) -> int | None:
    import sqlite3

    if not path.is_file():
        return None
    con = sqlite3.connect(path)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone():
            return None
        return int(con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])  # noqa: S608  # nosec B608  # constant table/column names; values are bound parameters
    finally:
        con.close()


def redis_keys(url: str, prefix: str) -> int:
    import redis

    r = redis.Redis.from_url(url)
    try:
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            r.delete(*keys)
        return len(keys)
    finally:
        r.close()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the results table."""

    system: str
    config: str
    scenario: str
    concurrency: int
    status: str = "ok"
    result: dict[str, Any] | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"system": self.system, "config": self.config, "scenario": self.scenario,
                "status": self.status, "note": self.note, **(self.result or {}),
                "concurrency": self.concurrency}  # (an open-loop row's is 0: its result's is the in-flight bound)


@dataclass
class Peer:
    """A reference server kept running through the bench: measured turn by turn with CredScope's Score."""

    system: str
    config: str
    target: str
    method: str
    payloads: list[bytes]
    pid: int | None
    stop: Callable[[], Any]
    note: str = ""


@dataclass
class Running:
    """A credscope-server started in one configuration."""

    config: str
    server: Started
    metadata: tuple[tuple[str, str], ...]
    env: dict[str, str]
    folder: Path


@dataclass
class Bench:
    args: argparse.Namespace
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)
    audit_rows: dict[str, int | None] = field(default_factory=dict)
    """Prediction rows the audit trail held after each configuration with audit on (None: no audit trail)."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    audit_off: Running | None = None
    """The audit-off server, kept running beside the embedded one (see :meth:`run`)."""

    def __post_init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="credscope-bench-"))
        say(f"preparing requests (work folder {self.workdir})")
        self.applicants = Applicants()
        self.fixed = self.applicants.take(64)  # the cache-hit pool (also the echo/MLServer warm-up)

    # ---------------------------------------------------------------- load
    def spec(self, target: str, method: str, payloads: list[bytes], concurrency: int, *,
             warm: list[bytes] | None = None, unique: bool = False, max_requests: int | None = None,
             metadata: tuple[tuple[str, str], ...] = (), rate: float | None = None) -> LoadSpec:
        a = self.args
        if rate:  # open loop: the rate sets the load, ``concurrency`` only bounds the calls in flight
            concurrency = OPEN_LOOP_IN_FLIGHT
        procs = max(1, min(a.processes, concurrency))
        return LoadSpec(target=target, method=method, payloads=payloads, warmup_payloads=warm, unique=unique,
                        concurrency=concurrency, processes=procs, channels_per_process=a.channels,
                        duration=a.duration, warmup=a.warmup, max_requests=max_requests or a.requests,
                        metadata=metadata, rate=rate)

    def _load(self, spec: LoadSpec, pid: int | None) -> LoadResult | str:
        """One bounded run (with the server's CPU per call when ``pid`` is given), or why it failed."""
        cpu: list[float] = []
        if pid:  # the previous run's work left behind (audit rows, writes behind) is not this run's
            settle(pid)
        try:
            res: LoadResult = run_load(spec, on_start=(lambda: cpu.append(tree_cpu(pid))) if pid else None)
        except Exception as e:  # noqa: BLE001 - one failed run is reported, the bench goes on
            return str(e)
        if cpu and res.requests:
            settle(pid)  # and this run's own work left behind counts in its CPU per call
            res.server_cpu_us = (tree_cpu(pid) - cpu[0]) / res.requests * 1e6  # type: ignore[arg-type]
        return res

    def _record(self, row: Row, res: LoadResult | str) -> None:
        if isinstance(res, str):
            row.status = f"error: {res}"
            self.rows.append(row)
            say(f"    error: {res}")
            return
        row.result = res.as_dict() if row.result is None else row.result
        if res.requests == 0:
            row.status = f"error: every call failed ({res.first_error})"
        elif res.errors:
            row.note = (row.note + "; " if row.note else "") + f"{res.errors} errors {res.error_codes}: {res.first_error}"
        self.rows.append(row)
        cpu_note = f", server CPU {res.server_cpu_us:.0f} us/call" if res.server_cpu_us is not None else ""
        say(f"    {res.rps:9.0f} req/s  p50 {res.p50:7.2f} ms  p90 {res.p90:7.2f} ms  p99 {res.p99:7.2f} ms"
            f"  ({res.requests} calls{f', {res.errors} errors' if res.errors else ''}{cpu_note})")

    def measure(self, row: Row, spec: LoadSpec, pid: int | None = None) -> None:
        say(f"  {row.system:9} {row.config:10} {row.scenario:13} c={row.concurrency:<4} ...")
        self._record(row, self._load(spec, pid))

    def interleaved(self, c: int, runs: list[tuple[Row, Callable[[], LoadSpec], int | None]]) -> None:
        """Measure several systems at concurrency ``c`` turn by turn, ``--rounds`` times, and record each
        one's medians: on a shared host the other tenants' load then weighs on all of them alike."""
        results: list[list[LoadResult]] = [[] for _ in runs]
        failed: list[str | None] = [None] * len(runs)
        for r in range(self.args.rounds):
            for i, (row, make_spec, pid) in enumerate(runs):
                if failed[i]:
                    continue
                say(f"  {row.system:9} {row.config:10} {row.scenario:13} c={c:<4} round {r + 1}/{self.args.rounds} ...")
                res = self._load(make_spec(), pid)
                if isinstance(res, str):
                    failed[i] = res
                else:
                    results[i].append(res)
        for i, (row, _, _) in enumerate(runs):
            if failed[i] and not results[i]:
                self._record(row, failed[i])  # type: ignore[arg-type]
                continue
            rounds = results[i]
            merged = _median_result(rounds)
            row.result = {**merged.as_dict(), "rounds": [x.as_dict() for x in rounds]}
            if len(rounds) > 1:
                row.note = (row.note + "; " if row.note else "") + f"median of {len(rounds)} interleaved rounds"
            self._record(row, merged)

    def skip(self, system: str, config: str, scenario: str, why: str) -> None:
        say(f"  {system:9} {config:10} {scenario:13} skipped: {why}")
        self.rows.append(Row(system, config, scenario, 0, status=f"skipped: {why}"))

    # ---------------------------------------------------------------- CredScope
    def config_env(self, config: str, folder: Path) -> tuple[dict[str, str] | None, str]:
        a = self.args
        env = embedded_env(folder)
        if config == "audit-off":
            env["CREDSCOPE_AUDIT__ENABLED"] = "false"
        if config == "networked":
            problem = tcp_problem(a.redis_url, 6379) or tcp_problem(a.postgres_dsn, 5432)
            if problem:
                return None, f"Redis/PostgreSQL: {problem}"
            db = f"credscope_bench_{self.run_id}"
            try:
                asyncio.run(_pg(a.postgres_dsn, f'CREATE DATABASE "{db}"'))
            except Exception as e:  # noqa: BLE001
                return None, f"cannot create the PostgreSQL database: {e}"
            dsn = urlparse(a.postgres_dsn)._replace(path=f"/{db}").geturl()
            env.update({
                "CREDSCOPE_CACHE__REDIS_URL": a.redis_url,
                "CREDSCOPE_RATE_LIMIT__REDIS_URL": a.redis_url,
                "CREDSCOPE_CACHE__KEY_PREFIX": f"credscope-bench:{self.run_id}:",
                "CREDSCOPE_RATE_LIMIT__KEY_PREFIX": f"credscope-bench:{self.run_id}:ratelimit:",
                "CREDSCOPE_AUDIT__URL": dsn,
                "CREDSCOPE_AUTH__KEY_STORE_URL": dsn,
            })
        return env, ""

    def api_key(self, env: dict[str, str], folder: Path) -> tuple[tuple[tuple[str, str], ...], str]:
        """The optional key step: create an enterprise key with credscope-keys, or run anonymous."""
        a = self.args
        if a.api_key:
            return (("x-api-key", a.api_key),), "given API key (--api-key)"
        tool = Path(sys.executable).parent / "credscope-keys"
        if a.auth == "anonymous" or (a.auth == "auto" and not tool.exists()):
            env["CREDSCOPE_AUTH__ALLOW_ANONYMOUS"] = "true"
            why = "" if a.auth == "anonymous" else " (credscope-keys is not installed)"
            return (), f"anonymous{why}"
        return (("x-api-key", create_key(env, folder)),), "API key created with credscope-keys (enterprise tier)"

    def run_credscope(self, config: str) -> None:
        started = self.start_credscope(config)
        if started is None:
            return
        try:
            self._run_scenarios(started)
        finally:
            self.stop_credscope(started)

    def scenarios_of(self, config: str) -> list[str]:
        chosen = [s for s in SCENARIOS if s in self.args.scenarios]  # in this order: score-moderate after score-miss
        return [s for s in chosen if config != "audit-off" or s == "score-miss"]

    def start_credscope(self, config: str) -> Running | None:
        """Start ``credscope-server`` in ``config``; None (its scenarios reported skipped) when it cannot run."""
        a = self.args
        folder = self.workdir / config
        folder.mkdir(parents=True, exist_ok=True)
        scenarios = self.scenarios_of(config)
        if not scenarios:
            self.notes.append(f"credscope [{config}] not run: it measures only score-miss, which --scenarios leaves out")
            return None
        env, why = self.config_env(config, folder)
        if env is None:
            for s in scenarios:
                self.skip("credscope", config, s, why)
            return None
        try:
            metadata, auth = self.api_key(env, folder)
        except Exception as e:  # noqa: BLE001
            for s in scenarios:
                self.skip("credscope", config, s, f"API key step failed: {e}")
            return None
        say(f"credscope [{config}] {a.workers} workers, auth: {auth}")
        cmd = [sys.executable, "-m", "server.main", "--host", "127.0.0.1", "--port", "0", "--model-dir",
               str(a.model_dir.resolve()), "--workers", str(a.workers)]
        try:
            server = start_process(cmd, env, folder, folder / "server.log")
        except RuntimeError as e:
            for s in scenarios:
                self.skip("credscope", config, s, f"server did not start: {e}")
            return None
        return Running(config, server, metadata, env, folder)

    def stop_credscope(self, running: Running) -> None:
        status = running.server.stop()
        if status not in (0, None):
            self.notes.append(f"credscope [{running.config}] exited with status {status}: {running.server.tail(5)}")
        self._check_backends(running.config, running.env, running.folder)

    def _run_scenarios(self, running: Running) -> None:
        a = self.args
        config, server, md, scenarios = running.config, running.server, running.metadata, self.scenarios_of(running.config)
        probe_apps = self.applicants.take(101)
        found = in_child(_probe, server.target, md, score_requests(probe_apps[:1])[0],
                         score_requests(probe_apps[1:2], explain=True)[0], batch_requests(probe_apps[1:], 100)[0])
        if found["score"] != "ok":
            for s in scenarios:
                self.skip("credscope", config, s, f"Score fails: {found['score']}")
            return
        self.features = found
        for scenario in scenarios:
            if scenario == "score-hit" and found["cache"] != "ok":
                self.skip("credscope", config, scenario, found["cache"])
                continue
            if scenario == "score-explain" and found["explain"] != "ok":
                self.skip("credscope", config, scenario, found["explain"])
                continue
            if scenario.startswith("batch") and found["batch"] != "ok":
                self.skip("credscope", config, scenario, f"BatchScore fails: {found['batch']}")
                continue
            if scenario == "score-moderate":
                self._run_moderate(running)
                continue
            levels = a.batch_concurrency if scenario.startswith("batch") else a.concurrency
            for c in levels:
                if scenario == "score-miss" and config == "embedded" and (self.peers or self.audit_off is not None):
                    runs: list[tuple[Row, Callable[[], LoadSpec], int | None]] = [
                        (Row("credscope", config, scenario, c),
                         lambda c=c: self._spec_for("score-miss", server, c, md), server.proc.pid)]
                    off = self.audit_off
                    if off is not None:  # audit on vs off, turn by turn too
                        runs.append((Row("credscope", off.config, scenario, c),
                                     lambda c=c, off=off: self._spec_for("score-miss", off.server, c, off.metadata),
                                     off.server.proc.pid))
                    runs += [(Row(p.system, p.config, "score-miss", c, note=p.note),
                              lambda p=p, c=c: self.spec(p.target, p.method, p.payloads, c), p.pid) for p in self.peers]
                    self.interleaved(c, runs)
                else:
                    self.measure(Row("credscope", config, scenario, c), self._spec_for(scenario, server, c, md),
                                 server.proc.pid)

    def moderate_rate(self, config: str) -> tuple[float | None, str]:
        """The offered rate of the moderate-load run and how it was chosen (None, why: it cannot be chosen)."""
        a = self.args
        if a.moderate_rate:
            return a.moderate_rate, f"{a.moderate_rate:.0f} calls/s (--moderate-rate)"
        best = self.best("credscope", config, "score-miss")
        if best is None:
            return None, "needs this configuration's Score cache-miss throughput (scenario score-miss) or --moderate-rate"
        rps = best.result["rps"]  # type: ignore[index]
        return a.moderate_load * rps, (f"{a.moderate_load:.0%} of this configuration's best Score cache-miss "
                                       f"throughput ({rps:.0f} calls/s at {best.concurrency} in flight)")

    def _run_moderate(self, running: Running) -> None:
        """Score (cache miss) at a fixed offered rate, open loop: the latency targets' "moderate load". The
        embedded server is measured turn by turn with the echo floor at the same rate (its latency there is
        the floor's)."""
        config, server, md = running.config, running.server, running.metadata
        rate, how = self.moderate_rate(config)
        if rate is None:
            self.skip("credscope", config, "score-moderate", how)
            return
        note = f"open loop, {rate:.0f} calls/s offered ({how}), at most {OPEN_LOOP_IN_FLIGHT} in flight"
        say(f"  moderate load: {note}")
        runs: list[tuple[Row, Callable[[], LoadSpec], int | None]] = [
            (Row("credscope", config, "score-moderate", 0, note=note),
             lambda: self._spec_for("score-miss", server, 1, md, rate=rate), server.proc.pid)]
        if config == "embedded":
            runs += [(Row(p.system, p.config, "score-moderate", 0, note=note),
                      lambda p=p: self.spec(p.target, p.method, p.payloads, 1, rate=rate), p.pid)
                     for p in self.peers if p.system == "echo"]
        self.interleaved(0, runs)

    def _spec_for(self, scenario: str, server: Started, c: int, md: tuple[tuple[str, str], ...],
                  rate: float | None = None) -> LoadSpec:
        a = self.args
        if scenario == "score-hit":
            reqs = score_requests(self.fixed)
            return self.spec(server.target, SCORE, reqs, c, metadata=md)
        if scenario in ("score-miss", "score-explain"):
            explain = scenario == "score-explain"
            n = a.requests if not explain else min(a.requests, a.explain_requests)
            warm = score_requests(self.applicants.take(min(n, 2000)), explain)
            return self.spec(server.target, SCORE, score_requests(self.applicants.take(n), explain), c, warm=warm,
                             unique=True, metadata=md, rate=rate)
        size = int(scenario.split("-")[1])
        n = max(1, min(a.requests, a.batch_applicants // size))
        warm = batch_requests(self.applicants.take(size * min(n, 4)), size)
        return self.spec(server.target, BATCH, batch_requests(self.applicants.take(size * n), size), c, warm=warm,
                         unique=True, metadata=md)

    def _check_backends(self, config: str, env: dict[str, str], folder: Path) -> None:
        """After the server stopped: did the audit trail and the networked backends get the calls?"""
        audit_on = env.get("CREDSCOPE_AUDIT__ENABLED", "true") != "false"
        url = env["CREDSCOPE_AUDIT__URL"]
        if url.startswith("postgresql"):
            try:
                rows = asyncio.run(_pg_count(url, "predictions"))
            except Exception as e:  # noqa: BLE001
                rows = None
                self.notes.append(f"credscope [{config}] audit check failed: {e}")
            finally:
                try:
                    db = urlparse(url).path.lstrip("/")
                    asyncio.run(_pg(self.args.postgres_dsn, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
                except Exception as e:  # noqa: BLE001
                    self.notes.append(f"could not drop the bench database: {e}")
        else:
            rows = sqlite_count(folder / "audit.db", "predictions")
        if audit_on:
            self.audit_rows[config] = rows
            self.notes.append(f"credscope [{config}] audit trail: " + (
                "feature not available (no predictions table)" if rows is None else f"{rows} prediction rows"))
        if config == "networked":
            try:
                n = redis_keys(self.args.redis_url, env["CREDSCOPE_CACHE__KEY_PREFIX"])
                self.notes.append(f"credscope [networked] Redis: {n} keys under the bench prefix (deleted)"
                                  + ("" if n else " — the Redis backends are not available yet"))
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"credscope [networked] Redis check failed: {e}")

    # ---------------------------------------------------------------- references
    def start_echo(self) -> list[Peer]:
        a = self.args
        folder = self.workdir / "echo"
        folder.mkdir(exist_ok=True)
        say(f"echo floor: empty grpc.aio server, {a.workers} workers")
        cmd = [sys.executable, "-m", "tools.bench_peers", "echo", "--port", "0", "--workers", str(a.workers)]
        try:
            server = start_process(cmd, base_env(), folder, folder / "echo.log", timeout=60)
        except RuntimeError as e:
            self.skip("echo", "-", "score-miss", str(e))
            return []
        return [Peer("echo", "-", server.target, ECHO_METHOD, score_requests(self.applicants.take(2000)),
                     server.proc.pid, server.stop)]

    def start_mlservers(self, version: str) -> list[Peer]:
        a = self.args
        venv = a.mlserver_venv
        if not (venv / "bin" / "mlserver").exists():
            self.skip("mlserver", "-", "score-miss", f"MLServer is not installed in {venv} (make bench makes it)")
            return []
        folder = self.workdir / "mlserver"
        folder.mkdir(exist_ok=True)
        peer = subprocess.run([sys.executable, "-m", "tools.bench_peers", "peer-model", "--model-dir",
                               str(a.model_dir), "--version", version, "--out", str(a.peer_cache)],
                              capture_output=True, text=True, cwd=ROOT, env=base_env(), timeout=900)
        if peer.returncode != 0:
            self.skip("mlserver", "-", "score-miss", f"cannot build the peer's model: {peer.stderr.strip()[-300:]}")
            return []
        model_file = Path(peer.stdout.strip().splitlines()[-1])
        import numpy as np

        np.save(folder / "rows.npy", rows_of(self.applicants.take(2000)))
        np.save(folder / "check.npy", rows_of(self.fixed[:8]))
        made = venv_python(venv, "mlserver-requests", "--rows", str(folder / "rows.npy"), "--version", version,
                           "--out", str(folder / "requests.bin"))
        if made.returncode != 0:
            self.skip("mlserver", "-", "score-miss", f"cannot build V2 requests: {made.stderr.strip()[-300:]}")
            return []
        payloads = read_frames(folder / "requests.bin")
        peers = []
        for pw in a.mlserver_workers:
            started = self._start_one_mlserver(venv, model_file, version, folder, pw, payloads)
            if started is not None:
                peers.append(started)
        return peers

    def _start_one_mlserver(self, venv: Path, model_file: Path, version: str, folder: Path, pw: int,
                            payloads: list[bytes]) -> Peer | None:
        config = f"pw={pw}"
        say(f"MLServer peer (parallel_workers={pw})")
        work = folder / config
        work.mkdir(exist_ok=True)
        ml = MLServerProcess(venv, model_file, version, work, pw)
        try:
            ml.start()
            ready = in_child(_mlserver_ready, ml.target, 120.0, timeout=150)
            if ready != "ok":
                self.skip("mlserver", config, "score-miss", f"MLServer did not become ready ({ready}): {ml.log_tail(8)}")
                ml.stop()
                return None
            same = self._same_model(ml, folder, version)
            if same:
                self.notes.append(f"{same} ({config})")
        except OSError as e:
            self.skip("mlserver", config, "score-miss", f"MLServer did not start: {e}")
            ml.stop()
            return None
        return Peer("mlserver", config, ml.target, MLSERVER_INFER, payloads, ml.proc.pid if ml.proc else None,
                    ml.stop, note="V2 ModelInfer, 1 row FP32 raw tensor, predict_proba")

    def _same_model(self, ml: MLServerProcess, folder: Path, version: str) -> str:
        """Check that MLServer's P(default) equals CredScope's model's for a few applicants."""
        out = ml.python("mlserver-check", "--target", ml.target, "--rows", str(folder / "check.npy"),
                        "--version", version)
        try:
            got = json.loads(out.stdout)["probabilities"]
        except (ValueError, KeyError):
            return f"MLServer check failed: {out.stdout[-200:]} {out.stderr[-300:]}"
        want = in_child(_onnx_proba, self.args.model_dir, version, folder / "check.npy")
        diff = max(abs(x - y) for x, y in zip(got, want, strict=True))
        return f"MLServer serves the same model: max |P(mlserver) - P(credscope)| = {diff:.1e} over {len(got)} applicants"

    # ---------------------------------------------------------------- all
    def run(self) -> dict[str, Any]:
        a = self.args
        from server.model import active_version

        version = a.model_version or active_version(a.model_dir)
        if version is None:
            raise SystemExit(f"credscope-bench: no model in {a.model_dir}; run `make model`")
        started = time.time()
        try:
            if a.echo:
                self.peers += self.start_echo()
            if a.mlserver:
                self.peers += self.start_mlservers(version)
            # audit on vs off: the audit-off server runs beside the embedded one and its Score is measured
            # turn by turn with it (configurations measured minutes apart differed by ±10% on their own)
            beside = "embedded" in a.configs and "audit-off" in a.configs and "score-miss" in a.scenarios
            if beside:
                self.audit_off = self.start_credscope("audit-off")
            for config in a.configs:
                if beside and config == "audit-off":
                    continue
                self.run_credscope(config)
                if config == "embedded":
                    self.finish_audit_off()
            measured = {(r.system, r.config) for r in self.rows if r.system != "credscope" and r.concurrency}
            alone = [p for p in self.peers if (p.system, p.config) not in measured]  # no embedded score-miss run
            for c in a.concurrency if alone else []:
                self.interleaved(c, [(Row(p.system, p.config, "score-miss", c, note=p.note),
                                      lambda p=p, c=c: self.spec(p.target, p.method, p.payloads, c), p.pid)
                                     for p in alone])
        finally:
            try:
                if self.audit_off is not None:  # (an error cut the run short)
                    self.stop_credscope(self.audit_off)
            finally:
                for p in self.peers:
                    p.stop()
        return self.report(version, time.time() - started)

    def finish_audit_off(self) -> None:
        """After the embedded configuration: measure the audit-off server alone if the embedded one could not
        be measured beside it, then stop it."""
        off, self.audit_off = self.audit_off, None
        if off is None:
            return
        try:
            if not any(r.config == off.config for r in self.rows):  # not measured in embedded's rounds
                self._run_scenarios(off)
        finally:
            self.stop_credscope(off)

    def best(self, system: str, config: str | None, scenario: str, concurrency: int | None = None) -> Row | None:
        """The row with the most req/s (``config`` None: over every configuration of ``system``)."""
        rows = [r for r in self.rows if r.system == system and config in (None, r.config) and r.scenario == scenario
                and r.result and r.status == "ok" and (concurrency is None or r.concurrency == concurrency)]
        return max(rows, key=lambda r: r.result["rps"]) if rows else None  # type: ignore[index]

    def _audit_levels(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(embedded, audit-off) Score cache-miss results at each concurrency level both were measured at."""
        def by_level(config: str) -> dict[int, dict[str, Any]]:
            return {r.concurrency: r.result for r in self.rows if r.system == "credscope" and r.config == config
                    and r.scenario == "score-miss" and r.status == "ok" and r.result and r.result.get("rps")}

        on, off = by_level("embedded"), by_level("audit-off")
        return [(on[c], off[c]) for c in sorted(on.keys() & off.keys())]

    def report(self, version: str, seconds: float) -> dict[str, Any]:
        a = self.args
        mod = a.moderate
        miss = self.best("credscope", "embedded", "score-miss")
        echo = self.best("echo", "-", "score-miss")
        mls = self.best("mlserver", None, "score-miss")  # MLServer's best configuration
        # audit on vs off means something only when the server has an audit trail
        # audit on vs off: the median over the concurrency levels both were measured at (in the same rounds),
        # not at one level chosen by the best throughput (which favours the luckiest level)
        audit_levels = self._audit_levels() if self.audit_rows.get("embedded") else []
        closed = self.best("credscope", "embedded", "score-miss", mod)
        open_loop = self.best("credscope", "embedded", "score-moderate")
        moderate = open_loop or closed
        hit = self.best("credscope", "embedded", "score-hit", mod)
        expl = self.best("credscope", "embedded", "score-explain", mod)
        b1000 = self.best("credscope", "embedded", "batch-1000", 1)

        def r(row: Row | None, key: str) -> float | None:
            return row.result[key] if row and row.result else None  # type: ignore[index]

        def ratio(x: float | None, y: float | None) -> float | None:
            return x / y if x and y else None

        # "Moderate load": the open-loop run at a fixed share of the best throughput when there is one; the
        # closed-loop level --moderate otherwise (on 2 cores shared with the load generator, 4 in flight
        # already runs the server at ~95% of its best throughput: latency at saturation, not at moderate load)
        load = f"open loop, {r(open_loop, 'rate'):.0f} calls/s" if open_loop and r(open_loop, "rate") else f"c={mod}"
        closed_share = ratio(r(closed, "rps"), r(miss, "rps"))
        # calls that failed or were never sent (the server fell behind) fail the latency targets
        failed = f"; {r(moderate, 'errors')} calls failed or not sent" if r(moderate, "errors") else ""

        ratios = {
            "score_vs_echo": ratio(r(miss, "rps"), r(echo, "rps")),
            "score_vs_mlserver": ratio(r(miss, "rps"), r(mls, "rps")),
            "audit_cost": _median([1 - on["rps"] / off["rps"] for on, off in audit_levels]),
            # Server CPU per call: steadier than req/s on a shared host (what the other tenants take is not in it)
            "cpu_echo_over_score": ratio(r(echo, "server_cpu_us"), r(miss, "server_cpu_us")),
            "cpu_mlserver_over_score": ratio(r(mls, "server_cpu_us"), r(miss, "server_cpu_us")),
            "cpu_audit_cost": _median([on["server_cpu_us"] / off["server_cpu_us"] - 1 for on, off in audit_levels
                                       if on.get("server_cpu_us") and off.get("server_cpu_us")]),
        }
        targets = [
            ("Score throughput >= 50% of the echo floor", ratios["score_vs_echo"], lambda v: v >= 0.5, "{:.0%}"),
            ("Score throughput >= 3x MLServer's", ratios["score_vs_mlserver"], lambda v: v >= 3, "{:.1f}x"),
            (f"Score p99 <= 5 ms at moderate load ({load}{failed})", r(moderate, "p99"),
             lambda v: v <= 5 and not failed, "{:.2f} ms"),
            (f"Score p50 <= 1 ms at moderate load ({load}{failed})", r(moderate, "p50"),
             lambda v: v <= 1 and not failed, "{:.2f} ms"),
            (f"cache hit p50 <= 0.5 ms (c={mod})", r(hit, "p50"), lambda v: v <= 0.5, "{:.2f} ms"),
            (f"explanation p50 <= 3 ms (c={mod})", r(expl, "p50"), lambda v: v <= 3, "{:.2f} ms"),
            ("BatchScore of 1,000 <= 20 ms (p50, c=1)", r(b1000, "p50"), lambda v: v <= 20, "{:.1f} ms"),
            ("audit on vs off <= 10% throughput cost (median over levels)", ratios["audit_cost"], lambda v: v <= 0.10, "{:.1%}"),
            ("  by server CPU/call: Score vs echo >= 50%", ratios["cpu_echo_over_score"], lambda v: v >= 0.5, "{:.0%}"),
            ("  by server CPU/call: Score vs MLServer >= 3x", ratios["cpu_mlserver_over_score"], lambda v: v >= 3,
             "{:.1f}x"),
            ("  by server CPU/call: audit cost <= 10% (median over levels)", ratios["cpu_audit_cost"], lambda v: v <= 0.10, "{:.1%}"),
        ]
        # For reference, not targets (met: None): the closed-loop level, with how near saturation it ran, and
        # the echo floor's own latency at the same offered rate.
        if open_loop and closed:
            share = f", {closed_share:.0%} of the best throughput" if closed_share else ""
            targets += [(f"  reference: closed loop, Score p99 (c={mod}{share})", r(closed, "p99"), None, "{:.2f} ms"),
                        (f"  reference: closed loop, Score p50 (c={mod}{share})", r(closed, "p50"), None, "{:.2f} ms")]
        echo_moderate = self.best("echo", "-", "score-moderate")
        if echo_moderate:
            targets.append((f"  reference: echo floor at the same rate, p99 (p50 {r(echo_moderate, 'p50'):.2f} ms)",
                            r(echo_moderate, "p99"), None, "{:.2f} ms"))
        target_rows = [{"target": name, "measured": value,
                        "met": None if value is None or ok is None else bool(ok(value)),
                        "shown": "n/a" if value is None else fmt.format(value)} for name, value, ok, fmt in targets]
        return {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["credscope-bench", *sys.argv[1:]]),
            "host": {"cpus": cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                     "load_average": os.getloadavg()},
            "model_version": version,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "seconds": round(seconds, 1),
            "rows": [row.as_dict() for row in self.rows],
            "ratios": ratios,
            "targets": target_rows,
            "notes": self.notes,
        }

    def cleanup(self) -> None:
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def _median_result(results: list[LoadResult]) -> LoadResult:
    """The per-metric medians of several runs (calls and errors summed)."""
    import statistics

    def med(key: str) -> float:
        values = [getattr(r, key) for r in results if getattr(r, key) is not None]
        return float(statistics.median(values)) if values else math.nan

    first = results[0]
    codes: dict[str, int] = {}
    for r in results:
        for k, v in r.error_codes.items():
            codes[k] = codes.get(k, 0) + v
    cpu = [r.server_cpu_us for r in results if r.server_cpu_us is not None]
    return LoadResult(requests=sum(r.requests for r in results), errors=sum(r.errors for r in results),
                      seconds=sum(r.seconds for r in results), rps=med("rps"), p50=med("p50"), p90=med("p90"),
                      p99=med("p99"), mean=med("mean"), max=max(r.max for r in results), error_codes=codes,
                      first_error=next((r.first_error for r in results if r.first_error), None),
                      concurrency=first.concurrency, processes=first.processes,
                      server_cpu_us=float(statistics.median(cpu)) if cpu else None, rate=first.rate)


def _onnx_proba(model_dir: Path, version: str, rows: Path) -> list[float]:
    import numpy as np

    from server.model import load_model

    return [float(p) for p in load_model(model_dir, version).predict_proba(np.load(rows))]


def parse_key(text: str) -> str | None:
    """The key in ``credscope-keys create``'s output: a JSON object's ``key``/``api_key``, a ``key: …``
    line, or the longest token that looks like a key."""
    text = text.strip()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            for k in ("key", "api_key", "secret", "token"):
                if isinstance(data.get(k), str):
                    return data[k]
    except ValueError:
        pass
    m = re.search(r"(?im)^\s*(?:api[_ -]?)?key\s*[:=]\s*(\S+)\s*$", text)
    if m:
        return m.group(1)
    tokens = [t for t in re.findall(r"[A-Za-z0-9_\-.]{24,}", text)]
    return max(tokens, key=len) if tokens else None


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def table(report: dict[str, Any]) -> str:
    lines = [f"{'system':9} {'config':10} {'scenario':13} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} "
             f"{'p99 ms':>8} {'calls':>7} {'CPU us':>7}  note"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['system']:9} {r['config']:10} {r['scenario']:13} {'':>4} {r['status']}")
            continue
        conc = "open" if r.get("rate") else r["concurrency"]
        lines.append(f"{r['system']:9} {r['config']:10} {r['scenario']:13} {conc:>4} {r['rps']:>9.0f} "
                     f"{r['p50']:>8.2f} {r['p90']:>8.2f} {r['p99']:>8.2f} {r['requests']:>7} "
                     f"{_num(r.get('server_cpu_us'), '>7.0f')}  {r['note']}")
    lines.append("")
    for t in report["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]] \
            if t["met"] is not None or t["measured"] is None else ""
        lines.append(f"  {t['target']:72} {t['shown']:>10}  {mark}")
    if report["notes"]:
        lines.append("")
        lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else format("-", fmt[:2] if fmt[0] in "<>" else "")


def plot(report: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    rows = [r for r in report["rows"] if r["status"] == "ok" and r["scenario"].startswith("score")
            and not r.get("rate")]  # (open-loop runs have no "calls in flight" to plot against)
    batch = [r for r in report["rows"] if r["status"] == "ok" and r["scenario"].startswith("batch")]
    paced = [r for r in report["rows"] if r["status"] == "ok" and r.get("rate")]
    fig, axes = plt.subplots(1, 4 if paced else 3, figsize=(22 if paced else 17, 5.5))
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['system']} {r['config'] if r['config'] != '-' else ''} {r['scenario']}".replace("  ", " "),
                          []).append((r["concurrency"], r["rps"], r["p99"]))
    for name, pts in series.items():
        pts.sort()
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    axes[0].set(title="throughput (unary calls)", xlabel="calls in flight", ylabel="requests/s", xscale="log")
    axes[1].set(title="p99 latency", xlabel="calls in flight", ylabel="ms", xscale="log", yscale="log")
    axes[1].axhline(5, color="grey", linestyle="--", linewidth=1)
    if series:  # (a run of BatchScore scenarios alone has no unary series)
        axes[0].legend(fontsize=7)
    if batch:
        names = [f"{r['config']}\n{r['scenario']} c={r['concurrency']}" for r in batch]
        axes[2].bar(range(len(batch)), [r["p50"] for r in batch], label="p50")
        axes[2].scatter(range(len(batch)), [r["p99"] for r in batch], color="black", zorder=3, label="p99")
        axes[2].set_xticks(range(len(batch)), names, fontsize=7, rotation=45, ha="right")
        axes[2].axhline(20, color="grey", linestyle="--", linewidth=1)
        axes[2].legend(fontsize=7)
    axes[2].set(title="BatchScore latency", ylabel="ms")
    if paced:  # open loop: latency percentiles at the offered rate, CredScope beside the echo floor
        width = 0.27
        for k, q in enumerate(("p50", "p90", "p99")):
            axes[3].bar([i + (k - 1) * width for i in range(len(paced))], [r[q] for r in paced], width, label=q)
        axes[3].set_xticks(range(len(paced)), [f"{r['system']} {r['config'] if r['config'] != '-' else ''}\n"
                                                f"{r['rate']:.0f} calls/s offered" for r in paced], fontsize=7)
        axes[3].axhline(5, color="grey", linestyle="--", linewidth=1)
        axes[3].set(title="Score at moderate load (open loop)", ylabel="ms")
        axes[3].legend(fontsize=7)
    fig.suptitle(f"credscope-bench, model {report['model_version']}, {report['host']['cpus']} CPUs, "
                 f"{report['when']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return levels


def _levels0(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError("parallel_workers must be >= 0")
    return values


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
        return names
    return parse


def parser() -> argparse.ArgumentParser:
    cores = cpu_count()
    p = argparse.ArgumentParser(
        prog="credscope-bench",
        description="Benchmark CredScope (Score cache miss/hit/explanation, BatchScore of 100 and 1,000; "
                    "embedded, audit-off and Redis+PostgreSQL configurations) against an empty grpc.aio echo "
                    "server and MLServer serving the same model, on this machine, with a multi-process grpc.aio "
                    "load generator. Prints a table and the targets; writes JSON and a PNG.",
        epilog="Every run is bounded in time and count. Example (quick look): credscope-bench --quick")
    p.add_argument("--model-dir", type=Path, default=Path("models"), help="model store (default %(default)s)")
    p.add_argument("--model-version", help="version to serve (default: the ACTIVE one)")
    p.add_argument("--workers", type=int, default=cores, help="server worker processes (default: cores, %(default)s)")
    p.add_argument("--processes", type=int, default=max(1, cores), help="load generator processes (default %(default)s)")
    p.add_argument("--channels", type=int, default=4,
                   help="channels (TCP connections) per load process; calls go round them (default 4)")
    p.add_argument("--concurrency", type=_levels, default=[1, 4, 16, 64],
                   help="calls in flight for the Score scenarios, comma-separated (default 1,4,16,64)")
    p.add_argument("--batch-concurrency", type=_levels, default=[1, 4],
                   help="calls in flight for the BatchScore scenarios (default 1,4)")
    p.add_argument("--moderate", type=int, default=4,
                   help="the closed-loop level (calls in flight) of the cache-hit and explanation targets, and of the "
                        "Score latency targets when score-moderate is not run (default 4)")
    p.add_argument("--moderate-load", type=float, default=0.5,
                   help="scenario score-moderate: Score (cache miss) at this share of the configuration's best Score "
                        "cache-miss throughput in this run, offered open loop (Poisson arrivals); the p50/p99 targets "
                        "are read there (default 0.5)")
    p.add_argument("--moderate-rate", type=float,
                   help="scenario score-moderate at this rate (calls/s) instead of --moderate-load's share")
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per run (default 3)")
    p.add_argument("--rounds", type=int, default=3,
                   help="Score (cache miss) of CredScope, the echo server and MLServer is measured turn by turn this "
                        "many times per concurrency level; the medians are reported (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run, not measured (default 1)")
    p.add_argument("--requests", type=int, default=20_000, help="most calls measured per run (default 20000)")
    p.add_argument("--explain-requests", type=int, default=5_000, help="most calls per explanation run (default 5000)")
    p.add_argument("--batch-applicants", type=int, default=100_000,
                   help="most applicants sent per BatchScore run (default 100000)")
    p.add_argument("--scenarios", type=_names(SCENARIOS), default=list(SCENARIOS),
                   help=f"comma-separated, from {','.join(SCENARIOS)} (default: all)")
    p.add_argument("--configs", type=_names(CONFIGS), default=list(CONFIGS),
                   help=f"comma-separated, from {','.join(CONFIGS)} (default: all)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis of the networked config")
    p.add_argument("--postgres-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="PostgreSQL (a database is created and dropped) of the networked config")
    p.add_argument("--auth", choices=("auto", "anonymous", "create-key"), default="auto",
                   help="API keys: create an enterprise key with credscope-keys (auto: when it is installed) or "
                        "run anonymous (default auto)")
    p.add_argument("--api-key", help="send this API key (it must exist in the server's key store)")
    p.add_argument("--no-echo", dest="echo", action="store_false", help="skip the echo floor")
    p.add_argument("--no-mlserver", dest="mlserver", action="store_false", help="skip the MLServer peer")
    p.add_argument("--mlserver-venv", type=Path, default=Path(".venv-bench"), help="MLServer's virtualenv")
    p.add_argument("--mlserver-workers", type=_levels0, default=[0, 1],
                   help="MLServer parallel_workers settings to run, comma-separated (0 = inference in its server "
                        "process, 1 = MLServer's default: one inference process); the ratio uses the best (default 0,1)")
    p.add_argument("--peer-cache", type=Path, default=Path("reports/bench-peer"),
                   help="where the peer's refitted pipeline is kept (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("reports/bench.json"), help="JSON results (PNG beside it)")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run: 1 s per run, 0.3 s warm-up, concurrency 1,4, embedded config only, "
                        "MLServer with parallel_workers=0 (flags given explicitly win)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (server logs, databases)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:  # shorter defaults; flags given explicitly still win
        argv_list = list(argv if argv is not None else sys.argv[1:])

        def given(flag: str) -> bool:
            return any(x == flag or x.startswith(flag + "=") for x in argv_list)

        for flag, attr, value in (("--duration", "duration", 1.0), ("--warmup", "warmup", 0.3), ("--rounds", "rounds", 1),
                                  ("--concurrency", "concurrency", [1, 4]), ("--batch-concurrency", "batch_concurrency", [1]),
                                  ("--configs", "configs", ["embedded"]), ("--mlserver-workers", "mlserver_workers", [0])):
            if not given(flag):
                setattr(args, attr, value)
        args.requests = min(args.requests, 5000)
        args.explain_requests = min(args.explain_requests, 1000)
        args.batch_applicants = min(args.batch_applicants, 20_000)
    if args.workers < 1 or args.processes < 1 or args.duration <= 0 or args.requests < 1 or args.rounds < 1:
        parser().error("--workers, --processes, --requests, --rounds must be >= 1 and --duration > 0")
    if not 0 < args.moderate_load <= 1 or (args.moderate_rate is not None and args.moderate_rate <= 0):
        parser().error("--moderate-load must be in (0, 1] and --moderate-rate > 0")
    args.model_dir, args.mlserver_venv = args.model_dir.resolve(), args.mlserver_venv.absolute()
    args.peer_cache = args.peer_cache.resolve()
    if args.moderate not in args.concurrency:
        args.concurrency = sorted({*args.concurrency, args.moderate})
    bench = Bench(args)
    try:
        report = bench.run()
    finally:
        bench.cleanup()
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=lambda o: None if isinstance(o, float) and
                                   math.isnan(o) else str(o)) + "\n")
    png = args.out.with_suffix(".png")
    problem = plot(report, png)
    say(f"results: {args.out}" + (f", {png}" if problem is None else f" ({problem})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
