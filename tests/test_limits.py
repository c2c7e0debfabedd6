"""Limits are settings (message size, batch size, concurrent streams) and deadlines are honoured: a call
whose deadline passes before scoring is answered DEADLINE_EXCEEDED and the model never runs for it."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from client import CredScopeClient, CredScopeRpcError
from credscope.v1 import applicant_pb2, scoring_pb2, scoring_pb2_grpc
from server import deadline
from server.errors import DeadlineExceeded
from tests.helpers import ServerProcess, start_server
from tests.test_api import applicant
from tests.test_bruteforce import metric

ANONYMOUS = {"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true", "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "100000000"}
BIG_BATCH = 100_000  # ~9.4 MB on the wire; validating it takes the server ~1-2 s of CPU (slow_applicant)


def slow_applicant() -> applicant_pb2.Applicant:
    """A valid applicant the server's wire decoder hands to ``applicant_to_row`` (it carries a known field in
    another wire type, which protobuf keeps as an unknown field): ~10-20 µs each to validate, so a batch of
    them keeps the server validating long enough for a short deadline to pass before scoring."""
    number = applicant_pb2.Applicant.DESCRIPTOR.fields_by_name["amt_credit"].number
    return applicant_pb2.Applicant.FromString(applicant().SerializeToString() + bytes([number << 3 | 0, 5]))


@pytest.fixture(scope="module")
def small_limits(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    sp = start_server(model_dir, cwd=tmp_path_factory.mktemp("limits"), env={
        **ANONYMOUS, "CREDSCOPE_SERVER__MAX_MESSAGE_BYTES": "4096", "CREDSCOPE_SERVER__MAX_BATCH_SIZE": "10",
        "CREDSCOPE_SERVER__MAX_CONCURRENT_STREAMS": "1"})
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def big_batches(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("deadline")
    sp = start_server(model_dir, cwd=work, env={
        **ANONYMOUS, "CREDSCOPE_SERVER__MAX_BATCH_SIZE": str(BIG_BATCH), "CREDSCOPE_CACHE__ENABLED": "false",
        "CREDSCOPE_TELEMETRY__METRICS_DIR": str(work / "metrics")})
    yield sp, work / "metrics"
    sp.stop()


def test_message_size_limit_is_a_setting(small_limits: ServerProcess) -> None:
    with CredScopeClient(small_limits.target, retries=False) as c:
        big = scoring_pb2.ScoreRequest(applicant=applicant(), request_id="x" * 5000)
        with pytest.raises(CredScopeRpcError) as e:
            c.call(c.scoring.Score, big)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4096" in e.value.message  # grpc names the limit
        assert c.score(applicant()).default_probability > 0  # still serving


def test_batch_size_limit_is_a_setting(small_limits: ServerProcess) -> None:
    with CredScopeClient(small_limits.target) as c:
        assert len(c.batch_score([applicant()] * 10).results) == 10
        with pytest.raises(CredScopeRpcError) as e:
            c.batch_score([applicant()] * 11)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 10 applicants" in e.value.field_violations[0].description


def test_calls_over_the_stream_limit_wait_their_turn(small_limits: ServerProcess) -> None:
    """One stream per connection: 16 concurrent calls on one channel are queued by HTTP/2, all answered."""
    with CredScopeClient(small_limits.target) as c, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: c.score(applicant(amt_income_total=100000 + i)), range(16)))
    assert len({r.request_id for r in results}) == 16


def test_a_call_past_its_deadline_is_not_scored(big_batches) -> None:  # type: ignore[no-untyped-def]
    sp, metrics_dir = big_batches
    request = scoring_pb2.BatchScoreRequest(applicants=[slow_applicant()] * BIG_BATCH)
    with grpc.insecure_channel(sp.target, options=[("grpc.max_send_message_length", 32 << 20)]) as ch:
        stub = scoring_pb2_grpc.ScoringServiceStub(ch)
        # Deadlines that pass while the server validates the batch (each far shorter than that takes): the
        # model must not run. A deadline can also pass before the handler starts (grpc then drops the call
        # itself, on a busy machine), so longer ones follow until the server's own check has fired.
        for timeout in (0.5, 1.0):
            with pytest.raises(grpc.RpcError) as e:
                stub.BatchScore(request, timeout=timeout)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline_at = time.monotonic() + 30  # the server goes on validating after the client gave up
            while metric(metrics_dir, "credscope_deadline_expired", stage="scoring") < 1 and \
                    time.monotonic() < deadline_at and metric(metrics_dir, "credscope_inference_rows") == 0:
                time.sleep(0.1)
            if metric(metrics_dir, "credscope_deadline_expired", stage="scoring") >= 1:
                break
        assert metric(metrics_dir, "credscope_deadline_expired", stage="scoring") == 1, \
            "the server never reached its deadline check"
    with CredScopeClient(sp.target, retries=False) as c:  # a small batch afterwards is scored: the only rows
        assert len(c.batch_score([applicant()] * 7).results) == 7
    deadline_at = time.monotonic() + 10
    while (rows := metric(metrics_dir, "credscope_inference_rows")) < 7 and time.monotonic() < deadline_at:
        time.sleep(0.1)
    assert rows == 7, f"{rows} rows ran through the model: the expired batch was scored"
    assert metric(metrics_dir, "credscope_deadline_expired", stage="scoring") == 1
    # The audit trail agrees: predictions of the small batch only; the expired call is recorded as such.
    sp.stop()  # drains the audit queue
    with sqlite3.connect(sp.cwd / "credscope.db") as db:
        assert db.execute("SELECT count(*) FROM predictions").fetchone()[0] == 7
        statuses = dict(db.execute("SELECT status_code, count(*) FROM api_usage GROUP BY status_code").fetchall())
    assert statuses.get("DEADLINE_EXCEEDED", 0) >= 1 and statuses.get("OK") == 1, statuses


def test_a_call_without_deadline_is_scored(small_limits: ServerProcess) -> None:
    with grpc.insecure_channel(small_limits.target) as ch:
        stub = scoring_pb2_grpc.ScoringServiceStub(ch)
        assert stub.Score(scoring_pb2.ScoreRequest(applicant=applicant())).default_probability > 0


class FakeContext:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def test_deadline_check_rules() -> None:
    deadline.check(FakeContext(None), "scoring")  # type: ignore[arg-type]  # no deadline: nothing to check
    deadline.check(FakeContext(0.5), "explanation")  # type: ignore[arg-type]
    with pytest.raises(DeadlineExceeded) as e:
        deadline.check(FakeContext(0.0), "explanation")  # type: ignore[arg-type]
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "nothing was explained" in e.value.message
