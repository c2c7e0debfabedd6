"""The audit interceptor in a real grpc.aio server (in this process, port 0) with the real ScoringService:
it records every call — success, an error raised by an inner layer, an abort by an inner interceptor,
an unexpected exception (without its internals) — with the principal the inner layers set; and in
``sync`` durability a call that cannot be recorded answers UNAVAILABLE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from client.applicants import applicant_from_mapping
from credscope.v1 import scoring_pb2, scoring_pb2_grpc
from server import context as rc
from server.audit.writer import AuditWriter
from server.errors import PermissionDenied, Unauthenticated, abort
from server.interceptors.audit import AuditInterceptor
from server.interceptors.base import AroundInterceptor, Behavior
from server.interceptors.request_id import RequestIdInterceptor
from server.runtime import Runtime
from server.services.scoring import ScoringService
from server.settings import AuditSettings, Settings
from tests.audit_helpers import eventually, fetch
from tests.test_api import GOOD


class Gate(AroundInterceptor):
    """Stands where auth and rate limiting go: sets the principal, or fails the call as told."""

    async def around(self, method: str, behavior: Behavior, request: Any, context: grpc.aio.ServicerContext) -> Any:
        md = dict(context.invocation_metadata() or ())
        ctx = rc.current()
        assert ctx is not None
        if md.get("x-test-key"):
            ctx.principal = rc.Principal(key_id=md["x-test-key"], name="acme", tier="pro")
        gate = md.get("x-test-gate")
        if gate == "abort":
            await abort(context, PermissionDenied("the admin role is required"))
        if gate == "raise":
            raise Unauthenticated("missing API key")
        if gate == "boom":
            raise RuntimeError("secret internals: password=hunter2")
        return await behavior(request, context)


async def serve(model_dir: Path, audit: AuditSettings) -> tuple[grpc.aio.Server, int, AuditWriter]:
    settings = Settings(audit=audit)
    settings.model.model_dir = model_dir
    runtime = Runtime(settings)
    runtime.load()
    writer = AuditWriter(audit)
    await writer.start()
    server = grpc.aio.server(interceptors=[RequestIdInterceptor(), AuditInterceptor(writer), Gate()])
    scoring_pb2_grpc.add_ScoringServiceServicer_to_server(ScoringService(runtime, settings, audit=writer), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, writer


@pytest.fixture()
async def chain(model_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[scoring_pb2_grpc.ScoringServiceStub, str]]:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    server, port, writer = await serve(model_dir, AuditSettings(url=url, spool_dir=tmp_path / "spool",
                                                                flush_seconds=0.02))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield scoring_pb2_grpc.ScoringServiceStub(channel), url
    await channel.close()
    await server.stop(None)
    await writer.close()


async def call(stub: scoring_pb2_grpc.ScoringServiceStub, request_id: str, **md: str) -> grpc.StatusCode:
    metadata = [("x-request-id", request_id), *((k.replace("_", "-"), v) for k, v in md.items())]
    try:
        await stub.Score(scoring_pb2.ScoreRequest(applicant=applicant_from_mapping(GOOD)), metadata=metadata,
                         timeout=10)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_every_outcome_of_a_call_is_recorded(chain: tuple[Any, str]) -> None:
    stub, url = chain
    assert await call(stub, "ok-1", x_test_key="key-7") == grpc.StatusCode.OK
    assert await call(stub, "abort-1", x_test_gate="abort") == grpc.StatusCode.PERMISSION_DENIED
    assert await call(stub, "raise-1", x_test_gate="raise") == grpc.StatusCode.UNAUTHENTICATED
    assert await call(stub, "boom-1", x_test_gate="boom") == grpc.StatusCode.INTERNAL
    await stub.BatchScore(scoring_pb2.BatchScoreRequest(request_id="batch-1", applicants=[
        applicant_from_mapping(GOOD), applicant_from_mapping({**GOOD, "amt_credit": -1}),
        applicant_from_mapping(GOOD)]), timeout=10)
    # ReportOutcome right after Score finds the prediction still in the queue (the RPC flushes it first)
    r = await stub.ReportOutcome(scoring_pb2.ReportOutcomeRequest(request_id="ok-1",
                                                                  outcome=scoring_pb2.OUTCOME_REPAID), timeout=10)
    assert r.recorded

    usage = {r[0]: r[1:] for r in await fetch(url, "SELECT request_id, status_code, error, key_id, tier, method "
                                                   "FROM api_usage")}
    assert usage["ok-1"] == ("OK", None, "key-7", "pro", "/credscope.v1.ScoringService/Score")
    assert usage["abort-1"][:2] == ("PERMISSION_DENIED", "the admin role is required")
    assert usage["raise-1"][:2] == ("UNAUTHENTICATED", "missing API key")
    assert usage["boom-1"][0] == "INTERNAL" and "boom-1" in usage["boom-1"][1]
    assert "hunter2" not in usage["boom-1"][1] and "secret" not in usage["boom-1"][1]
    assert usage["batch-1"][0] == "OK"
    preds = {r[0]: r[1:] for r in await fetch(url, "SELECT request_id, key_id, client_name, from_cache "
                                                   "FROM predictions")}
    assert set(preds) == {"ok-1", "batch-1/0", "batch-1/2"}  # failed calls and the invalid applicant: none
    assert preds["ok-1"] == ("key-7", "acme", 0)


async def test_sync_call_that_cannot_be_recorded_answers_unavailable(model_dir: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("where directories should be")
    audit = AuditSettings(url=f"sqlite:///{blocked / 'audit.db'}", spool_dir=blocked / "spool", durability="sync",
                          sync_timeout_seconds=0.5, retry_seconds=0.1)
    server, port, writer = await serve(model_dir, audit)
    try:
        assert not writer.healthy()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            assert await call(stub, "sync-1") == grpc.StatusCode.UNAVAILABLE
            assert await call(stub, "sync-2", x_test_gate="raise") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(None)
        await writer.close(within=1)


async def test_a_batch_leaves_the_records_its_response_shows(chain: tuple[Any, str]) -> None:
    """BatchScore hands its records over by column (``PredictionBatch``, expanded where the rows are shaped):
    each valid applicant's row says what its result says — input, probability, decision, risk level,
    confidence, reason codes and the explanation's contributions in rank order — under ``<call>/<position>``."""
    import json
    import math

    from server.convert import applicant_to_row
    from server.schema import COLUMNS

    people = [applicant_from_mapping({**GOOD, "amt_income_total": 50_000 + 7_919 * i, "ext_source_2": 0.05 + 0.3 * i})
              for i in range(3)]
    people.insert(1, applicant_from_mapping({**GOOD, "amt_credit": -1}))
    request = scoring_pb2.BatchScoreRequest(request_id="batch-cols", applicants=people)
    request.explain.enabled, request.explain.top_k = True, 3
    stub, url = chain
    response = await stub.BatchScore(request, timeout=10)
    sql = ("SELECT request_id, input, probability, decision, risk_level, confidence, model_version, from_cache, "
           "reason_codes FROM predictions WHERE request_id LIKE 'batch-cols/%'")
    rows = {r[0]: r[1:] for r in await eventually(lambda: fetch(url, sql))}  # (written behind the call)
    shap = await fetch(url, "SELECT request_id, rank, feature, shap_value FROM shap_explanations "
                            "WHERE request_id LIKE 'batch-cols/%' ORDER BY request_id, rank")
    assert set(rows) == {"batch-cols/0", "batch-cols/2", "batch-cols/3"}
    for i in (0, 2, 3):
        p = response.results[i].prediction
        doc, prob, decision, risk, conf, version, from_cache, codes = rows[f"batch-cols/{i}"]
        expected = applicant_to_row(people[i])[0]
        got = json.loads(doc)
        assert [got[c.name] for c in COLUMNS] == [None if math.isnan(v) else v for v in expected]
        assert (prob, conf, version, bool(from_cache)) == (p.default_probability, p.confidence, p.model_version, False)
        assert f"DECISION_{decision}" == scoring_pb2.Decision.Name(p.decision)
        assert f"RISK_LEVEL_{risk}" == scoring_pb2.RiskLevel.Name(p.risk_level)
        assert (json.loads(codes) if codes else []) == [r.code for r in p.reasons]
        assert [(rank, f, s) for rid, rank, f, s in shap if rid == f"batch-cols/{i}"] == [
            (k, c.feature, c.shap_value) for k, c in enumerate(p.explanation.contributions, start=1)]


def test_every_batch_a_call_leaves_is_recorded() -> None:
    """A call leaves one PredictionBatch (BatchScore); should one leave two, the entry keeps both."""
    import numpy as np

    from server.audit.records import PredictionBatch, audit_batch
    from server.interceptors.audit import _entry

    def batch(rid: str) -> PredictionBatch:
        return PredictionBatch(rid, [0, 1], np.zeros((2, 3)), [0.1, 0.2], ["APPROVE"] * 2, ["LOW"] * 2,
                               [0.9, 0.8], "v", 1.0, [False, True], [[], []])

    token = rc._current.set(None)  # noqa: SLF001
    try:
        rc.begin("call-1", "/credscope.v1.ScoringService/BatchScore")
        audit_batch(batch("a"))
        audit_batch(batch("b"))
        entry = _entry("/credscope.v1.ScoringService/BatchScore", 0.0, 1.0, "OK", None)
    finally:
        rc._current.reset(token)  # noqa: SLF001
    assert entry.weight == 5
    assert [p.request_id for p in entry.expand()] == ["a/0", "a/1", "b/0", "b/1"]
    assert [p.from_cache for p in entry.predictions] == [False, True, False, True]
