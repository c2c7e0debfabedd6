"""Decision replay (``AdminService.ReplayDecision``): recompute a past decision from its audited input with
the model version that made it, and say whether probability, decision and reasons are identical.

The audited input is the encoded row the model saw (JSON numbers that read back to the same doubles, then
float32 as at scoring time); the probability is stored as a double (SQLite REAL / PostgreSQL DOUBLE
PRECISION), so "identical" is bit-equality of the probability, the same decision and the same reason codes
in the same order. The version is loaded from the local model store (``model.model_dir``), verified
against its hash as at serving time; loaded versions other than the active one are kept in a small LRU.

An unknown request id is NOT_FOUND (after this worker's audit queue is flushed and other workers are given
one flush period, as for ReportOutcome); a version no longer in the store is FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, cast

from credscope.v1 import admin_pb2
from server.audit.store import AuditedPrediction, AuditStoreError
from server.audit.writer import AuditWriter
from server.convert import DECISION, rows_to_matrix
from server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, Violation
from server.explain import ExplainError
from server.model import ModelError, ModelNotFoundError, load_model
from server.reasons import catalogue_of, is_adverse
from server.runtime import Runtime
from server.scoring import Scorer
from server.services.audit import MAX_REQUEST_ID, NOT_FOUND_RETRIES, _flush, _unavailable, _writer

log = logging.getLogger("credscope.replay")

#: Model versions (besides the active one) kept loaded for replays.
CACHED_VERSIONS = 4


class Replayer:
    def __init__(self, runtime: Runtime, max_versions: int = CACHED_VERSIONS) -> None:
        self.runtime = runtime
        self.max_versions = max_versions
        self._scorers: OrderedDict[str, Scorer] = OrderedDict()
        self._loading = asyncio.Lock()

    async def scorer(self, version: str) -> Scorer:
        """The scorer of ``version``: the serving one if it is active, else loaded from the store (LRU)."""
        active = self.runtime.scorer
        if active.version == version:
            return active
        async with self._loading:
            found = self._scorers.get(version)
            if found is None:
                settings = self.runtime.settings.model
                try:
                    model = await asyncio.to_thread(load_model, settings.model_dir, version,
                                                    intra_op_threads=settings.intra_op_threads)
                except ModelNotFoundError as e:
                    raise FailedPrecondition(f"model version {version} that made this decision is no longer in "
                                             "the model store; restore it to replay the decision") from e
                except ModelError as e:
                    raise FailedPrecondition(f"model version {version} cannot be loaded: {e}") from e
                found = await asyncio.to_thread(Scorer, model)
                self._scorers[version] = found
                while len(self._scorers) > self.max_versions:
                    self._scorers.popitem(last=False)
            self._scorers.move_to_end(version)
            return found

    async def replay(self, writer: AuditWriter | None, request: admin_pb2.ReplayDecisionRequest
                     ) -> admin_pb2.ReplayDecisionResponse:
        writer = _writer(writer)
        rid = request.request_id
        if not rid or len(rid) > MAX_REQUEST_ID:
            raise InvalidArgument("request_id is invalid", [Violation(
                "request_id", f"is required (at most {MAX_REQUEST_ID} characters): the request id returned by "
                              "Score, or '<batch request id>/<index>' for a BatchScore applicant")])
        recorded = await self._find(writer, rid)
        scorer = await self.scorer(recorded.model_version)
        probability, decision, codes = await asyncio.to_thread(recompute, scorer, recorded)
        identical = (probability == recorded.probability and decision == recorded.decision
                     and (codes or []) == (recorded.reason_codes or []))
        if not identical:
            log.warning("replay of %s with model %s differs from the record", rid, recorded.model_version)
        return admin_pb2.ReplayDecisionResponse(
            request_id=rid, model_version=recorded.model_version, recorded_probability=recorded.probability,
            replayed_probability=probability, recorded_decision=cast(Any, DECISION[recorded.decision]),
            replayed_decision=cast(Any, DECISION[decision]), recorded_reason_codes=recorded.reason_codes or [],
            replayed_reason_codes=codes or [], identical=identical)

    async def _find(self, writer: AuditWriter, rid: str) -> AuditedPrediction:
        await _flush(writer)
        if writer.spooling:
            raise Unavailable("the audit database is catching up after an outage; retry shortly")
        for attempt in range(NOT_FOUND_RETRIES + 1):
            try:
                found = await writer.store.prediction(rid)
            except AuditStoreError as e:
                raise _unavailable(e) from e
            if found is not None:
                return found
            if attempt < NOT_FOUND_RETRIES:  # it may still be queued in another worker
                await asyncio.sleep(writer.settings.flush_seconds)
        raise NotFound(f"no prediction with request id {rid!r} in the audit trail", metadata={"request_id": rid})


def recompute(scorer: Scorer, recorded: AuditedPrediction) -> tuple[float, str, list[str] | None]:
    """(probability, decision, reason codes) of the recorded input under ``scorer`` (CPU-bound: call it
    from a thread). Not counted as a prediction. Codes are ``[]`` for an approval, None when an adverse
    decision cannot be explained."""
    m = rows_to_matrix([recorded.row])
    probability = float(scorer.model.predict_proba(m)[0])
    decision, _, _ = scorer.policy.decide(probability)
    if not is_adverse(decision):
        return probability, decision, []
    try:
        explanation = scorer.explain(m)[0]
    except ExplainError:
        return probability, decision, None
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    return probability, decision, [r.code for r in catalogue.reasons_for(explanation)]
