"""The embedded audit store: one SQLite file (WAL), shared by the worker processes of a host.

Each store runs its statements on one thread of its own (sqlite3 is blocking), so the event loop never
waits on the disk. A write is one ``BEGIN IMMEDIATE`` transaction of multi-row ``INSERT … ON CONFLICT DO
NOTHING`` (only key conflicts are skipped; a row breaking a CHECK fails loudly). Several processes
serialize on SQLite's write lock, waiting up to the timeout.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from server.audit.records import AuditEntry, iso_utc
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
    YIELD_EVERY,
    AuditedPrediction,
    AuditStoreError,
    FeatureStat,
    OutcomeResult,
    Stats,
    audited_prediction,
    interpolate,
    to_rows,
    yield_gil,
)
from server.db import connect_sqlite, migrate_sqlite, migrations, sqlite_path

T = TypeVar("T")


#: Rows per INSERT statement: ``store.YIELD_EVERY`` (sqlite3 releases the GIL around each statement step and
#: must take it back after; one statement per row would make the writer thread and the event loop trade the
#: GIL per row, hundreds per statement hold it for milliseconds).


@dataclass(frozen=True)
class _Insert:
    table: str
    columns: Sequence[str]
    conflict: str

    @functools.cache  # noqa: B019 - three module-level instances
    def sql(self, rows: int) -> str:
        one = f"({', '.join('?' * len(self.columns))})"
        return (f"INSERT INTO {self.table} ({', '.join(self.columns)}) VALUES {', '.join([one] * rows)} "  # noqa: S608  # nosec B608  # constant table and column names
                f"ON CONFLICT ({self.conflict}) DO NOTHING")

    def run(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], yielding: bool = True) -> None:
        for i in range(0, len(rows), YIELD_EVERY):
            chunk = rows[i:i + YIELD_EVERY]
            conn.execute(self.sql(len(chunk)), [v for row in chunk for v in row])
            if yielding:
                yield_gil()


INSERT_PREDICTIONS = _Insert("predictions", PREDICTION_COLUMNS, "request_id")
INSERT_SHAP = _Insert("shap_explanations", SHAP_COLUMNS, "request_id, rank")
INSERT_USAGE = _Insert("api_usage", USAGE_COLUMNS, "request_id")
INSERT_CHALLENGER = _Insert("challenger_predictions", CHALLENGER_COLUMNS, "request_id")


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[None]:
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _pending_migrations(conn: sqlite3.Connection) -> bool:
    try:
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
    except sqlite3.OperationalError:  # no table yet
        return True
    return any(m.version not in done for m in migrations("sqlite"))


def _iso_rows(rows: list[tuple[Any, ...]], at: int) -> list[tuple[Any, ...]]:
    """The rows with the timestamp at ``at`` as text (formatted once per distinct time: a batch's rows
    share their call's)."""
    texts: dict[datetime, str] = {}
    out = []
    for r in rows:
        t = r[at]
        text = texts.get(t)
        if text is None:
            text = texts[t] = iso_utc(t)
        out.append((*r[:at], text, *r[at + 1:]))
    return out


class SqliteAuditStore:
    def __init__(self, url: str, *, timeout: float = 5.0, yielding: bool = True) -> None:
        self.url = url
        self.yielding = yielding
        """Hand the GIL back as rows are shaped and bound (``store.yield_gil``): a serving loop shares the process."""
        self.path = sqlite_path(url)
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="audit-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except AuditStoreError:
            raise
        except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, ValueError, TypeError) as e:
            raise AuditStoreError(f"SQLite refused the data: {type(e).__name__}: {e}", permanent=True) from e
        except (sqlite3.Error, OSError) as e:
            raise AuditStoreError(f"SQLite audit store {self.path}: {type(e).__name__}: {e}") from e

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = connect_sqlite(self.path)
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            try:
                if _pending_migrations(conn):  # (reading needs no lock: a busy database does not stall us)
                    migrate_sqlite(self.path)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    async def open(self) -> None:
        await self._run(self._connection)

    async def ping(self) -> None:
        """Take the write lock and let it go: SQLite can take writes (not just reads)."""
        def ping() -> None:
            with _transaction(self._connection(), "BEGIN IMMEDIATE"):
                pass

        await self._run(ping)

    async def write(self, entries: Sequence[AuditEntry]) -> None:
        await self._run(self._write, entries)

    def _write(self, entries: Sequence[AuditEntry]) -> None:
        y = self.yielding
        rows = to_rows(entries, yielding=y, stamp=iso_utc)
        conn = self._connection()
        with _transaction(conn, "BEGIN IMMEDIATE"):
            if rows.predictions:
                INSERT_PREDICTIONS.run(conn, rows.predictions, y)
            if rows.shap:
                INSERT_SHAP.run(conn, rows.shap, y)
            if rows.usage:
                INSERT_USAGE.run(conn, rows.usage, y)

    async def stats(self, start: datetime, end: datetime) -> Stats:
        return await self._run(self._stats, iso_utc(start), iso_utc(end))

    def _stats(self, start: str, end: str) -> Stats:
        conn = self._connection()
        window = "created_at >= ? AND created_at < ?"
        args = (start, end)
        with _transaction(conn, "BEGIN"):  # one snapshot for all the queries
            n, mean_p, hit = conn.execute(
                f"SELECT count(*), avg(probability), avg(from_cache) FROM predictions WHERE {window}",  # noqa: S608  # nosec B608  # constant window; values are bound parameters
                args).fetchone()
            by_decision = dict(conn.execute(
                f"SELECT decision, count(*) FROM predictions WHERE {window} GROUP BY decision", args).fetchall())  # noqa: S608  # nosec B608  # constant window; values are bound parameters
            by_risk = dict(conn.execute(
                f"SELECT risk_level, count(*) FROM predictions WHERE {window} GROUP BY risk_level",  # noqa: S608  # nosec B608  # constant window; values are bound parameters
                args).fetchall())

            def at(i: int) -> float:
                return conn.execute(f"SELECT latency_ms FROM predictions WHERE {window} "  # noqa: S608  # nosec B608  # constant window; values are bound parameters
                                    "ORDER BY latency_ms LIMIT 1 OFFSET ?", (*args, i)).fetchone()[0]

            latency = {q: interpolate(at, n, q) for q in PERCENTILES}
            errors = conn.execute(f"SELECT count(*) FROM api_usage WHERE {window} AND status_code <> 'OK'",  # noqa: S608  # nosec B608  # constant window; values are bound parameters
                                  args).fetchone()[0]
        return Stats(total=n, by_decision={d: by_decision.get(d, 0) for d in DECISIONS},
                     by_risk_level={r: by_risk.get(r, 0) for r in RISK_LEVELS}, mean_probability=mean_p or 0.0,
                     latency_ms=latency, cache_hit_rate=hit or 0.0, error_calls=errors)

    async def top_features(self, decision: str | None, limit: int) -> list[FeatureStat]:
        return await self._run(self._top_features, decision, limit)

    def _top_features(self, decision: str | None, limit: int) -> list[FeatureStat]:
        if decision is None:
            sql = ("SELECT feature, avg(abs(shap_value)) AS m, count(*) FROM shap_explanations "
                   "GROUP BY feature ORDER BY m DESC, feature LIMIT ?")
            args: tuple[Any, ...] = (limit,)
        else:
            sql = ("SELECT s.feature, avg(abs(s.shap_value)) AS m, count(*) FROM shap_explanations s "
                   "JOIN predictions p ON p.request_id = s.request_id WHERE p.decision = ? "
                   "GROUP BY s.feature ORDER BY m DESC, s.feature LIMIT ?")
            args = (decision, limit)
        return [FeatureStat(f, float(m), int(c)) for f, m, c in self._connection().execute(sql, args).fetchall()]

    async def report_outcome(self, request_id: str, defaulted: bool, observed_at: datetime,
                             reported_at: datetime) -> OutcomeResult:
        return await self._run(self._report_outcome, request_id, defaulted, iso_utc(observed_at),
                               iso_utc(reported_at))

    def _report_outcome(self, request_id: str, defaulted: bool, observed_at: str, reported_at: str) -> OutcomeResult:
        conn = self._connection()
        with _transaction(conn, "BEGIN IMMEDIATE"):
            if conn.execute("SELECT 1 FROM predictions WHERE request_id = ?", (request_id,)).fetchone() is None:
                return OutcomeResult.NOT_FOUND
            changed = conn.execute(
                "INSERT INTO outcomes (request_id, defaulted, reported_at, observed_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (request_id) DO UPDATE SET defaulted = excluded.defaulted, "
                "reported_at = excluded.reported_at, observed_at = excluded.observed_at "
                "WHERE outcomes.defaulted IS NOT excluded.defaulted RETURNING request_id",
                (request_id, defaulted, reported_at, observed_at)).fetchall()
            return OutcomeResult.RECORDED if changed else OutcomeResult.UNCHANGED

    async def has_prediction(self, request_id: str) -> bool:
        return await self._run(lambda: self._connection().execute(
            "SELECT 1 FROM predictions WHERE request_id = ?", (request_id,)).fetchone() is not None)

    async def prediction(self, request_id: str) -> AuditedPrediction | None:
        row = await self._run(lambda: self._connection().execute(
            f"SELECT {REPLAY_COLUMNS} FROM predictions WHERE request_id = ?", (request_id,)).fetchone())  # noqa: S608  # nosec B608  # constant table/column names; values are bound parameters
        return None if row is None else audited_prediction(*row)

    async def write_challenger(self, rows: Sequence[tuple[Any, ...]]) -> None:
        def write() -> None:
            conn = self._connection()
            with _transaction(conn, "BEGIN IMMEDIATE"):
                INSERT_CHALLENGER.run(conn, _iso_rows(list(rows), 1))

        if rows:
            await self._run(write)

    async def challenger_pairs(self, start: datetime, end: datetime) -> list[tuple[Any, ...]]:
        sql = CHALLENGER_PAIRS.format("?", "?")
        rows = await self._run(lambda: self._connection().execute(sql, (iso_utc(start), iso_utc(end))).fetchall())
        return [(*r[:5], None if r[5] is None else bool(r[5])) for r in rows]

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await self._run(_close)
        finally:
            self._executor.shutdown(wait=False)
