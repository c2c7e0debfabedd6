"""Migrations apply once, in order, on both databases."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from server.db import dialect, migrate, migrations, redact, sqlite_path


def test_urls() -> None:
    assert dialect("sqlite:///x.db") == "sqlite" and dialect("postgresql://h/db") == "postgres"
    assert sqlite_path("sqlite:///data/x.db") == Path("data/x.db")
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    with pytest.raises(ValueError, match="unsupported"):
        dialect("mysql://h/db")
    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"


def test_dialects_have_the_same_migrations() -> None:
    assert [(m.version, m.name) for m in migrations("sqlite")] == [(m.version, m.name) for m in migrations("postgres")]


def test_sqlite_migrations_apply_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    first = asyncio.run(migrate(url))
    assert first and asyncio.run(migrate(url)) == []
    with sqlite3.connect(tmp_path / "a.db") as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(first)


@pytest.mark.postgres
def test_postgres_migrations_apply_once(postgres_dsn: str) -> None:
    first = asyncio.run(migrate(postgres_dsn))
    assert first and asyncio.run(migrate(postgres_dsn)) == []
