"""The credscope command, graceful shutdown, client retries, and generated-stub freshness."""

from __future__ import annotations

import asyncio
import csv
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from client import CredScopeClient
from credscope.v1 import scoring_pb2, scoring_pb2_grpc
from tests.helpers import ROOT, start_server
from tests.test_api import GOOD


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=60, cwd=ROOT)


def test_cli_help_lists_commands() -> None:
    out = run_cli("--help")
    assert out.returncode == 0 and "score" in out.stdout and "model-info" in out.stdout
    assert run_cli("score", "--help").returncode == 0


def test_cli_scores_json_from_stdin(server) -> None:  # type: ignore[no-untyped-def]
    out = run_cli("--target", server.target, "score", "--json", "-", stdin=json.dumps(GOOD))
    assert out.returncode == 0, out.stderr
    assert "decision" in out.stdout and "probability" in out.stdout and "request id" in out.stdout


def test_cli_scores_csv_and_reports_bad_rows(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "applicants.csv"
    cols = ["SK_ID_CURR", "AMT_INCOME_TOTAL", "AMT_CREDIT", "DAYS_BIRTH", "EXT_SOURCE_2", "NAME_CONTRACT_TYPE"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerow([100002, 202500, 406597.5, -9461, 0.26, "Cash loans"])
        w.writerow([100003, 270000, -5, -16765, 0.62, "Cash loans"])
        w.writerow([100004, 67500, 135000, -19046, "", "Revolving loans"])
    out = run_cli("--target", server.target, "score", "--csv", str(path))
    assert out.returncode == 1  # one invalid row
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 7 and "ERROR" in lines[2] and "amt_credit" in lines[2]
    assert lines[4].startswith("portfolio    2 scored:") and "approval rate" in lines[4]
    assert "2 scored, 1 rejected" in out.stderr
    # JSON, in batches of one applicant: the portfolio is the sum of the batches'
    out = run_cli("--target", server.target, "--output", "json", "score", "--csv", str(path), "--batch-size", "1")
    doc = json.loads(out.stdout)
    assert [("error" in r) for r in doc["results"]] == [False, True, False]
    portfolio = doc["portfolio"]
    decisions = [r["decision"].removeprefix("DECISION_") for r in doc["results"] if "error" not in r]
    assert portfolio["totalApplications"] == 2
    assert portfolio.get("approved", 0) == decisions.count("APPROVE")
    assert portfolio.get("review", 0) + portfolio.get("rejected", 0) == 2 - decisions.count("APPROVE")
    assert sum(portfolio["riskDistribution"].values()) == 2
    approved = [r["defaultProbability"] for r in doc["results"]
                if "error" not in r and r["decision"] == "DECISION_APPROVE"]
    assert portfolio.get("expectedDefaults", 0.0) == pytest.approx(sum(approved), rel=1e-9)


def test_cli_model_info_and_health(server) -> None:  # type: ignore[no-untyped-def]
    out = run_cli("--target", server.target, "model-info")
    assert out.returncode == 0 and "model version" in out.stdout and "roc_auc" in out.stdout
    out = run_cli("--target", server.target, "health")
    assert out.returncode == 0 and out.stdout.strip() == "SERVING"


def test_cli_bad_input_says_what_to_fix(server) -> None:  # type: ignore[no-untyped-def]
    out = run_cli("--target", server.target, "score", "--json", "-", stdin='{"name_contract_type": "Mortgage"}')
    assert out.returncode != 0 and "unknown category 'Mortgage'" in out.stderr
    out = run_cli("--target", server.target, "score", "--json", "-", stdin=json.dumps({**GOOD, "amt_credit": -1}))
    assert out.returncode == 2 and "INVALID_ARGUMENT" in out.stderr and "applicant.amt_credit" in out.stderr


def test_server_help() -> None:
    out = subprocess.run([sys.executable, "-m", "server.main", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--port" in out.stdout


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "server.main", "--port", "0", "--model-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert "credscope-train" in out.stderr or "make model" in out.stderr


def test_sigterm_finishes_calls_in_flight(model_dir: Path, tmp_path: Path) -> None:
    sp = start_server(model_dir, cwd=tmp_path, env={"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true",
                                                    "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "10000000"})
    errors: list[BaseException] = []
    done = [0]
    stop = threading.Event()

    def load() -> None:
        with CredScopeClient(sp.target, timeout=10, retries=False) as c:
            while not stop.is_set():
                try:
                    c.batch_score([GOOD] * 200)
                    done[0] += 1
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
                    return

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while done[0] < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    rc = sp.stop(signal.SIGTERM)
    stop.set()
    for t in threads:
        t.join(timeout=20)
    assert rc == 0, sp.log()
    assert done[0] >= 10
    # Calls after shutdown fail with UNAVAILABLE; none that the server accepted failed mid-way.
    for e in errors:
        assert getattr(e, "code", None) == grpc.StatusCode.UNAVAILABLE, e
    assert "stopped" in sp.log()


class _FlakyScoring(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def Score(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return scoring_pb2.ScoreResponse(request_id="ok", default_probability=0.1)


def test_client_retries_unavailable() -> None:
    """The client's retry policy rides over transient UNAVAILABLE (a real channel to a flaky test server)."""
    flaky = _FlakyScoring(failures=2)
    started = threading.Event()
    port_box: list[int] = []
    loop = asyncio.new_event_loop()

    async def run() -> None:
        server = grpc.aio.server()
        scoring_pb2_grpc.add_ScoringServiceServicer_to_server(flaky, server)
        port_box.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        started.set()
        await asyncio.to_thread(stop.wait)
        await server.stop(0)

    stop = threading.Event()
    t = threading.Thread(target=lambda: loop.run_until_complete(run()))
    t.start()
    try:
        assert started.wait(10)
        with CredScopeClient(f"127.0.0.1:{port_box[0]}", timeout=10) as c:
            assert c.score(GOOD).request_id == "ok"
        assert flaky.calls == 3
    finally:
        stop.set()
        t.join(10)
        loop.close()


def test_generated_stubs_are_fresh() -> None:
    from tools.protogen import main

    assert main(["--check"]) == 0, "run `make proto` and commit the stubs"
