"""Shared fixtures: a small model built once per run, a real server process, and the networked services.

Redis and PostgreSQL fixtures give each test run its own key prefix and its own database, and clean up.
When a service is unreachable the tests that need it skip locally, with the reason, and FAIL under
``CI=true`` (CI provides both services).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.helpers import ServerProcess, make_api_key, start_server
from tests.redis_process import RedisProcess

REDIS_URL = os.environ.get("CREDSCOPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_ADMIN_DSN = os.environ.get("CREDSCOPE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
RUN_ID = uuid.uuid4().hex[:10]


def require_service(name: str, problem: str) -> None:
    """Fail under CI, skip locally: a test that needs ``name`` cannot run."""
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required under CI=true but unreachable: {problem}")
    pytest.skip(f"{name} unreachable ({problem}); start it to run this test")


def _tcp_reachable(url: str, default_port: int) -> str | None:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or default_port), timeout=2):
            return None
    except OSError as e:
        return f"{u.hostname}:{u.port or default_port}: {e}"


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The training run behind ``model_dir`` (``tools.train.TrainResult``, with the fitted pipeline)."""
    from tools.train import train

    out = tmp_path_factory.mktemp("models")
    return train(model_dir=out, rows=20_000, seed=7, n_estimators=80, quiet=True)


@pytest.fixture(scope="session")
def model_dir(trained_model) -> Path:  # type: ignore[no-untyped-def]
    """A small model (synthetic data, fixed seed) in a fresh model store, built once per run.

    Its TreeSHAP kernel is compiled here, once (~5-7 s on a fresh clone), so that no server the tests
    start spends its start-up timeout compiling it (a first compile is tested in tests/test_treeshap.py):
    ``explainer_for`` verifies the explainer on the model's reference rows, which runs the kernel.
    """
    from server.explain import explainer_for
    from server.model import load_model

    explainer_for(load_model(trained_model.model_dir))
    return trained_model.model_dir


@pytest.fixture(scope="session")
def model(model_dir: Path):  # type: ignore[no-untyped-def]
    from server.model import load_model

    return load_model(model_dir)


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A credscope-server process on loopback with embedded defaults, shared by the session's tests."""
    work = tmp_path_factory.mktemp("server")
    sp = start_server(model_dir, cwd=work, env={"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true",
                                                "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "10000000"})
    yield sp
    sp.stop()


@pytest.fixture(scope="session")
def admin_key(server: ServerProcess) -> str:
    """An API key with the admin flag (enterprise tier) for the session server."""
    return make_api_key(server.cwd)


@pytest.fixture()
def client(server: ServerProcess):  # type: ignore[no-untyped-def]
    from client import CredScopeClient

    with CredScopeClient(server.target, timeout=10) as c:
        yield c


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the test Redis (fails under CI when unreachable)."""
    problem = _tcp_reachable(REDIS_URL, 6379)
    if problem:
        require_service("Redis", problem)
    return REDIS_URL


@pytest.fixture()
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server on a free loopback port (to stop, pause or count commands on), stopped after."""
    try:
        rp = RedisProcess(tmp_path).start()
    except FileNotFoundError as e:
        require_service("redis-server", str(e))
    yield rp
    rp.stop()


@pytest.fixture()
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    import redis

    prefix = f"credscope-test:{RUN_ID}:{uuid.uuid4().hex[:8]}:"
    yield prefix
    r = redis.Redis.from_url(redis_url)
    try:
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


@pytest.fixture()
def postgres_dsn() -> Iterator[str]:
    """DSN of a fresh PostgreSQL database of this test's own, dropped afterwards."""
    problem = _tcp_reachable(POSTGRES_ADMIN_DSN, 5432)
    if problem:
        require_service("PostgreSQL", problem)
    import asyncpg

    name = f"credscope_test_{RUN_ID}_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001
        require_service("PostgreSQL", f"cannot create a test database: {e}")
    u = urlparse(POSTGRES_ADMIN_DSN)
    yield u._replace(path=f"/{name}").geturl()
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
