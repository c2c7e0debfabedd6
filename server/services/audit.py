"""The RPCs that read or add to the audit trail: ScoringService.ReportOutcome, AdminService.GetStats and
AdminService.ListTopFeatures (the servicers call these; protobuf in → audit store → protobuf out).

ReportOutcome semantics: an unknown request id is NOT_FOUND; reporting the outcome already recorded
answers ``recorded=false`` and changes nothing; reporting a *different* outcome for the same request id
replaces the earlier one (a correction: ``recorded=true``, ``reported_at`` and ``observed_at`` updated),
so ``outcomes`` holds one current row per request id.

A prediction may still be in a worker's audit queue when its outcome or the stats are asked for: these
RPCs first flush this worker's queue; ReportOutcome gives other workers one flush period before it
answers NOT_FOUND, and GetStats (up to now) waits one flush period for them when the server runs several.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from credscope.v1 import admin_pb2, scoring_pb2
from server.audit.records import Contribution
from server.audit.store import AuditStoreError, OutcomeResult
from server.audit.writer import AuditUnavailable, AuditWriter
from server.challenger import compare
from server.convert import DECISION_NAME, RISK_LEVEL
from server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, Violation
from server.scoring import ScoreResult

DEFAULT_PERIOD = timedelta(hours=24)
MAX_REQUEST_ID = 256
NOT_FOUND_RETRIES = 2
_RISK_LEVEL_NAME = {v: k for k, v in RISK_LEVEL.items()}


def result_of(p: Any) -> ScoreResult:
    """The scored result a filled ``Prediction`` / ``ScoreResponse`` carries (for the audit record)."""
    return ScoreResult(p.default_probability, DECISION_NAME[p.decision], _RISK_LEVEL_NAME[p.risk_level],
                       p.confidence, p.model_version)


def explanation_of(p: Any) -> list[Contribution] | None:
    """The explanation a filled ``Prediction`` / ``ScoreResponse`` carries, as audit contributions in rank
    order (None when the call asked for none)."""
    if not p.HasField("explanation"):
        return None
    return [(c.feature, c.value if c.HasField("value") else None, c.shap_value) for c in p.explanation.contributions]


def _writer(writer: AuditWriter | None) -> AuditWriter:
    if writer is None:
        raise FailedPrecondition("the audit trail is off on this server (CREDSCOPE_AUDIT__ENABLED=false)")
    return writer


def _time(msg: Any, field: str) -> datetime | None:
    if not msg.HasField(field):
        return None
    try:
        return getattr(msg, field).ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as e:
        raise InvalidArgument(f"{field} is not a valid timestamp",
                              [Violation(field, "must be a valid google.protobuf.Timestamp")]) from e


async def _flush(writer: AuditWriter) -> None:
    try:
        await writer.flush()
    except AuditUnavailable as e:
        raise Unavailable("the audit trail is not accepting writes right now; retry shortly") from e


def _unavailable(e: AuditStoreError) -> Unavailable:
    return Unavailable("the audit database is unreachable; retry shortly")


async def report_outcome(writer: AuditWriter | None, request: scoring_pb2.ReportOutcomeRequest
                         ) -> scoring_pb2.ReportOutcomeResponse:
    writer = _writer(writer)
    violations = []
    rid = request.request_id
    if not rid:
        violations.append(Violation("request_id", "is required: the request id returned by Score or BatchScore"))
    elif len(rid) > MAX_REQUEST_ID:
        violations.append(Violation("request_id", f"is longer than {MAX_REQUEST_ID} characters"))
    if request.outcome not in (scoring_pb2.OUTCOME_DEFAULTED, scoring_pb2.OUTCOME_REPAID):
        violations.append(Violation("outcome", "is required: OUTCOME_DEFAULTED or OUTCOME_REPAID"))
    observed = _time(request, "observed_at")
    if violations:
        raise InvalidArgument(f"ReportOutcomeRequest has {len(violations)} invalid field(s)", violations)
    now = datetime.now(UTC)
    defaulted = request.outcome == scoring_pb2.OUTCOME_DEFAULTED
    await _flush(writer)
    if writer.spooling:
        raise Unavailable("the audit database is catching up after an outage; retry shortly")
    for attempt in range(NOT_FOUND_RETRIES + 1):
        try:
            result = await writer.store.report_outcome(rid, defaulted, observed or now, now)
        except AuditStoreError as e:
            raise _unavailable(e) from e
        if result is not OutcomeResult.NOT_FOUND:
            return scoring_pb2.ReportOutcomeResponse(request_id=rid, recorded=result is OutcomeResult.RECORDED)
        if attempt < NOT_FOUND_RETRIES:  # it may still be queued in another worker
            await asyncio.sleep(writer.settings.flush_seconds)
    raise NotFound(f"no prediction with request id {rid!r} in the audit trail",
                   metadata={"request_id": rid})


async def get_stats(writer: AuditWriter | None, request: admin_pb2.GetStatsRequest, *,
                    other_workers: bool = False) -> admin_pb2.GetStatsResponse:
    writer = _writer(writer)
    given_end = _time(request, "end_time")
    end = given_end or datetime.now(UTC)
    start = _time(request, "start_time") or end - DEFAULT_PERIOD
    if start >= end:
        raise InvalidArgument("start_time must be before end_time",
                              [Violation("start_time", "must be before end_time (end defaults to now)")])
    await _flush(writer)
    if other_workers and given_end is None:  # the other workers write what they hold within a flush period
        await asyncio.sleep(writer.settings.flush_seconds)
    try:
        stats = await writer.store.stats(start, end)
        comparison = compare(await writer.store.challenger_pairs(start, end))
    except AuditStoreError as e:
        raise _unavailable(e) from e
    response = admin_pb2.GetStatsResponse(
        total_predictions=stats.total,
        by_decision=[admin_pb2.LabelCount(label=k, count=v) for k, v in stats.by_decision.items()],
        by_risk_level=[admin_pb2.LabelCount(label=k, count=v) for k, v in stats.by_risk_level.items()],
        mean_probability=stats.mean_probability, latency_p50_ms=stats.latency_ms[0.5],
        latency_p95_ms=stats.latency_ms[0.95], latency_p99_ms=stats.latency_ms[0.99],
        cache_hit_rate=stats.cache_hit_rate, error_calls=stats.error_calls)
    if comparison is not None:
        c = comparison
        response.challenger.CopyFrom(admin_pb2.ChallengerComparison(
            challenger_version=c.challenger_version, compared=c.compared, agreement_rate=c.agreement_rate,
            approval_rate_difference=c.approval_rate_difference, champion_auc=c.champion_auc,
            challenger_auc=c.challenger_auc))
    return response


async def list_top_features(writer: AuditWriter | None, request: admin_pb2.ListTopFeaturesRequest
                            ) -> admin_pb2.ListTopFeaturesResponse:
    writer = _writer(writer)
    limit = request.limit or 10
    if not 1 <= limit <= 100:
        raise InvalidArgument(f"limit {limit} is out of range",
                              [Violation("limit", "must be 1 to 100 (0 means 10)")])
    decision = None
    if request.decision != scoring_pb2.DECISION_UNSPECIFIED:
        decision = DECISION_NAME.get(request.decision)
        if decision is None:
            raise InvalidArgument("decision is not a known Decision",
                                  [Violation("decision", "must be DECISION_APPROVE, DECISION_REVIEW, DECISION_REJECT "
                                                         "or unset for all")])
    await _flush(writer)
    try:
        features = await writer.store.top_features(decision, limit)
    except AuditStoreError as e:
        raise _unavailable(e) from e
    return admin_pb2.ListTopFeaturesResponse(features=[
        admin_pb2.FeatureImportance(feature=f.feature, mean_abs_shap=f.mean_abs_shap, count=f.count)
        for f in features])
