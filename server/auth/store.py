"""The key store: API-key records and per-key usage counters, behind one small protocol.

Two implementations, picked by the URL scheme (:func:`open_key_store`): SQLite (embedded default,
``sqlite:///credscope.db``) and PostgreSQL (an asyncpg pool, ``postgresql://user@host/db``). Both pass
``tests/test_key_store.py``. The tables come from migration ``0001_api_keys``. Driver errors are wrapped in
:class:`KeyStoreError`, whose message carries no SQL and no credentials.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from server import db
from server.auth.keys import ApiKeyRecord, Tier

T = TypeVar("T")
HOUR = 3600


class KeyStoreError(Exception):
    """The key store could not answer (down, timed out, refused)."""


class DuplicateKey(KeyStoreError):
    """A key with that id or hash exists already."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Calls and rate-limit refusals of one key (over one hour when written, summed when read)."""

    key_id: str
    tier: str
    hour_start: int
    calls: int
    rate_limited: int


def hour_start(unix_seconds: float) -> int:
    return int(unix_seconds // HOUR) * HOUR


class KeyStore(Protocol):
    """Where API-key records and usage counters live."""

    url: str

    async def open(self) -> None:
        """Connect (the schema must be migrated already)."""

    async def close(self) -> None:
        """Release connections."""

    async def create(self, record: ApiKeyRecord) -> None:
        """Insert a new record; :class:`DuplicateKey` if its id or hash exists."""

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        """The record of ``key_id``, revoked or not; None when unknown."""

    async def list_keys(self, include_revoked: bool = False) -> list[ApiKeyRecord]:
        """Records, oldest first."""

    async def revoke(self, key_id: str, at: datetime) -> ApiKeyRecord | None:
        """Mark a key revoked (a second revocation keeps the first time); None when unknown."""

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add counts to the per-key, per-hour counters."""

    async def usage_since(self, since_hour: int) -> list[UsageRow]:
        """Counts per key summed over the hours from ``since_hour`` on (``hour_start`` = ``since_hour``)."""


def _ts(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_COLUMNS = "key_id, key_hash, name, tier, admin, created_at, revoked_at"
_USAGE_UPSERT = ("INSERT INTO api_key_usage (key_id, tier, hour_start, calls, rate_limited) VALUES ({}) "
                 "ON CONFLICT (key_id, hour_start) DO UPDATE SET "
                 "calls = api_key_usage.calls + excluded.calls, "
                 "rate_limited = api_key_usage.rate_limited + excluded.rate_limited")
_USAGE_SUM = ("SELECT key_id, MIN(tier), SUM(calls), SUM(rate_limited) FROM api_key_usage WHERE hour_start >= {} "
              "GROUP BY key_id ORDER BY key_id")


def _record(row: Sequence[Any]) -> ApiKeyRecord:
    tier: Tier = row[3]
    return ApiKeyRecord(key_id=row[0], key_hash=row[1], name=row[2], tier=tier, admin=bool(row[4]),
                        created_at=_ts(row[5]) or datetime.now(UTC), revoked_at=_ts(row[6]))


class SqliteKeyStore:
    """One SQLite connection per process (WAL, busy timeout), used from a worker thread under a lock.

    Lookups happen once per key per ``auth.key_cache_seconds`` (the verifier caches), so the thread hop is
    off the hot path.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.path: Path = db.sqlite_path(url)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        try:
            self._conn = await asyncio.to_thread(db.connect_sqlite, self.path)
        except sqlite3.Error as e:
            raise KeyStoreError(f"cannot open the SQLite key store: {type(e).__name__}") from e

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(conn.close)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            if self._conn is None:
                raise KeyStoreError("the key store is closed")
            with self._lock:
                return fn(self._conn)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.IntegrityError as e:
            raise DuplicateKey("a key with that id exists") from e
        except sqlite3.Error as e:
            raise KeyStoreError(f"SQLite key store failed: {type(e).__name__}") from e

    async def create(self, record: ApiKeyRecord) -> None:
        await self._run(lambda c: c.execute(
            f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608  # nosec B608  # constant columns; values are bound parameters
            (record.key_id, record.key_hash, record.name, record.tier, int(record.admin), _iso(record.created_at),
             _iso(record.revoked_at) if record.revoked_at else None)))

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        row = await self._run(lambda c: c.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone())  # noqa: S608  # nosec B608  # constant columns; values are bound parameters
        return _record(row) if row else None

    async def list_keys(self, include_revoked: bool = False) -> list[ApiKeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = await self._run(lambda c: c.execute(
            f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, key_id").fetchall())  # noqa: S608  # nosec B608  # constant columns; values are bound parameters
        return [_record(r) for r in rows]

    async def revoke(self, key_id: str, at: datetime) -> ApiKeyRecord | None:
        def run(c: sqlite3.Connection) -> Any:
            c.execute("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?", (_iso(at), key_id))
            return c.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()  # noqa: S608  # nosec B608  # constant columns; values are bound parameters

        row = await self._run(run)
        return _record(row) if row else None

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        sql = _USAGE_UPSERT.format("?, ?, ?, ?, ?")

        def run(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(sql, [(r.key_id, r.tier, r.hour_start, r.calls, r.rate_limited) for r in rows])
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        await self._run(run)

    async def usage_since(self, since_hour: int) -> list[UsageRow]:
        rows = await self._run(lambda c: c.execute(_USAGE_SUM.format("?"), (since_hour,)).fetchall())
        return [UsageRow(r[0], r[1], since_hour, int(r[2]), int(r[3])) for r in rows]


class PostgresKeyStore:
    """An asyncpg pool, created at ``open`` and closed at ``close``."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 4, timeout: float = 5.0) -> None:
        self.url = url
        self._pool: Any = None
        self._sizes = (min_size, max_size)
        self._timeout = timeout

    async def open(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=self._sizes[0], max_size=self._sizes[1],
                                                   command_timeout=self._timeout, timeout=self._timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError) as e:
            raise KeyStoreError(f"cannot reach the PostgreSQL key store {db.redact(self.url)}: "
                                f"{type(e).__name__}") from e

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _run(self, fn: Callable[[Any], Any]) -> Any:
        import asyncpg

        if self._pool is None:
            raise KeyStoreError("the key store is closed")
        try:
            async with self._pool.acquire() as conn:
                return await fn(conn)
        except asyncpg.UniqueViolationError as e:
            raise DuplicateKey("a key with that id exists") from e
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise KeyStoreError(f"PostgreSQL key store failed: {type(e).__name__}") from e

    async def create(self, record: ApiKeyRecord) -> None:
        await self._run(lambda c: c.execute(
            f"INSERT INTO api_keys ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",  # noqa: S608  # nosec B608  # constant columns; values are bound parameters
            record.key_id, record.key_hash, record.name, record.tier, record.admin, record.created_at,
            record.revoked_at))

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        row = await self._run(lambda c: c.fetchrow(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = $1", key_id))  # noqa: S608  # nosec B608  # constant columns; values are bound parameters
        return _record(row) if row else None

    async def list_keys(self, include_revoked: bool = False) -> list[ApiKeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = await self._run(lambda c: c.fetch(
            f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, key_id"))  # noqa: S608  # nosec B608  # constant columns; values are bound parameters
        return [_record(r) for r in rows]

    async def revoke(self, key_id: str, at: datetime) -> ApiKeyRecord | None:
        row = await self._run(lambda c: c.fetchrow(
            f"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE key_id = $2 "  # noqa: S608  # nosec B608  # constant columns; values are bound parameters
            f"RETURNING {_COLUMNS}", at, key_id))
        return _record(row) if row else None

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        sql = _USAGE_UPSERT.format("$1, $2, $3, $4, $5")
        await self._run(lambda c: c.executemany(
            sql, [(r.key_id, r.tier, r.hour_start, r.calls, r.rate_limited) for r in rows]))

    async def usage_since(self, since_hour: int) -> list[UsageRow]:
        rows = await self._run(lambda c: c.fetch(_USAGE_SUM.format("$1"), since_hour))
        return [UsageRow(r[0], r[1], since_hour, int(r[2]), int(r[3])) for r in rows]


def key_store(url: str) -> KeyStore:
    """The key store for ``url`` (not yet open): ``sqlite:///path`` or ``postgresql://…``."""
    if db.dialect(url) == "sqlite":
        return SqliteKeyStore(url)
    return PostgresKeyStore(url)


async def open_key_store(url: str, *, migrate: bool = True) -> KeyStore:
    """Migrate (by default) and open the key store at ``url``."""
    if migrate:
        try:
            await db.migrate(url)
        except Exception as e:  # noqa: BLE001 - any driver error; the message must not carry the DSN password
            raise KeyStoreError(f"cannot migrate the key store {db.redact(url)}: {type(e).__name__}") from e
    store = key_store(url)
    await store.open()
    return store
