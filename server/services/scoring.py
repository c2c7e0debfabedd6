"""ScoringService: Score, BatchScore, GetModelInfo, ReportOutcome."""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import numpy as np

from credscope.v1 import scoring_pb2, scoring_pb2_grpc
from server import context as rc
from server import deadline, input_signals, metrics, tracing
from server.audit.records import PredictionBatch, audit_batch, audit_prediction
from server.audit.writer import AuditWriter
from server.cached_scoring import Caches, explain_rows, reason_rows, score_rows
from server.challenger import Challenger
from server.convert import (
    DECISION,
    RISK_LEVEL,
    applicant_to_row,
    explain_top_k,
    fill_explanation,
    fill_prediction,
    rows_to_matrix,
    timestamp,
)
from server.errors import FailedPrecondition, InvalidArgument, Violation
from server.explain import ExplainError, Explanation
from server.interceptors.request_id import REQUEST_ID_HELP, valid_request_id
from server.model import list_versions, read_metadata
from server.portfolio_convert import (
    default_loan_parameters,
    fill_portfolio,
    loan_parameters_from_proto,
    portfolio_of,
)
from server.reasons import adverse_codes, adverse_reasons, is_adverse, needs_explanation
from server.runtime import Runtime
from server.scoring import EncodedRows, Scorer, ScoreResult
from server.services.audit import explanation_of, report_outcome
from server.settings import Settings
from server.wire import decode_applicants, encode_results

T = TypeVar("T")

#: Explanation work for at least twice this many rows is split over the explain threads.
_SPLIT_ROWS = 16


def _request_id(given: str, field: str = "request_id") -> str:
    """The caller's request id from the message, else the call's (metadata or new)."""
    if given:
        if not valid_request_id(given):
            raise InvalidArgument(f"{field} is not a valid request id", [Violation(field, REQUEST_ID_HELP)])
        ctx = rc.current()
        if ctx is not None:
            ctx.request_id = given
            ctx.response_metadata["x-request-id"] = given
        return given
    ctx = rc.current()
    return ctx.request_id if ctx else rc.new_request_id()


def _fill_error(result: scoring_pb2.BatchScoreResult, violations: list[Violation]) -> None:
    """An applicant refused as invalid: INVALID_ARGUMENT and its violations."""
    err = result.error
    err.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    err.message = f"applicant {result.index} has {len(violations)} invalid field(s)"
    for v in violations:
        err.field_violations.add(field=v.field, description=v.description)


def _error_result(i: int, violations: list[Violation]) -> bytes:
    """The serialized ``results`` entry of an applicant refused as invalid."""
    one = scoring_pb2.BatchScoreResponse()
    _fill_error(one.results.add(index=i), violations)
    return one.SerializeToString()


def _results_bytes(n: int, positions: list[int], pairs: list[tuple[ScoreResult, bool]],
                   bad: list[tuple[int, list[Violation]]], request_id: str, version: str) -> bytes:
    """A BatchScore's ``results``, serialized in request order: each scored applicant's prediction (request
    id ``{request_id}/{i}``) encoded by :func:`server.wire.encode_results`, each refused one's error."""
    if len(pairs) != len(positions):
        raise ValueError(f"{len(pairs)} results for {len(positions)} scored applicants")
    probability: Sequence[float] = ()
    confidence: Sequence[float] = ()
    decisions: list[int] = []
    risks: list[int] = []
    if pairs:
        probability, decision, risk, confidence, _ = zip(*(r for r, _ in pairs), strict=True)
        decisions = [DECISION[d] for d in decision]
        risks = [RISK_LEVEL[r] for r in risk]
    from_cache = [hit for _, hit in pairs]
    chunks = []
    j = 0
    for i, violations in [*sorted(bad, key=lambda b: b[0]), (n, [])]:
        k = bisect.bisect_left(positions, i, lo=j)  # the scored applicants before i
        if k > j:
            chunks.append(encode_results(positions[j:k], probability[j:k], decisions[j:k], risks[j:k],
                                         confidence[j:k], from_cache[j:k], version, request_id))
            j = k
        if i < n:
            chunks.append(_error_result(i, violations))
    return b"".join(chunks)


def _fill_results(response: scoring_pb2.BatchScoreResponse, n: int, positions: list[int],
                  pairs: list[tuple[ScoreResult, bool]], bad: list[tuple[int, list[Violation]]], request_id: str
                  ) -> list[scoring_pb2.Prediction]:
    """Fill ``response.results`` message by message (what :func:`_results_bytes` encodes); return the
    scored applicants' Prediction messages, for their explanations."""
    added = [response.results.add(index=i) for i in range(n)]  # kept: each results[i] makes a new wrapper
    for i, violations in bad:
        _fill_error(added[i], violations)
    predictions = [added[i].prediction for i in positions]
    for i, prediction, (res, from_cache) in zip(positions, predictions, pairs, strict=True):
        fill_prediction(prediction, res, f"{request_id}/{i}", from_cache=from_cache)
    return predictions


class ScoringService(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, runtime: Runtime, settings: Settings, caches: Caches | None = None, *,
                 audit: AuditWriter | None = None, challenger: Challenger | None = None) -> None:
        self.runtime = runtime
        self.challenger = challenger
        self.settings = settings
        self.caches = caches
        self.audit = audit
        self._explain_threads = settings.model.explain_threads
        self._inline_rows = settings.model.inline_explain_rows
        self._inline_reason_rows = settings.model.inline_reason_rows
        self._explain_pool = ThreadPoolExecutor(self._explain_threads, thread_name_prefix="explain")

    async def _shap_work(self, scorer: Scorer, fn: Callable[[EncodedRows], list[T]],
                         matrix: np.ndarray | EncodedRows, what: str, inline_rows: int) -> list[T]:
        """``fn(matrix)`` (TreeSHAP work): for a batch in the explain thread pool (split over its threads), so
        the event loop keeps serving; for up to ``inline_rows`` rows on the loop itself."""
        matrix = EncodedRows.of(matrix)
        try:
            with tracing.span("credscope.explain", model_version=scorer.version, batch_size=len(matrix), kind=what):
                if len(matrix) <= inline_rows:
                    return fn(matrix)
                loop = asyncio.get_running_loop()
                parts = min(self._explain_threads, len(matrix) // _SPLIT_ROWS) or 1
                bounds = [len(matrix) * k // parts for k in range(parts + 1)]
                chunks = await asyncio.gather(*(
                    loop.run_in_executor(self._explain_pool, contextvars.copy_context().run, fn,
                                         matrix.take(slice(a, b)))
                    for a, b in itertools.pairwise(bounds)))
                return [value for chunk in chunks for value in chunk]
        except ExplainError as exc:
            raise FailedPrecondition(f"model {scorer.version} cannot be explained: {exc}") from exc

    async def _compute_explanations(self, scorer: Scorer, matrix: EncodedRows) -> list[Explanation]:
        return await self._shap_work(scorer, scorer.explain, matrix, "explanation", self._inline_rows)

    async def _compute_reasons(self, scorer: Scorer, matrix: EncodedRows) -> list[list[str]]:
        return await self._shap_work(scorer, scorer.reason_codes, matrix, "reasons", self._inline_reason_rows)

    async def _explain(self, scorer: Scorer, matrix: EncodedRows) -> list[Explanation]:
        """Explanations through the explanation cache (computed for the misses only)."""
        return await explain_rows(scorer, matrix, self.caches, self._compute_explanations)

    async def _reasons(self, scorer: Scorer, matrix: EncodedRows) -> list[list[str]]:
        """Adverse-action reason codes through the cache: the SHAP matrix straight to codes, no explanation
        objects (for adverse decisions whose caller did not ask for an explanation)."""
        return await reason_rows(scorer, matrix, self.caches, self._compute_reasons)

    async def Score(self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext
                    ) -> scoring_pb2.ScoreResponse:
        started = time.perf_counter()
        request_id = _request_id(request.request_id)
        if not request.HasField("applicant"):
            raise InvalidArgument("applicant is required", [Violation("applicant", "set the applicant to score")])
        row, violations = applicant_to_row(request.applicant)
        if violations:
            input_signals.refused(violations)
            raise InvalidArgument(f"applicant has {len(violations)} invalid field(s)", violations)
        scorer = self.runtime.scorer
        top_k = explain_top_k(request.explain, len(scorer.model.features))
        matrix = rows_to_matrix([row])
        input_signals.observe(scorer, matrix)
        deadline.check(context, "scoring")
        rows = EncodedRows(matrix)  # scoring keeps its digests and features for the explanation
        [(result, from_cache)] = await score_rows(scorer, rows, self.caches)
        response = scoring_pb2.ScoreResponse()
        fill_prediction(response, result, request_id, from_cache=from_cache)
        tracing.set_attributes(model_version=result.model_version, decision=result.decision, from_cache=from_cache)
        if top_k is not None:  # the reasons come from the same explanation
            deadline.check(context, "explanation")
            full = (await self._explain(scorer, rows))[0]
            fill_explanation(response.explanation, full.top(top_k))
            codes = adverse_reasons(response.reasons, scorer, result, full)
        elif needs_explanation(scorer, result.decision):  # adverse: its reasons, from the SHAP values alone
            deadline.check(context, "explanation")
            codes = adverse_codes(response.reasons, scorer, result, (await self._reasons(scorer, rows))[0])
        else:
            codes = adverse_codes(response.reasons, scorer, result, None)
        response.timestamp.CopyFrom(timestamp(time.time()))
        response.processing_time_ms = (time.perf_counter() - started) * 1000.0
        audit_prediction(request_id, row, result, response.processing_time_ms, from_cache=response.from_cache,
                         explanation=explanation_of(response), reason_codes=codes)
        if self.challenger is not None:  # shadow scoring, queued without waiting
            self.challenger.offer([request_id], matrix)
        return response

    async def BatchScore(self, request: scoring_pb2.BatchScoreRequest, context: grpc.aio.ServicerContext
                         ) -> scoring_pb2.BatchScoreResponse:
        started = time.perf_counter()
        request_id = _request_id(request.request_id)
        n = len(request.applicants)
        limit = self.settings.server.max_batch_size
        if n == 0:
            raise InvalidArgument("applicants is empty", [Violation("applicants", "send at least one applicant")])
        if n > limit:
            raise InvalidArgument(f"batch of {n} applicants is over the limit of {limit}", [
                Violation("applicants", f"send at most {limit} applicants per call; split the batch")])
        loan, loan_violations = loan_parameters_from_proto(
            request.loan_parameters, default_loan_parameters(self.settings.portfolio))
        if loan_violations:
            raise InvalidArgument(f"loan_parameters has {len(loan_violations)} invalid field(s)", loan_violations)
        top_k = explain_top_k(request.explain, len(self.runtime.scorer.model.features))
        response = scoring_pb2.BatchScoreResponse(request_id=request_id)
        encoded, positions, bad = decode_applicants(request)  # the rows applicant_to_row gives, from the wire
        for _, violations in bad:
            input_signals.refused(violations)
        valid = len(positions)
        scorer = self.runtime.scorer
        response.model_version = scorer.version
        metrics.prediction_error("invalid_argument", n - valid)
        matrix = encoded.astype(np.float32)
        input_signals.observe(scorer, matrix)
        deadline.check(context, "scoring")
        scoring = EncodedRows(matrix)  # scoring keeps its digests and features for the explanations
        pairs = await score_rows(scorer, scoring, self.caches) if valid else []
        scored = [res for res, _ in pairs]
        tracing.set_attributes(model_version=scorer.version, batch_size=n,
                               from_cache=bool(pairs) and all(hit for _, hit in pairs))
        want = list(range(valid)) if top_k is not None else [
            j for j, (res, _) in enumerate(pairs) if needs_explanation(scorer, res.decision)]
        if want:
            deadline.check(context, "explanation")
        subset = scoring if len(want) == valid else scoring.take(want)
        # The SHAP task starts when this coroutine next yields (the await below), after the predictions and
        # the portfolio are filled in: its explain threads keep both cores busy, so filling in alongside them
        # would only share the cores (starting it first, with a turn of the loop, measured no faster).
        pending: asyncio.Future[list[Any]] | None = asyncio.ensure_future(
            self._explain(scorer, subset) if top_k is not None else self._reasons(scorer, subset)) if want else None
        filled: list[scoring_pb2.Prediction] = []
        try:
            if top_k is None and all(r.model_version == scorer.version for r in scored):
                # the results encoded for the wire at once (one model version); the adverse rows' reasons below
                response.MergeFromString(_results_bytes(n, positions, pairs, bad, request_id, scorer.version))
            else:  # explanations to fill in on every row: the messages one by one
                filled = _fill_results(response, n, positions, pairs, bad, request_id)
            fill_portfolio(response.portfolio, portfolio_of(scored, loan))
            done = dict(zip(want, await pending, strict=True)) if pending is not None else {}
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        codes: list[list[str] | None]
        if top_k is not None:  # explanations asked for: the reasons come from them
            codes = []
            for j, (prediction, (res, _)) in enumerate(zip(filled, pairs, strict=True)):
                fill_explanation(prediction.explanation, done[j].top(top_k))
                codes.append(adverse_reasons(prediction.reasons, scorer, res, done.get(j)))
        else:  # only the adverse decisions have reasons: [] for the others, None where none could be computed
            codes = [None if is_adverse(res.decision) else [] for res in scored]
            results = response.results
            for j, value in done.items():
                codes[j] = adverse_codes(results[positions[j]].prediction.reasons, scorer, scored[j], value)
        response.timestamp.CopyFrom(timestamp(time.time()))
        response.processing_time_ms = (time.perf_counter() - started) * 1000.0
        if valid:  # the audit records, by column (shaped into rows off the serving path)
            probability, decision, risk_level, confidence, _ = zip(*scored, strict=True)
            audit_batch(PredictionBatch(
                request_id, positions, encoded, probability, decision, risk_level, confidence, scorer.version,
                response.processing_time_ms, [hit for _, hit in pairs], codes,
                [explanation_of(p) for p in filled] if top_k is not None else None))
        if self.challenger is not None and valid:  # shadow scoring, queued without waiting
            self.challenger.offer([f"{request_id}/{i}" for i in positions], matrix)
        return response

    async def GetModelInfo(self, request: scoring_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> scoring_pb2.GetModelInfoResponse:
        scorer = self.runtime.scorer
        model, policy = scorer.model, scorer.policy
        meta = model.metadata
        response = scoring_pb2.GetModelInfoResponse(
            model_version=model.version,
            input_features=[c["name"] for c in meta.get("columns", [])],
            model_features=list(meta.get("features", [])),
            policy=scoring_pb2.DecisionPolicy(approve_below=policy.approve_below, review_below=policy.review_below),
            metrics={k: float(v) for k, v in meta.get("metrics", {}).items() if isinstance(v, int | float)},
            training_source=str(meta.get("training", {}).get("source", "")),
        )
        _set_time(response.created_at, meta.get("created_at"))
        model_dir = self.settings.model.model_dir
        for version in list_versions(model_dir):
            other = read_metadata(model_dir, version)
            mv = response.versions.add(version=version, active=version == model.version,
                                       roc_auc=float(other.get("metrics", {}).get("roc_auc", 0.0)))
            _set_time(mv.created_at, other.get("created_at"))
        return response

    async def ReportOutcome(self, request: scoring_pb2.ReportOutcomeRequest, context: grpc.aio.ServicerContext
                            ) -> scoring_pb2.ReportOutcomeResponse:
        return await report_outcome(self.audit, request)


def _set_time(ts, iso: str | None) -> None:  # type: ignore[no-untyped-def]
    if iso:
        try:
            ts.FromJsonString(iso if iso.endswith("Z") else iso.replace("+00:00", "Z"))
        except ValueError:
            pass
