"""The networked audit store: PostgreSQL through an asyncpg pool.

A write is one transaction per batch: ``copy_records_to_table`` into session-local staging tables
(``TEMP … ON COMMIT DELETE ROWS``, made once per pooled connection), then ``INSERT … SELECT … ON
CONFLICT DO NOTHING`` into the real tables. COPY is the fast path for many rows; the conflict clause
makes a replayed batch (after a lost commit acknowledgement, or from the spool) a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from server.audit.records import AuditEntry
from server.audit.store import (
    CHALLENGER_COLUMNS,
    CHALLENGER_PAIRS,
    DECISIONS,
    PERCENTILES,
    PREDICTION_COLUMNS,
    REPLAY_COLUMNS,
    RISK_LEVELS,
    SHAP_COLUMNS,
    USAGE_COLUMNS,
    AuditedPrediction,
    AuditStoreError,
    FeatureStat,
    OutcomeResult,
    Stats,
    audited_prediction,
    to_rows,
)
from server.db import migrate_postgres, redact

log = logging.getLogger("credscope.audit")
T = TypeVar("T")

STAGING = (("predictions", "audit_stage_predictions", PREDICTION_COLUMNS, "request_id"),
           ("shap_explanations", "audit_stage_shap", SHAP_COLUMNS, "request_id, rank"),
           ("api_usage", "audit_stage_usage", USAGE_COLUMNS, "request_id"))
#: Staging tables, one set per pooled connection, emptied at every commit.
CREATE_STAGING = "\n".join(
    f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) ON COMMIT DELETE ROWS;"
    for table, stage, _, _ in STAGING)
MOVE = {table: f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM {stage} "  # noqa: S608  # nosec B608  # constant table and column names
               f"ON CONFLICT ({key}) DO NOTHING" for table, stage, cols, key in STAGING}

#: Errors about the data itself: the same batch would fail again.
PERMANENT = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError, TypeError)


class PostgresAuditStore:
    def __init__(self, url: str, *, timeout: float = 5.0, pool_size: int = 4, yielding: bool = True) -> None:
        self.url = url
        self.timeout = timeout
        self.yielding = yielding
        """Hand the GIL back as rows are shaped (``store.yield_gil``): a serving loop shares the process."""
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        await conn.execute(CREATE_STAGING)

    async def _guard(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except AuditStoreError:
            raise
        except PERMANENT as e:
            raise AuditStoreError(f"PostgreSQL refused the data: {type(e).__name__}: {e}", permanent=True) from e
        except Exception as e:  # noqa: BLE001 - unreachable, reset, timed out, shutting down: retry later
            raise AuditStoreError(f"PostgreSQL audit store {redact(self.url)}: {type(e).__name__}: {e}") from e

    async def open(self) -> None:
        async def _open() -> None:
            async with self._opening:
                if self._pool is not None:
                    return
                await asyncio.wait_for(migrate_postgres(self.url), self.timeout * 2)
                self._pool = await asyncpg.create_pool(
                    self.url, min_size=1, max_size=self.pool_size, timeout=self.timeout,
                    command_timeout=self.timeout, init=self._init_connection)

        await self._guard(_open)

    async def _with_conn(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async def run() -> T:
            if self._pool is None:
                await self.open()
            assert self._pool is not None
            async with self._pool.acquire(timeout=self.timeout) as conn:
                return await fn(conn)

        return await self._guard(run)

    async def ping(self) -> None:
        await self._with_conn(lambda conn: conn.fetchval("SELECT 1"))

    async def write(self, entries: Sequence[AuditEntry]) -> None:
        try:
            rows = await asyncio.to_thread(lambda: to_rows(entries, yielding=self.yielding))  # off the event loop
        except (ValueError, TypeError) as e:  # about the data, not the database: set aside, not retried
            raise AuditStoreError(f"the audit rows cannot be shaped: {type(e).__name__}: {e}", permanent=True) from e
        tables = (("predictions", rows.predictions), ("shap_explanations", rows.shap), ("api_usage", rows.usage))

        async def write(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                for (table, stage, cols, _), (_, records) in zip(STAGING, tables, strict=True):
                    if records:
                        await conn.copy_records_to_table(stage, records=records, columns=list(cols))
                        await conn.execute(MOVE[table])

        await self._with_conn(write)

    async def stats(self, start: datetime, end: datetime) -> Stats:
        window = "created_at >= $1 AND created_at < $2"

        async def stats(conn: asyncpg.Connection) -> Stats:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow(
                    "SELECT count(*) AS n, avg(probability) AS mean_p, avg(from_cache::int) AS hit, "  # noqa: S608  # nosec B608  # constant table and column names
                    "percentile_cont($3::float8[]) WITHIN GROUP (ORDER BY latency_ms) AS pct "
                    f"FROM predictions WHERE {window}", start, end, list(PERCENTILES))
                by_decision = {r[0]: r[1] for r in await conn.fetch(
                    f"SELECT decision, count(*) FROM predictions WHERE {window} GROUP BY decision", start, end)}  # noqa: S608  # nosec B608  # constant window; values are bound parameters
                by_risk = {r[0]: r[1] for r in await conn.fetch(
                    f"SELECT risk_level, count(*) FROM predictions WHERE {window} GROUP BY risk_level",  # noqa: S608  # nosec B608  # constant window; values are bound parameters
                    start, end)}
                errors = await conn.fetchval(
                    f"SELECT count(*) FROM api_usage WHERE {window} AND status_code <> 'OK'", start, end)  # noqa: S608  # nosec B608  # constant window; values are bound parameters
            pct = row["pct"] or [0.0] * len(PERCENTILES)
            return Stats(total=row["n"], by_decision={d: by_decision.get(d, 0) for d in DECISIONS},
                         by_risk_level={r: by_risk.get(r, 0) for r in RISK_LEVELS},
                         mean_probability=float(row["mean_p"] or 0.0),
                         latency_ms={q: float(v) for q, v in zip(PERCENTILES, pct, strict=True)},
                         cache_hit_rate=float(row["hit"] or 0.0), error_calls=errors)

        return await self._with_conn(stats)

    async def top_features(self, decision: str | None, limit: int) -> list[FeatureStat]:
        if decision is None:
            sql = ("SELECT feature, avg(abs(shap_value)) AS m, count(*) AS c FROM shap_explanations "
                   "GROUP BY feature ORDER BY m DESC, feature LIMIT $1")
            args: tuple[Any, ...] = (limit,)
        else:
            sql = ("SELECT s.feature, avg(abs(s.shap_value)) AS m, count(*) AS c FROM shap_explanations s "
                   "JOIN predictions p ON p.request_id = s.request_id WHERE p.decision = $1 "
                   "GROUP BY s.feature ORDER BY m DESC, s.feature LIMIT $2")
            args = (decision, limit)
        rows = await self._with_conn(lambda conn: conn.fetch(sql, *args))
        return [FeatureStat(r[0], float(r[1]), int(r[2])) for r in rows]

    async def report_outcome(self, request_id: str, defaulted: bool, observed_at: datetime,
                             reported_at: datetime) -> OutcomeResult:
        async def report(conn: asyncpg.Connection) -> OutcomeResult:
            async with conn.transaction():
                if await conn.fetchval("SELECT 1 FROM predictions WHERE request_id = $1", request_id) is None:
                    return OutcomeResult.NOT_FOUND
                changed = await conn.fetchval(
                    "INSERT INTO outcomes (request_id, defaulted, reported_at, observed_at) VALUES ($1, $2, $3, $4) "
                    "ON CONFLICT (request_id) DO UPDATE SET defaulted = EXCLUDED.defaulted, "
                    "reported_at = EXCLUDED.reported_at, observed_at = EXCLUDED.observed_at "
                    "WHERE outcomes.defaulted IS DISTINCT FROM EXCLUDED.defaulted RETURNING request_id",
                    request_id, defaulted, reported_at, observed_at)
                return OutcomeResult.RECORDED if changed else OutcomeResult.UNCHANGED

        return await self._with_conn(report)

    async def has_prediction(self, request_id: str) -> bool:
        return await self._with_conn(lambda conn: conn.fetchval(
            "SELECT 1 FROM predictions WHERE request_id = $1", request_id)) is not None

    async def prediction(self, request_id: str) -> AuditedPrediction | None:
        row = await self._with_conn(lambda conn: conn.fetchrow(
            f"SELECT {REPLAY_COLUMNS} FROM predictions WHERE request_id = $1", request_id))  # noqa: S608  # nosec B608  # constant table/column names; values are bound parameters
        return None if row is None else audited_prediction(*row)

    async def write_challenger(self, rows: Sequence[tuple[Any, ...]]) -> None:
        cols = ", ".join(CHALLENGER_COLUMNS)
        sql = (f"INSERT INTO challenger_predictions ({cols}) VALUES ($1, $2, $3, $4, $5) "  # noqa: S608  # nosec B608  # constant table/column names; values are bound parameters
               "ON CONFLICT (request_id) DO NOTHING")
        if rows:
            async def write(conn: asyncpg.Connection) -> None:
                async with conn.transaction():
                    await conn.executemany(sql, list(rows))

            await self._with_conn(write)

    async def challenger_pairs(self, start: datetime, end: datetime) -> list[tuple[Any, ...]]:
        rows = await self._with_conn(lambda conn: conn.fetch(CHALLENGER_PAIRS.format("$1", "$2"), start, end))
        return [tuple(r) for r in rows]

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.timeout)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()
