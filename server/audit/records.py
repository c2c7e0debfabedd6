"""What the audit trail records: one :class:`AuditEntry` per call, with the call's :class:`UsageRecord`
(the ``api_usage`` row) and the :class:`PredictionRecord` of every applicant it scored (``predictions``
rows, plus ``shap_explanations`` rows when explained).

Servicers append prediction records to the call's :class:`~server.context.RequestContext` with
:func:`audit_prediction` (a batch call leaves one :class:`PredictionBatch` instead, with
:func:`audit_batch`); the audit interceptor wraps them into an entry when the call ends. Entries
round-trip through JSON for the spool (:func:`entries_to_json` / :func:`entries_from_json`).
Imports nothing from grpc.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from server import context as rc
from server.schema import COLUMNS

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)

Contribution = tuple[str, float | None, float]
"""One explanation term: (feature, the feature's value or None when missing, SHAP value)."""


@dataclass(slots=True)
class PredictionRecord:
    """One scored applicant, as the servicer saw it."""

    request_id: str
    row: list[float]
    """The encoded model input (``server.schema.COLUMNS`` order; NaN = missing)."""
    probability: float
    decision: str
    risk_level: str
    confidence: float
    model_version: str
    latency_ms: float
    from_cache: bool = False
    explanation: list[Contribution] | None = None
    """Top-k contributions in rank order (largest |shap| first), when the call was explained."""
    reason_codes: list[str] | None = None

    def input_json(self) -> str:
        """The ``predictions.input`` document: {HOME_CREDIT_COLUMN: number | null}, compact."""
        return input_json(self.row)


def input_json(row: Sequence[float]) -> str:
    """The ``predictions.input`` document of an encoded row: {HOME_CREDIT_COLUMN: number | null}, compact."""
    # orjson writes NaN as null and floats as shortest round-trip text, like json.dumps: ~2.2 µs per
    # row instead of ~8.4 (the writer thread shapes a BatchScore of 1,000 rows holding the GIL).
    return orjson.dumps(dict(zip(COLUMN_NAMES, row, strict=True)), option=orjson.OPT_SERIALIZE_NUMPY).decode()


@dataclass(slots=True, eq=False)
class PredictionBatch:
    """The prediction records of one batch call, by column: what 1,000 :class:`PredictionRecord` objects
    hold, built on the serving path in a few C-speed steps instead of 1,000 objects (and pickled to the
    audit process as a few arrays and lists instead of 1,000 tuples). The stores shape its rows by column
    (``server.audit.store.to_rows``); :meth:`records` expands it for the spool."""

    request_id: str
    """The call's request id; the record of the applicant at position ``i`` is ``{request_id}/{i}``."""
    positions: list[int]
    """Each record's position in the request."""
    rows: np.ndarray
    """The encoded model inputs, float64 ``[len(positions), len(COLUMNS)]`` (NaN = missing)."""
    probability: Sequence[float]
    decision: Sequence[str]
    risk_level: Sequence[str]
    confidence: Sequence[float]
    model_version: str
    latency_ms: float
    from_cache: Sequence[bool]
    reason_codes: Sequence[list[str] | None]
    explanation: Sequence[list[Contribution] | None] | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError unless every column holds one value per position (when built, and before its rows
        are shaped: a column may have been replaced since)."""
        n = len(self.positions)
        columns = (self.rows, self.probability, self.decision, self.risk_level, self.confidence, self.from_cache,
                   self.reason_codes, *(() if self.explanation is None else (self.explanation,)))
        if any(len(c) != n for c in columns):
            raise ValueError(f"prediction batch {self.request_id}: columns of different lengths")

    def __len__(self) -> int:
        return len(self.positions)

    def request_ids(self) -> list[str]:
        """Each record's request id, ``{request_id}/{position}``."""
        rid = self.request_id
        return [f"{rid}/{i}" for i in self.positions]

    def records(self) -> list[PredictionRecord]:
        rid, version, latency = self.request_id, self.model_version, float(self.latency_ms)
        explanations = self.explanation if self.explanation is not None else [None] * len(self.positions)
        return [PredictionRecord(f"{rid}/{i}", row, p, d, r, c, version, latency, fc, e, codes)
                for i, row, p, d, r, c, fc, e, codes in zip(
                    self.positions, self.rows.tolist(), self.probability, self.decision, self.risk_level,
                    self.confidence, self.from_cache, explanations, self.reason_codes, strict=True)]


@dataclass(slots=True)
class UsageRecord:
    """One call (the ``api_usage`` row)."""

    request_id: str
    method: str
    status_code: str
    """'OK' or the gRPC status code name."""
    duration_ms: float
    key_id: str | None = None
    tier: str | None = None
    error: str | None = None
    """The message the caller saw, never internals."""


@dataclass(slots=True)
class AuditEntry:
    """Everything one call leaves in the audit trail."""

    created_at: float
    """Wall-clock time the call started (seconds since the epoch)."""
    usage: UsageRecord
    predictions: list[PredictionRecord] = field(default_factory=list)
    client_name: str | None = None
    batch: PredictionBatch | None = None
    """A batch call's records, by column, until :meth:`expand` adds them to ``predictions``."""

    @property
    def weight(self) -> int:
        """Rows this entry writes (explanation rows aside)."""
        return 1 + len(self.predictions) + (0 if self.batch is None else len(self.batch))

    def expand(self) -> list[PredictionRecord]:
        """``predictions``, with the batch's records added first (once): for whatever shapes rows. The new
        list is built aside and then set, so a reader never sees a list half extended."""
        batch = self.batch
        if batch is not None:
            self.predictions = [*self.predictions, *batch.records()]
            self.batch = None
        return self.predictions

    @property
    def created_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.created_at, UTC)


def audit_prediction(request_id: str, row: Sequence[float], result: Any, latency_ms: float, *,
                     from_cache: bool = False, explanation: list[Contribution] | None = None,
                     reason_codes: list[str] | None = None) -> None:
    """Leave a prediction for the audit interceptor of the current call (nothing outside a call).

    ``result`` is a :class:`server.scoring.ScoreResult` (probability, decision, risk_level, confidence,
    model_version).
    """
    ctx = rc.current()
    if ctx is None:
        return
    ctx.audit.append(PredictionRecord(
        request_id=request_id, row=row if isinstance(row, list) else list(row), probability=float(result.probability), decision=result.decision,
        risk_level=result.risk_level, confidence=float(result.confidence), model_version=result.model_version,
        latency_ms=float(latency_ms), from_cache=from_cache, explanation=explanation, reason_codes=reason_codes))


def audit_batch(batch: PredictionBatch) -> None:
    """Leave a batch call's predictions, by column, for the audit interceptor (nothing outside a call)."""
    ctx = rc.current()
    if ctx is not None:
        ctx.audit.append(batch)


def iso_utc(dt: datetime) -> str:
    """The SQLite timestamp text: ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (sorts as time)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- spool encoding -------------------------------------------------------------------------------

def _num(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _entry_to_obj(e: AuditEntry) -> dict[str, Any]:
    u = e.usage
    return {
        "t": e.created_at, "c": e.client_name,
        "u": [u.request_id, u.method, u.status_code, u.duration_ms, u.key_id, u.tier, u.error],
        "p": [[p.request_id, [_num(v) for v in p.row], p.probability, p.decision, p.risk_level, p.confidence,
               p.model_version, p.latency_ms, p.from_cache,
               None if p.explanation is None else [[f, _num(v), s] for f, v, s in p.explanation],
               p.reason_codes] for p in e.expand()],
    }


def _entry_from_obj(o: dict[str, Any]) -> AuditEntry:
    rid, method, status, duration, key_id, tier, error = o["u"]
    preds = []
    for (prid, row, prob, decision, risk, conf, version, latency, from_cache, expl, codes) in o["p"]:
        preds.append(PredictionRecord(
            request_id=prid, row=[math.nan if v is None else float(v) for v in row], probability=prob,
            decision=decision, risk_level=risk, confidence=conf, model_version=version, latency_ms=latency,
            from_cache=bool(from_cache),
            explanation=None if expl is None else [(f, v, s) for f, v, s in expl], reason_codes=codes))
    return AuditEntry(created_at=o["t"], client_name=o.get("c"),
                      usage=UsageRecord(rid, method, status, duration, key_id, tier, error), predictions=preds)


def entries_to_json(entries: Sequence[AuditEntry]) -> bytes:
    return json.dumps([_entry_to_obj(e) for e in entries], separators=(",", ":")).encode()


def entries_from_json(data: bytes) -> list[AuditEntry]:
    return [_entry_from_obj(o) for o in json.loads(data)]
