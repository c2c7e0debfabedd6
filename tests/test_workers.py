"""``credscope-server --workers N``: N processes on one SO_REUSEPORT port, one listening line, signals
forwarded, a dead worker stops the server (nothing restarted), and the embedded backends stay correct
across workers (rate limits exact, audit complete) once those features are on the branch.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from credscope.v1 import scoring_pb2, scoring_pb2_grpc
from server.settings import Settings
from tests.helpers import ROOT, ServerProcess, start_server
from tests.test_api import applicant

ANON = {"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true", "CREDSCOPE_SERVER__DRAIN_SECONDS": "0"}


def running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def established_ports(pid: int, port: int) -> int:
    """How many established TCP connections on local ``port`` process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            if local_port == port and parts[3] == "01" and parts[9] in inodes:
                n += 1
    return n


async def _score_on_channels(target: str, channels: int, calls: int,
                             request_ids: list[str] | None = None) -> dict[str, int]:
    """``calls`` Score calls spread over ``channels`` channels (each its own TCP connection)."""
    chans = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(channels)]
    try:
        stubs = [scoring_pb2_grpc.ScoringServiceStub(ch) for ch in chans]

        async def one(i: int) -> str:
            req = scoring_pb2.ScoreRequest(applicant=applicant())
            if request_ids is not None:
                req.request_id = request_ids[i]
            try:
                await stubs[i % len(stubs)].Score(req, timeout=30)
                return "OK"
            except grpc.aio.AioRpcError as e:
                return e.code().name

        codes = await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        for ch in chans:
            await ch.close()
    return {c: codes.count(c) for c in set(codes)}


def test_default_workers_is_the_hosts_cores() -> None:
    assert Settings().server.workers == max(1, min(64, len(os.sched_getaffinity(0))))


def test_two_workers_share_one_port_and_stop_together(model_dir: Path, tmp_path: Path) -> None:
    sp = start_server(model_dir, cwd=tmp_path, env=ANON, args=["--workers", "2"])
    try:
        workers = children(sp.proc.pid)
        assert len(workers) == 2, sp.log()
        # 24 connections: the kernel spreads them over both workers (all on one: p = 2^-23)
        chans = [grpc.insecure_channel(sp.target, options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(24)]
        try:
            for ch in chans:
                resp = scoring_pb2_grpc.ScoringServiceStub(ch).Score(
                    scoring_pb2.ScoreRequest(applicant=applicant()), timeout=30)
                assert 0.0 <= resp.default_probability <= 1.0
            per_worker = [established_ports(pid, sp.port) for pid in workers]
            assert sum(per_worker) == 24 and min(per_worker) > 0, per_worker
        finally:
            for ch in chans:
                ch.close()
    finally:
        rc = sp.stop(signal.SIGTERM)
    log = sp.log()
    assert rc == 0, log
    assert log.count("CredScope listening on") == 1
    assert "(model " in log and "2 workers" in log
    assert log.count("stopped") >= 2 and "[worker 0 pid" in log and "[worker 1 pid" in log
    assert not [pid for pid in workers if running(pid)]


def test_a_dead_worker_stops_the_server_with_status_3(model_dir: Path, tmp_path: Path) -> None:
    sp = start_server(model_dir, cwd=tmp_path, env=ANON, args=["--workers", "2"])
    try:
        victim, other = children(sp.proc.pid)
        os.kill(victim, signal.SIGKILL)
        rc = sp.proc.wait(timeout=30)
    finally:
        sp.stop(signal.SIGKILL)
    assert rc == 3, sp.log()
    assert f"pid {victim}) died with status -9" in sp.log()
    assert "nothing is restarted" in sp.log()
    deadline = time.monotonic() + 10
    while running(other) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(other), "the surviving worker was left running"


def test_the_parent_drops_a_killed_workers_live_metrics(model_dir: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    sp = start_server(model_dir, cwd=tmp_path, env=ANON, args=["--workers", "2", "--metrics-dir", str(metrics)])
    try:
        victim, other = children(sp.proc.pid)
        deadline = time.monotonic() + 20
        while not (list(metrics.glob(f"gauge_live*_{victim}.db")) and list(metrics.glob(f"gauge_live*_{other}.db"))):
            assert time.monotonic() < deadline, sorted(p.name for p in metrics.iterdir())
            time.sleep(0.1)
        os.kill(victim, signal.SIGKILL)  # it cannot clean up after itself
        assert sp.proc.wait(timeout=30) == 3
    finally:
        sp.stop(signal.SIGKILL)
    assert not list(metrics.glob("gauge_live*.db")), sorted(p.name for p in metrics.iterdir())
    assert list(metrics.glob(f"counter_{victim}.db"))  # its counts stay in the totals


def test_workers_of_a_killed_parent_stop(model_dir: Path, tmp_path: Path) -> None:
    sp = start_server(model_dir, cwd=tmp_path, env=ANON, args=["--workers", "2"])
    workers = children(sp.proc.pid)
    assert len(workers) == 2
    sp.stop(signal.SIGKILL)  # no forwarding: each worker gets its SIGTERM from the kernel (PR_SET_PDEATHSIG)
    deadline = time.monotonic() + 20
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in workers if running(pid)]
    assert not alive, "orphaned workers kept running"


def test_a_worker_that_cannot_start_fails_the_server(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "server.main", "--port", "0", "--workers", "2", "--model-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2, out.stderr
    assert "credscope-train" in out.stderr or "make model" in out.stderr
    assert "CredScope listening" not in out.stdout


def test_workers_flag_is_validated() -> None:
    out = subprocess.run([sys.executable, "-m", "server.main", "--workers", "0"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--workers must be between 1 and 64" in out.stderr


def test_a_busy_port_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "server.main", "--port", str(port), "--workers", "2",
                              "--model-dir", str(model_dir)], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1, out.stderr
    assert "credscope-server:" in out.stderr and "CredScope listening" not in out.stdout


def test_a_second_server_cannot_join_the_port_of_a_running_one(model_dir: Path, tmp_path: Path) -> None:
    sp = start_server(model_dir, cwd=tmp_path, env=ANON, args=["--workers", "2"])
    try:
        out = subprocess.run([sys.executable, "-m", "server.main", "--port", str(sp.port), "--workers", "2",
                              "--model-dir", str(model_dir)], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        sp.stop()
    assert out.returncode == 1 and "Address already in use" in out.stderr, out.stderr


# ---------------------------------------------------------------- embedded backends across workers

def _two_workers(model_dir: Path, cwd: Path, env: dict[str, str]) -> ServerProcess:
    return start_server(model_dir, cwd=cwd, env={**ANON, **env}, args=["--workers", "2"])


def test_rate_limit_is_exact_across_workers(model_dir: Path, tmp_path: Path) -> None:
    limit = 5
    sp = _two_workers(model_dir, tmp_path, {"CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": str(limit)})
    try:
        counts = asyncio.run(_score_on_channels(sp.target, channels=16, calls=4 * limit))
    finally:
        sp.stop()
    if counts == {"OK": 4 * limit}:
        pytest.skip("rate limiting is not on this branch yet (every call was answered)")
    assert counts == {"OK": limit, "RESOURCE_EXHAUSTED": 3 * limit}, counts


def test_audit_trail_is_complete_across_workers(model_dir: Path, tmp_path: Path) -> None:
    ids = [f"workers-{uuid.uuid4().hex[:12]}-{i}" for i in range(60)]
    sp = _two_workers(model_dir, tmp_path, {"CREDSCOPE_AUDIT__URL": f"sqlite:///{tmp_path / 'audit.db'}",
                                            "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "100000"})
    try:
        counts = asyncio.run(_score_on_channels(sp.target, channels=16, calls=len(ids), request_ids=ids))
    finally:
        rc = sp.stop()  # SIGTERM: each worker drains its audit queue
    assert counts == {"OK": len(ids)} and rc == 0, (counts, sp.log())
    db = tmp_path / "audit.db"
    if not db.exists():
        pytest.skip("the audit trail is not on this branch yet (no audit database)")
    con = sqlite3.connect(db)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'predictions'").fetchone():
            pytest.skip("the audit trail is not on this branch yet (no predictions table)")
        marks = ",".join("?" * len(ids))
        found = con.execute(f"SELECT count(*) FROM predictions WHERE request_id IN ({marks})", ids).fetchone()[0]
    finally:
        con.close()
    assert found == len(ids)


def _migrate_at(path: str, barrier) -> None:  # type: ignore[no-untyped-def]
    from server.db import migrate_sqlite

    barrier.wait(30)
    migrate_sqlite(Path(path))


def test_workers_opening_a_new_sqlite_database_at_once_all_succeed(tmp_path: Path) -> None:
    """Workers start together and each migrates the same new SQLite file (key store, audit): SQLite answers
    the WAL switch "database is locked" without waiting, which db.connect_sqlite must ride over."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        path = tmp_path / f"fresh-{round_}.db"
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_migrate_at, args=(str(path), barrier)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        con = sqlite3.connect(path)
        try:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            con.close()
