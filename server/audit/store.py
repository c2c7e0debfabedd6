"""The audit store protocol (what the writer and the RPCs need from a database), its two
implementations' shared parts, and the factory that picks one from the URL.

``sqlite:///path`` → :class:`server.audit.sqlite.SqliteAuditStore` (embedded default);
``postgresql://…`` → :class:`server.audit.postgres.PostgresAuditStore` (asyncpg, batched COPY).
Both pass the same contract suite (``tests/test_audit_store.py``).
"""

from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import repeat
from typing import Any, Protocol

from server.audit.records import AuditEntry, PredictionBatch, input_json
from server.db import dialect

DECISIONS = ("APPROVE", "REVIEW", "REJECT")
RISK_LEVELS = ("VERY_LOW", "LOW", "MEDIUM", "HIGH", "VERY_HIGH")
PERCENTILES = (0.5, 0.95, 0.99)

#: What ReplayDecision reads back of a prediction row.
REPLAY_COLUMNS = "request_id, input, model_version, probability, decision, reason_codes"
PREDICTION_COLUMNS = ("request_id", "created_at", "key_id", "client_name", "method", "input", "probability",
                      "decision", "risk_level", "confidence", "model_version", "latency_ms", "from_cache",
                      "reason_codes")
SHAP_COLUMNS = ("request_id", "rank", "feature", "value", "shap_value")
CHALLENGER_COLUMNS = ("request_id", "created_at", "model_version", "probability", "decision")
CHALLENGER_PAIRS = ("SELECT p.probability, p.decision, c.model_version, c.probability, c.decision, o.defaulted "
                    "FROM predictions p JOIN challenger_predictions c ON c.request_id = p.request_id "
                    "LEFT JOIN outcomes o ON o.request_id = p.request_id "
                    "WHERE p.created_at >= {0} AND p.created_at < {1}")
USAGE_COLUMNS = ("request_id", "created_at", "key_id", "tier", "method", "status_code", "duration_ms", "error")


class AuditStoreError(Exception):
    """The database could not do it. ``permanent`` errors are about the data (retrying the same batch
    fails again); the others are about the database (unreachable, locked, timed out)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class OutcomeResult(enum.Enum):
    RECORDED = "recorded"
    """New, or a different outcome than the one reported before (it replaces it)."""
    UNCHANGED = "unchanged"
    """The same outcome had been reported before."""
    NOT_FOUND = "not_found"
    """No prediction has this request id."""


@dataclass
class Stats:
    """Prediction statistics over a period."""

    total: int = 0
    by_decision: dict[str, int] = field(default_factory=dict)
    by_risk_level: dict[str, int] = field(default_factory=dict)
    mean_probability: float = 0.0
    latency_ms: dict[float, float] = field(default_factory=dict)
    """Percentile (0.5, 0.95, 0.99) → latency in ms (continuous, like percentile_cont)."""
    cache_hit_rate: float = 0.0
    error_calls: int = 0


@dataclass
class AuditedPrediction:
    """A recorded decision, as ``AdminService.ReplayDecision`` reads it back."""

    request_id: str
    row: list[float]
    """The encoded model input (``server.schema.COLUMNS`` order; NaN = missing)."""
    model_version: str
    probability: float
    decision: str
    reason_codes: list[str] | None


def audited_prediction(request_id: str, input_doc: Any, model_version: str, probability: float, decision: str,
                       reason_codes: str | None) -> AuditedPrediction:
    """An :class:`AuditedPrediction` from the columns of a ``predictions`` row (``input`` as JSON text or a
    dict)."""
    from server.schema import COLUMN_NAMES

    doc = json.loads(input_doc) if isinstance(input_doc, str | bytes) else input_doc
    row = [math.nan if doc.get(name) is None else float(doc[name]) for name in COLUMN_NAMES]
    return AuditedPrediction(request_id, row, model_version, float(probability), decision,
                             None if reason_codes is None else list(json.loads(reason_codes)))


@dataclass
class FeatureStat:
    feature: str
    mean_abs_shap: float
    count: int


class AuditStore(Protocol):
    """A database for the audit trail. ``write`` is one transaction and idempotent by request id."""

    async def open(self) -> None:
        """Apply the migrations and connect. Raises :class:`AuditStoreError` when unreachable."""

    async def write(self, entries: Sequence[AuditEntry]) -> None:
        """Insert the entries' rows in one transaction; rows whose key exists are skipped."""

    async def ping(self) -> None:
        """Raise :class:`AuditStoreError` unless the database answers."""

    async def stats(self, start: datetime, end: datetime) -> Stats:
        """Prediction statistics over [start, end)."""

    async def top_features(self, decision: str | None, limit: int) -> list[FeatureStat]:
        """Mean |SHAP| by feature over recorded explanations, largest first."""

    async def report_outcome(self, request_id: str, defaulted: bool, observed_at: datetime,
                             reported_at: datetime) -> OutcomeResult:
        """Record the observed outcome of a prediction (replacing a different earlier one)."""

    async def has_prediction(self, request_id: str) -> bool:
        """Whether a prediction row exists for the request id."""

    async def prediction(self, request_id: str) -> AuditedPrediction | None:
        """The recorded input and decision of a request id (None when there is none)."""

    async def write_challenger(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``challenger_predictions`` rows (CHALLENGER_COLUMNS order; created_at an aware datetime);
        rows whose request id exists are skipped."""

    async def challenger_pairs(self, start: datetime, end: datetime) -> list[tuple[Any, ...]]:
        """(champion probability, champion decision, challenger version, challenger probability, challenger
        decision, defaulted or None) of the predictions made in [start, end) that the challenger scored."""

    async def close(self) -> None:
        """Release connections."""


def open_store(url: str, *, timeout: float = 5.0, pool_size: int = 4, process: bool = False,
               nice: int = 0, yielding: bool = True) -> AuditStore:
    """The store for a URL (not yet opened); ``process``: run it in a child process
    (:class:`server.audit.process.ProcessAuditStore`, at CPU priority ``nice``). ``yielding``: the store's
    writer thread shares its process with a serving event loop and hands the GIL back as it shapes and
    binds rows (see :func:`yield_gil`); the child process's store, whose loop only answers the worker's
    calls, does not."""
    if process:
        from server.audit.process import ProcessAuditStore

        return ProcessAuditStore(url, timeout=timeout, pool_size=pool_size, nice=nice)
    if dialect(url) == "sqlite":
        from server.audit.sqlite import SqliteAuditStore

        return SqliteAuditStore(url, timeout=timeout, yielding=yielding)
    from server.audit.postgres import PostgresAuditStore

    return PostgresAuditStore(url, timeout=timeout, pool_size=pool_size, yielding=yielding)


# --- rows -----------------------------------------------------------------------------------------

def _finite(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else v


@dataclass
class Rows:
    """The rows of a batch, deduplicated by key (first wins), in the column orders above; timestamps as
    aware datetimes, JSON as text."""

    predictions: list[tuple[Any, ...]]
    shap: list[tuple[Any, ...]]
    usage: list[tuple[Any, ...]]


#: Rows shaped (or inserted) between two hand-backs of the GIL by a writer thread; see :func:`yield_gil`.
YIELD_EVERY = 32


def yield_gil() -> None:
    """Let the event loop's thread take the GIL now. A writer thread shaping or binding hundreds of rows
    would otherwise hold it for up to the interpreter's switch interval (5 ms) at a time, and every call the
    loop was serving waited that long: the audit batches showed as the p99 latency of Score.

    It costs: ``time.sleep(0)`` takes ~40 us of CPU and ~100 us here (a BatchScore of 1,000 rows yields ~32
    times), so the audit child process's store, whose event loop only answers the worker's calls (a read there
    may wait a few ms for the GIL), passes ``yielding=False`` (``os.sched_yield`` is cheap but does not reliably
    let the waiting thread in)."""
    time.sleep(0)


def to_rows(entries: Sequence[AuditEntry], *, yielding: bool = False,
            stamp: Callable[[datetime], Any] | None = None) -> Rows:
    """The rows of ``entries``; ``yielding`` (in a writer thread) hands the GIL back every YIELD_EVERY;
    ``stamp`` turns each entry's time into what the database takes (default: the aware datetime). A batch
    call's records (:class:`~server.audit.records.PredictionBatch`) are shaped by column, without building
    them one by one."""
    preds: dict[str, tuple[Any, ...]] = {}
    shap: dict[tuple[str, int], tuple[Any, ...]] = {}
    usage: dict[str, tuple[Any, ...]] = {}
    for n, e in enumerate(entries, start=1):
        if yielding and n % YIELD_EVERY == 0:
            yield_gil()
        created = e.created_datetime if stamp is None else stamp(e.created_datetime)
        u = e.usage
        usage.setdefault(u.request_id, (u.request_id, created, u.key_id, u.tier, u.method, u.status_code,
                                        float(u.duration_ms), u.error))
        for p in e.predictions:
            if p.request_id not in preds:
                preds[p.request_id] = (
                    p.request_id, created, u.key_id, e.client_name, u.method, p.input_json(), float(p.probability),
                    p.decision, p.risk_level, float(p.confidence), p.model_version, float(p.latency_ms),
                    bool(p.from_cache), None if p.reason_codes is None else json.dumps(p.reason_codes))
            for rank, (feature, value, shap_value) in enumerate(p.explanation or (), start=1):
                shap.setdefault((p.request_id, rank),
                                (p.request_id, rank, feature, _finite(value), float(shap_value)))
        if e.batch is not None:
            _batch_rows(e.batch, e, created, preds, shap)
    return Rows(list(preds.values()), list(shap.values()), list(usage.values()))


def _batch_rows(b: PredictionBatch, e: AuditEntry, created: Any, preds: dict[str, tuple[Any, ...]],
                shap: dict[tuple[str, int], tuple[Any, ...]]) -> None:
    """The rows of a batch's records, column by column: what ``to_rows`` makes of ``b.records()``."""
    b.check()  # (zip below does not: repeat() never ends)
    ids = b.request_ids()
    u = e.usage
    codes = [None if c is None else json.dumps(c) for c in b.reason_codes]
    for row in zip(ids, repeat(created), repeat(u.key_id), repeat(e.client_name), repeat(u.method),
                   map(input_json, b.rows.tolist()), map(float, b.probability), b.decision, b.risk_level,
                   map(float, b.confidence), repeat(b.model_version), repeat(float(b.latency_ms)),
                   map(bool, b.from_cache), codes):
        preds.setdefault(row[0], row)
    if b.explanation is not None:
        for rid, explanation in zip(ids, b.explanation, strict=True):
            for rank, (feature, value, shap_value) in enumerate(explanation or (), start=1):
                shap.setdefault((rid, rank), (rid, rank, feature, _finite(value), float(shap_value)))


def interpolate(sorted_at: Any, n: int, q: float) -> float:
    """percentile_cont over n sorted values, fetching positions with ``sorted_at(i)``."""
    if n == 0:
        return 0.0
    pos = q * (n - 1)
    lo = math.floor(pos)
    frac = pos - lo
    a = sorted_at(lo)
    if frac == 0:
        return float(a)
    b = sorted_at(lo + 1)
    return float(a + (b - a) * frac)
