"""The bench harness (``credscope-bench``): its load generator against a real echo server, its request
pools, its key parsing, and one short end-to-end run (bounded: a few hundred calls)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from credscope.v1 import scoring_pb2
from server.cached_scoring import matrix_digests
from tests.helpers import ROOT
from tools.bench import (
    Applicants,
    base_env,
    batch_requests,
    parse_key,
    score_requests,
    settle,
    start_process,
    tree_cpu,
)
from tools.bench_load import LoadSpec, run_load
from tools.bench_peers import ECHO_METHOD


def test_bench_help() -> None:
    out = subprocess.run([sys.executable, "-m", "tools.bench", "--help"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0 and "MLServer" in out.stdout and "--concurrency" in out.stdout
    peers = subprocess.run([sys.executable, "-m", "tools.bench_peers", "--help"], capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
    assert peers.returncode == 0 and "echo" in peers.stdout


def test_the_peer_can_unpickle_the_pipeline_without_our_serving_stack() -> None:
    """MLServer's virtualenv has scikit-learn and LightGBM, not onnxruntime: unpickling the pipeline imports
    ``tools.train`` (its custom transformer), which must not import onnxruntime (or grpc) at module level."""
    code = ("import sys\n"
            "for name in ('onnxruntime', 'grpc', 'numba'):\n"
            "    sys.modules[name] = None  # importing it raises ImportError\n"
            "import tools.train\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_parse_key_reads_the_key_tools_print() -> None:
    key = "csk_" + "a1B2" * 10
    assert parse_key(key + "\n") == key
    assert parse_key(json.dumps({"key_id": "k1", "key": key})) == key
    assert parse_key(f"created\nkey: {key}\n") == key
    assert parse_key("no key here") is None


def test_applicants_are_valid_and_never_repeat() -> None:
    pool = Applicants(base=50)
    taken = pool.take(400)  # 8 rounds over the base pool
    payloads = score_requests(taken)
    assert len(set(payloads)) == 400
    more = score_requests(pool.take(100))
    assert not set(more) & set(payloads)
    from server.convert import applicant_to_row

    assert all(not applicant_to_row(a)[1] for a in taken)
    # distinct as the model and the prediction cache see them (float32 rows), not only on the wire
    rows = np.asarray([applicant_to_row(a)[0] for a in taken], dtype=np.float32)
    assert len(set(matrix_digests(rows))) == 400
    batches = batch_requests(taken, 100)
    assert len(batches) == 4 and len(scoring_pb2.BatchScoreRequest.FromString(batches[0]).applicants) == 100


def test_load_generator_is_bounded_by_count_and_by_time(tmp_path: Path) -> None:
    server = start_process([sys.executable, "-m", "tools.bench_peers", "echo", "--port", "0", "--workers", "2"],
                           base_env(), tmp_path, tmp_path / "echo.log", timeout=60)
    try:
        payloads = [f"request {i}".encode() for i in range(300)]
        started: list[float] = []
        res = run_load(LoadSpec(target=server.target, method=ECHO_METHOD, payloads=payloads, unique=True,
                                concurrency=4, processes=2, duration=30, warmup=0.1),
                       on_start=lambda: started.append(tree_cpu(server.proc.pid)))
        assert res.requests == 300 and res.errors == 0  # every unique payload once, then it stops
        assert 0 < res.p50 <= res.p90 <= res.p99 <= res.max and res.rps > 0
        assert started and tree_cpu(server.proc.pid) >= started[0]
        timed = run_load(LoadSpec(target=server.target, method=ECHO_METHOD, payloads=payloads[:10], concurrency=2,
                                  processes=1, duration=0.5, warmup=0, max_requests=10**9))
        assert timed.requests > 10 and timed.seconds < 3  # cycles the payloads, stops on time
        failing = run_load(LoadSpec(target=server.target, method="/credscope.bench.EchoService/Nope",
                                    payloads=payloads[:5], unique=True, concurrency=1, processes=1, duration=5,
                                    warmup=0))
        assert failing.requests == 0 and failing.error_codes == {"UNIMPLEMENTED": 5}
    finally:
        assert server.stop() == 0


def test_open_loop_load_keeps_its_rate_and_bounds(tmp_path: Path) -> None:
    """An open-loop run sends at the offered rate (Poisson arrivals), whatever the server does, and stops on
    time or when its payloads run out."""
    server = start_process([sys.executable, "-m", "tools.bench_peers", "echo", "--port", "0", "--workers", "1"],
                           base_env(), tmp_path, tmp_path / "echo.log", timeout=60)
    try:
        payloads = [f"request {i}".encode() for i in range(2000)]
        res = run_load(LoadSpec(target=server.target, method=ECHO_METHOD, payloads=payloads, rate=200,
                                concurrency=16, processes=2, duration=2, warmup=0.1))
        assert res.errors == 0 and res.rate == 200
        assert 200 <= res.requests <= 600 and 140 <= res.rps <= 260  # ~400 calls over 2 s (Poisson)
        assert 0 < res.p50 <= res.p99 <= res.max
        few = run_load(LoadSpec(target=server.target, method=ECHO_METHOD, payloads=payloads[:50], unique=True,
                                rate=1000, concurrency=16, processes=1, duration=30, warmup=0))
        assert few.requests == 50 and few.seconds < 5  # every unique payload once, then it stops
        # A server behind the offered rate (one call in flight at a time, 20,000 calls/s offered): the run
        # still ends on time, the backlog counts in the latency, and what was due but not sent is counted.
        started = time.monotonic()
        behind = run_load(LoadSpec(target=server.target, method=ECHO_METHOD, payloads=payloads, rate=20_000,
                                   concurrency=1, processes=1, duration=1, warmup=0))
        assert time.monotonic() - started < 15 and behind.seconds < 1.5
        assert behind.error_codes.get("NOT_SENT", 0) > 5_000 and behind.requests > 0
        assert behind.p50 > 50  # ms: waiting for the one slot is part of the latency (an idle echo answers in ~1)
        failing = run_load(LoadSpec(target=server.target, method="/credscope.bench.EchoService/Nope",
                                    payloads=payloads, rate=100, concurrency=4, processes=1, duration=0.5, warmup=0))
        assert failing.requests == 0 and failing.error_codes.get("UNIMPLEMENTED", 0) > 10
        with pytest.raises(ValueError, match="rate"):
            run_load(LoadSpec(target=server.target, method=ECHO_METHOD, payloads=payloads, rate=-5))
    finally:
        assert server.stop() == 0


def test_a_short_bench_run_end_to_end(model_dir: Path, tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--model-dir", str(model_dir), "--configs", "embedded,audit-off",
         "--scenarios", "score-moderate,score-miss,score-hit,batch-100", "--concurrency", "2", "--batch-concurrency", "1",
         "--moderate", "2", "--duration", "0.5", "--warmup", "0.1", "--requests", "200", "--batch-applicants", "500",
         "--no-mlserver", "--workers", "2", "--processes", "1", "--rounds", "2", "--out", str(out_json)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env={**base_env(), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out_json.read_text())
    rows = {(r["system"], r["scenario"]): r for r in report["rows"] if r["config"] != "audit-off"}
    miss = rows[("credscope", "score-miss")]
    assert miss["status"] == "ok" and miss["requests"] > 0 and miss["errors"] == 0 and miss["server_cpu_us"] > 0
    assert rows[("credscope", "batch-100")]["requests"] > 0
    echo = rows[("echo", "score-miss")]
    assert echo["status"] == "ok" and len(echo["rounds"]) == 2 and "interleaved" in echo["note"]
    assert len(miss["rounds"]) == 2  # CredScope and echo measured turn by turn
    # the audit-off server ran beside the embedded one, measured in the same rounds, Score only
    off = [r for r in report["rows"] if r["config"] == "audit-off"]
    assert [(r["scenario"], r["status"], len(r["rounds"])) for r in off] == [("score-miss", "ok", 2)]
    assert off[0]["errors"] == 0 and "interleaved" in off[0]["note"]
    audit = next(t for t in report["targets"] if t["target"].startswith("audit on vs off"))
    assert audit["measured"] is not None
    assert any("credscope [embedded] audit trail:" in n for n in report["notes"])
    hit = rows[("credscope", "score-hit")]
    assert hit["status"] == "ok" or hit["status"].startswith("skipped: feature not available")
    assert report["ratios"]["score_vs_echo"] > 0
    # moderate load: after score-miss (whatever the order given), open loop at half its throughput, beside echo
    moderate = rows[("credscope", "score-moderate")]
    assert moderate["status"] == "ok" and moderate["requests"] > 0 and len(moderate["rounds"]) == 2
    # (on a busy test host the server may fall behind half its best rate: calls not sent are counted, no others)
    assert set(moderate["error_codes"]) <= {"NOT_SENT"}
    assert moderate["rate"] == pytest.approx(miss["rps"] / 2) and "open loop" in moderate["note"]
    assert rows[("echo", "score-moderate")]["rate"] == moderate["rate"]
    p99 = next(t for t in report["targets"] if t["target"].startswith("Score p99 <= 5 ms at moderate load"))
    assert "open loop" in p99["target"] and p99["measured"] == moderate["p99"]
    assert {t["target"] for t in report["targets"]} >= {"Score throughput >= 50% of the echo floor"}
    assert "req/s" in out.stdout and "Score throughput" in out.stdout
    assert out_json.with_suffix(".png").stat().st_size > 10_000


def test_audit_off_is_measured_beside_embedded_in_any_order_and_without_references(model_dir: Path,
                                                                                    tmp_path: Path) -> None:
    """Listed before embedded, and with no reference server to interleave with, audit-off is still measured
    in the embedded server's rounds, once per level; the audit cost is the median over the levels."""
    out_json = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--model-dir", str(model_dir), "--configs", "audit-off,embedded",
         "--scenarios", "score-miss", "--concurrency", "1,2", "--moderate", "2", "--duration", "0.3",
         "--warmup", "0.1", "--requests", "100", "--no-echo", "--no-mlserver", "--workers", "1", "--processes", "1",
         "--rounds", "2", "--out", str(out_json)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env={**base_env(), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out_json.read_text())
    rows = [(r["config"], r["concurrency"], r["status"], len(r.get("rounds", []))) for r in report["rows"]]
    assert sorted(rows) == [("audit-off", 1, "ok", 2), ("audit-off", 2, "ok", 2),
                            ("embedded", 1, "ok", 2), ("embedded", 2, "ok", 2)], rows
    assert report["ratios"]["audit_cost"] is not None and report["ratios"]["cpu_audit_cost"] is not None


def test_in_process_handler_bench_runs(model_dir: Path) -> None:
    """`python -m tools.bench_handler` (the README's in-process figures) has --help and runs a short round,
    also with parts switched off."""
    out = subprocess.run([sys.executable, "-m", "tools.bench_handler", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--without" in out.stdout
    out = subprocess.run([sys.executable, "-m", "tools.bench_handler", "--model-dir", str(model_dir), "--calls", "30",
                          "--rounds", "1", "--without", "audit", "--without", "reasons"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "without: audit, reasons" in out.stdout and "µs of CPU per Score" in out.stdout


def test_audit_cost_bench_counts_the_server_cpu_and_every_row(model_dir: Path, tmp_path: Path) -> None:
    """credscope-bench-audit over a short run: CPU per call is read from the server's workers (it read the
    idle parent, 0 µs, and divided by zero), and every answered call has its audit row."""
    out = subprocess.run([sys.executable, "-m", "tools.bench_audit", "--model-dir", str(model_dir), "--seconds", "0.5",
                          "--warmup", "0.2", "--rounds", "1", "--concurrency", "4", "--plot", str(tmp_path / "a.png")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    cpu = [int(m) for m in re.findall(r"server CPU\s+(\d+) µs/call", out.stdout)]
    assert len(cpu) == 2 and min(cpu) > 0, out.stdout
    assert " 0 answered call(s) without an audit row" in out.stdout
    assert (tmp_path / "a.png").stat().st_size > 0


def test_profile_harness_runs_and_reads_py_spy_records(model_dir: Path, tmp_path: Path) -> None:
    """`python -m tools.bench_profile` (the README's A/B and where-the-time-goes runs): --help, a short
    bounded round with the server's CPU per call, and the summary of a py-spy raw record."""
    from tools.bench_profile import summarize

    out = subprocess.run([sys.executable, "-m", "tools.bench_profile", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--py-spy" in out.stdout
    out = subprocess.run([sys.executable, "-m", "tools.bench_profile", "--model-dir", str(model_dir), "--rounds", "1",
                          "--seconds", "0.5", "--warmup", "0.2", "--rate", "200", "--requests", "400",
                          "--env", "CREDSCOPE_CACHE__ENABLED=false"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "open loop at 200/s" in out.stdout, out.stdout
    cpu = re.findall(r"round 1: +\d+ calls/s .* server CPU +(\d+) µs/call \(python (\d+)", out.stdout)
    assert cpu and int(cpu[0][0]) >= int(cpu[0][1]) > 0, out.stdout  # the whole server, then its main thread
    bad = subprocess.run([sys.executable, "-m", "tools.bench_profile", "--env", "AUDIT=off"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "CREDSCOPE_<SETTING>=<value>" in bad.stderr
    raw = tmp_path / "raw.txt"
    raw.write_text("thread (1): MainThread;main (a.py:1);serve (a.py:5);score (b.py:3) 30\n"
                   "thread (1): MainThread;main (a.py:1);serve (a.py:6) 10\n"
                   "thread (2): Thread-1;poll (c.py:2) 99\n")
    assert summarize(raw) == [(75.0, "score (b.py)")]  # main and serve are on every sample: left out


def test_settle_waits_for_a_busy_server_to_go_idle_and_counts_its_cpu() -> None:
    """Between runs the bench waits for the server's work left behind (bounded) and counts its CPU."""
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 1.0\n"
                             "while time.monotonic() < end: pass\ntime.sleep(30)"])
    try:
        time.sleep(0.1)
        started = time.monotonic()
        used = settle(busy.pid)
        waited = time.monotonic() - started
        assert busy.poll() is None  # still there, idle
        assert 0.25 <= used <= 1.5 and 0.6 <= waited < 5, (used, waited)  # (less than a core on a busy host)
        started = time.monotonic()
        assert settle(busy.pid) < 0.05 and time.monotonic() - started < 1.5  # idle: one window
        started = time.monotonic()
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            settle(spin.pid, limit=1.0)  # never idle: the bound ends the wait
            assert time.monotonic() - started < 3
        finally:
            spin.kill()
            spin.wait()
    finally:
        busy.kill()
        busy.wait()
