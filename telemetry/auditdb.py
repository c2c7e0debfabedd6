"""Read the audit trail (and write model_performance) in either database: SQLite or PostgreSQL.

Tables (created by the audit migrations):

* ``predictions(request_id, created_at, ..., input, probability, decision, risk_level, ...,
  model_version, ...)``; ``input`` is the encoded model input row as JSON,
  ``{HOME_CREDIT_COLUMN: number | null}`` (categoricals are their code index).
* ``outcomes(request_id, defaulted, reported_at, observed_at)``.
* ``model_performance(created_at, model_version, metric, value, window_start, window_end)``.

SQLite stores timestamps as ISO-8601 UTC text (``YYYY-MM-DDTHH:MM:SS.ffffffZ``), which sorts in time
order; PostgreSQL as ``TIMESTAMPTZ``. Readers open SQLite read-only, so a sidecar never creates the
database or takes a write lock; only :meth:`AuditDB.store_performance` writes.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from server.db import dialect, redact, sqlite_path
from server.schema import COLUMN_NAMES


class AuditUnavailable(Exception):
    """The audit database or its tables are not there (yet)."""


def iso(ts: datetime) -> str:
    """The SQLite text form of a timestamp: ``2026-11-25T10:50:09.335000Z``."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(value: Any) -> datetime:
    """A timestamp read from either database, as an aware UTC datetime."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    ts = datetime.fromisoformat(str(value).replace(" ", "T", 1))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def input_matrix(inputs: Sequence[Any]) -> np.ndarray:
    """Audited ``input`` values (JSON text or dicts) -> float32 ``[N, len(COLUMNS)]``, NaN = missing."""
    out = np.full((len(inputs), len(COLUMN_NAMES)), np.nan, dtype=np.float32)
    for i, raw in enumerate(inputs):
        row = json.loads(raw) if isinstance(raw, str | bytes) else raw
        if not isinstance(row, dict):
            continue
        for j, name in enumerate(COLUMN_NAMES):
            v = row.get(name)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[i, j] = v
            elif isinstance(v, bool):
                out[i, j] = float(v)
    return out


@dataclass(frozen=True, slots=True)
class Labelled:
    """A prediction with its reported outcome."""

    created_at: datetime
    model_version: str
    probability: float
    decision: str
    defaulted: bool


@dataclass(frozen=True, slots=True)
class DecisionCount:
    """Predictions of one model version in one time bucket, and how many were approved."""

    bucket: int
    model_version: str
    predictions: int
    approved: int


@dataclass(frozen=True, slots=True)
class PerformanceRow:
    """One row of model_performance."""

    model_version: str
    metric: str
    value: float
    window_start: datetime
    window_end: datetime


class AuditDB:
    """The audit trail at ``url`` (``sqlite:///path`` or ``postgresql://...``). Each method opens and
    closes its own connection: the sidecar calls them every few minutes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = dialect(url)

    def __repr__(self) -> str:
        return f"AuditDB({redact(self.url)})"

    # --- connections -------------------------------------------------------------------------

    def _sqlite(self, write: bool = False) -> sqlite3.Connection:
        path = sqlite_path(self.url)
        if not path.exists():
            raise AuditUnavailable(f"no audit database at {path} yet")
        mode = "rw" if write else "ro"
        conn = sqlite3.connect(f"file:{path.resolve()}?mode={mode}", uri=True, timeout=30,
                               isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _sqlite_query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        conn = self._sqlite()
        try:
            return conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                raise AuditUnavailable(f"the audit tables are missing ({e}); run credscope-migrate") from e
            raise
        finally:
            conn.close()

    def _pg_query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async def run() -> list[tuple[Any, ...]]:
            import asyncpg

            conn = await asyncpg.connect(self.url)
            try:
                return [tuple(r) for r in await conn.fetch(sql, *params)]
            except asyncpg.UndefinedTableError as e:
                raise AuditUnavailable(f"the audit tables are missing ({e}); run credscope-migrate") from e
            finally:
                await conn.close()

        return asyncio.run(run())

    # --- reads --------------------------------------------------------------------------------

    def recent_inputs(self, since: datetime, limit: int) -> np.ndarray:
        """The encoded inputs of the ``limit`` most recent predictions made at or after ``since``."""
        if self.dialect == "sqlite":
            rows = self._sqlite_query("SELECT input FROM predictions WHERE created_at >= ? "
                                      "ORDER BY created_at DESC LIMIT ?", (iso(since), limit))
        else:
            rows = self._pg_query("SELECT input::text FROM predictions WHERE created_at >= $1 "
                                  "ORDER BY created_at DESC LIMIT $2", (since, limit))
        return input_matrix([r[0] for r in rows])

    def labelled(self, since: datetime) -> list[Labelled]:
        """Predictions made at or after ``since`` that have a reported outcome."""
        if self.dialect == "sqlite":
            rows = self._sqlite_query(
                "SELECT p.created_at, p.model_version, p.probability, p.decision, o.defaulted "
                "FROM outcomes o JOIN predictions p ON p.request_id = o.request_id WHERE p.created_at >= ?",
                (iso(since),))
        else:
            rows = self._pg_query(
                "SELECT p.created_at, p.model_version, p.probability, p.decision, o.defaulted "
                "FROM outcomes o JOIN predictions p ON p.request_id = o.request_id WHERE p.created_at >= $1",
                (since,))
        return [Labelled(parse_ts(r[0]), str(r[1]), float(r[2]), str(r[3]), bool(r[4])) for r in rows]

    def decision_counts(self, since: datetime, bucket_seconds: float) -> list[DecisionCount]:
        """Predictions and approvals per model version and time bucket (bucket ``k`` starts at
        ``since + k * bucket_seconds``), counted by the database."""
        if self.dialect == "sqlite":
            rows = self._sqlite_query(
                "SELECT CAST((julianday(created_at) - julianday(?)) * 86400.0 / ? AS INTEGER) AS b, model_version, "
                "COUNT(*), SUM(CASE WHEN decision LIKE '%APPROVE' THEN 1 ELSE 0 END) "
                "FROM predictions WHERE created_at >= ? GROUP BY b, model_version",
                (iso(since).removesuffix("Z"), bucket_seconds, iso(since)))
        else:
            rows = self._pg_query(
                "SELECT floor(extract(epoch FROM created_at - $1) / $2)::bigint AS b, model_version, count(*), "
                "count(*) FILTER (WHERE decision LIKE '%APPROVE') "
                "FROM predictions WHERE created_at >= $1 GROUP BY 1, 2", (since, float(bucket_seconds)))
        return [DecisionCount(int(r[0]), str(r[1]), int(r[2]), int(r[3] or 0)) for r in rows]

    # --- writes -------------------------------------------------------------------------------

    def store_performance(self, rows: Sequence[PerformanceRow]) -> int:
        """Replace the rows of the same model version, metric and window with ``rows`` (one transaction).
        Recomputing a bucket therefore updates it instead of adding a duplicate."""
        if not rows:
            return 0
        now = datetime.now(UTC)
        if self.dialect == "sqlite":
            conn = self._sqlite(write=True)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for r in rows:
                    conn.execute("DELETE FROM model_performance WHERE model_version = ? AND metric = ? "
                                 "AND window_start = ? AND window_end = ?",
                                 (r.model_version, r.metric, iso(r.window_start), iso(r.window_end)))
                conn.executemany(
                    "INSERT INTO model_performance (created_at, model_version, metric, value, window_start, "
                    "window_end) VALUES (?, ?, ?, ?, ?, ?)",
                    [(iso(now), r.model_version, r.metric, r.value, iso(r.window_start), iso(r.window_end))
                     for r in rows])
                conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if "no such table" in str(e):
                    raise AuditUnavailable(f"model_performance is missing ({e}); run credscope-migrate") from e
                raise
            finally:
                conn.close()
            return len(rows)

        async def run() -> int:
            import asyncpg

            conn = await asyncpg.connect(self.url)
            try:
                async with conn.transaction():
                    await conn.executemany(
                        "DELETE FROM model_performance WHERE model_version = $1 AND metric = $2 "
                        "AND window_start = $3 AND window_end = $4",
                        [(r.model_version, r.metric, r.window_start, r.window_end) for r in rows])
                    await conn.executemany(
                        "INSERT INTO model_performance (created_at, model_version, metric, value, window_start, "
                        "window_end) VALUES ($1, $2, $3, $4, $5, $6)",
                        [(now, r.model_version, r.metric, r.value, r.window_start, r.window_end) for r in rows])
            except asyncpg.UndefinedTableError as e:
                raise AuditUnavailable(f"model_performance is missing ({e}); run credscope-migrate") from e
            finally:
                await conn.close()
            return len(rows)

        return asyncio.run(run())
