"""Database URLs and ordered SQL migrations for both databases (SQLite embedded, PostgreSQL networked).

Migrations are files ``server/migrations/<dialect>/NNNN_name.sql`` applied in order, each in its own
transaction, and recorded in ``schema_migrations``. Every dialect has the same numbered files, so the
schemas stay in step. Several workers may start at once: PostgreSQL takes an advisory lock, SQLite a
write lock (``BEGIN IMMEDIATE``), so each migration runs once.

``credscope-migrate --url URL`` applies them by hand; servers apply them at start.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

Dialect = Literal["sqlite", "postgres"]
ADVISORY_LOCK_ID = 0x43524544  # "CRED"


def dialect(url: str) -> Dialect:
    """The database kind of a URL: ``sqlite:///path`` or ``postgresql://…`` (``postgres://`` too)."""
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgres"
    raise ValueError(f"unsupported database URL scheme {scheme!r}: use sqlite:///path or postgresql://host/db")


def sqlite_path(url: str) -> Path:
    """``sqlite:///relative.db`` → ``relative.db``; ``sqlite:////abs/x.db`` → ``/abs/x.db``."""
    u = urlparse(url)
    path = u.path[1:] if u.path.startswith("/") else u.path
    if not path:
        raise ValueError(f"sqlite URL needs a file path: {url!r}")
    return Path(path)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(kind: Dialect) -> list[Migration]:
    """The migrations of a dialect, in order."""
    folder = resources.files("server") / "migrations" / kind
    out = []
    for f in sorted(folder.iterdir(), key=lambda p: p.name):
        if f.name.endswith(".sql"):
            number, _, rest = f.name.partition("_")
            out.append(Migration(int(number), rest.removesuffix(".sql"), f.read_text(encoding="utf-8")))
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers in {kind}: {versions}")
    return out


def _set_wal(conn: sqlite3.Connection, wait: float = 30.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried: when worker processes open a new database at the same moment,
    SQLite answers the switch "database is locked" at once, without calling the busy handler."""
    deadline = time.monotonic() + wait
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def connect_sqlite(path: Path) -> sqlite3.Connection:
    """A SQLite connection set up for several processes: WAL, a busy timeout, foreign keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    _set_wal(conn)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def migrate_sqlite(path: Path) -> list[str]:
    conn = connect_sqlite(path)
    applied: list[str] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))")
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for m in migrations("sqlite"):
            if m.version in done:
                continue
            for statement in _statements(m.sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", (m.version, m.name))
            applied.append(f"{m.version:04d}_{m.name}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    return applied


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (``;`` at line ends; no procedural bodies in SQLite files)."""
    return [s.strip() for s in sql.split(";\n") if s.strip() and not all(
        line.strip().startswith("--") or not line.strip() for line in s.strip().splitlines())]


async def migrate_postgres(dsn: str) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_ID)
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                               "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for m in migrations("postgres"):
                if m.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                                       m.version, m.name)
                applied.append(f"{m.version:04d}_{m.name}")
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_ID)
    finally:
        await conn.close()
    return applied


async def migrate(url: str) -> list[str]:
    """Apply the pending migrations of the database at ``url``; return their names."""
    if dialect(url) == "sqlite":
        return await asyncio.to_thread(migrate_sqlite, sqlite_path(url))
    return await migrate_postgres(url)


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and errors."""
    u = urlparse(url)
    if u.password:
        netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
        return u._replace(netloc=netloc).geturl()
    return url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="credscope-migrate", description="Apply CredScope's SQL migrations.")
    p.add_argument("--url", required=True, help="sqlite:///path.db or postgresql://user@host:5432/db")
    args = p.parse_args(argv)
    try:
        applied = asyncio.run(migrate(args.url))
    except Exception as e:  # noqa: BLE001 - a CLI reports, without a traceback
        print(f"credscope-migrate: {redact(args.url)}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"{redact(args.url)}: applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
