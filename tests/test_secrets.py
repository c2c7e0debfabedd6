"""No API key and no database or Redis password in logs, error messages, traces, metrics or stored rows.

One run with everything that could carry a secret turned on: DEBUG logging, traces exported over OTLP to
a collector in the test, a metrics directory served by the telemetry sidecar's /metrics, the key store
(and audit trail) on PostgreSQL through a DSN with a password (a throwaway role: the test database's
trust authentication accepts it all the same, the point is that the string must never show up), the
cache and rate-limit buckets on a Redis that requires a password. Good calls, invalid input, made-up
keys, a key with a real id and a wrong secret, a revoked key and a throttled address; then every
output is searched for every key (whole and its secret part) and both passwords.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import asyncpg
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from client import CredScopeClient, CredScopeRpcError
from credscope.v1 import admin_pb2
from tests.conftest import POSTGRES_ADMIN_DSN
from tests.helpers import start_server
from tests.redis_process import RedisProcess
from tests.telemetry_data import start_sidecar
from tests.test_api import applicant
from tests.test_tracing import Collector

FAILED_AUTH_LIMIT = 5


@dataclass
class Role:
    dsn: str
    password: str


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture()
def pg_role(postgres_dsn: str) -> Iterator[Role]:
    """A login role with a password that owns the test's own database; dropped afterwards."""
    name = f"credscope_secret_{uuid.uuid4().hex[:8]}"
    password = f"pw{secrets.token_hex(12)}"
    database = urlparse(postgres_dsn).path.lstrip("/")
    asyncio.run(_admin(POSTGRES_ADMIN_DSN, f"CREATE ROLE {name} LOGIN PASSWORD '{password}'",
                       f'ALTER DATABASE "{database}" OWNER TO {name}'))
    u = urlparse(postgres_dsn)
    yield Role(u._replace(netloc=f"{name}:{password}@{u.hostname}:{u.port or 5432}").geturl(), password)
    asyncio.run(_admin(postgres_dsn, f"REASSIGN OWNED BY {name} TO CURRENT_USER", f"DROP OWNED BY {name}"))
    asyncio.run(_admin(POSTGRES_ADMIN_DSN, f"DROP ROLE IF EXISTS {name}"))


@pytest.fixture()
def collector() -> Iterator[Collector]:
    c = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, server)
    c.port = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
    server.start()
    yield c
    server.stop(0)


async def _create_admin_key(dsn: str) -> str:
    from server.auth import keys
    from server.auth.store import open_key_store

    store = await open_key_store(dsn)
    try:
        record, api_key = keys.generate("secrets-admin", "enterprise", True)
        await store.create(record)
    finally:
        await store.close()
    return api_key


async def _dump_tables(dsn: str) -> str:
    """Every row of every table of the database, as JSON text."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        rows = []
        for t in tables:
            rows += [r[0] for r in await conn.fetch(f'SELECT row_to_json(x)::text FROM "{t}" x')]
        return "\n".join(rows)
    finally:
        await conn.close()


def secret_part(api_key: str) -> str:
    """The secret of ``csk_<id>_<secret>``: everything after the id (a secret may itself contain ``_``)."""
    return api_key.split("_", 2)[2]


def error_text(e: CredScopeRpcError) -> str:
    return "\n".join([e.reason, str(e), *(f"{k}={v}" for k, v in e.metadata.items())])


@pytest.mark.postgres
@pytest.mark.redis
def test_no_key_or_password_in_logs_errors_spans_metrics_or_rows(  # type: ignore[no-untyped-def]
        model_dir: Path, tmp_path: Path, pg_role: Role, collector: Collector) -> None:
    redis = RedisProcess(tmp_path, password=f"rp{secrets.token_hex(12)}").start()
    metrics_dir = tmp_path / "metrics"
    admin_key = asyncio.run(_create_admin_key(pg_role.dsn))
    env = {"CREDSCOPE_AUTH__KEY_STORE_URL": pg_role.dsn, "CREDSCOPE_AUDIT__URL": pg_role.dsn,
           "CREDSCOPE_CACHE__REDIS_URL": redis.url, "CREDSCOPE_RATE_LIMIT__REDIS_URL": redis.url,
           "CREDSCOPE_TELEMETRY__METRICS_DIR": str(metrics_dir),
           "CREDSCOPE_TELEMETRY__OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",  # type: ignore[attr-defined]
           "OTEL_BSP_SCHEDULE_DELAY": "100", "CREDSCOPE_AUTH__KEY_CACHE_SECONDS": "0.2",
           "CREDSCOPE_AUTH__FAILED_AUTH_LIMIT": str(FAILED_AUTH_LIMIT), "CREDSCOPE_SERVER__DRAIN_SECONDS": "0"}
    # One worker: the failed-auth table is per worker, and each client below opens its own connection.
    sp = start_server(model_dir, cwd=tmp_path, env=env, args=["--log-level", "DEBUG", "--workers", "1"])
    sidecar = start_sidecar(["--metrics-dir", str(metrics_dir), "--audit-url", pg_role.dsn, "--model-dir",
                             str(model_dir), "--out", str(tmp_path / "reports")],
                            env={"CREDSCOPE_LOG_LEVEL": "DEBUG"})
    keys = [admin_key]
    errors: list[str] = []

    def refused(c: CredScopeClient, reason: str | None = None) -> CredScopeRpcError:
        with pytest.raises(CredScopeRpcError) as e:
            c.score(applicant())
        errors.append(error_text(e.value))
        if reason:
            assert e.value.reason == reason, e.value
        return e.value

    try:
        with CredScopeClient(sp.target, api_key=admin_key, retries=False) as admin:
            user_key = admin.admin_call("CreateApiKey", admin_pb2.CreateApiKeyRequest(
                name="user", tier=admin_pb2.TIER_PRO)).api_key
            doomed = admin.admin_call("CreateApiKey", admin_pb2.CreateApiKeyRequest(name="doomed", tier=admin_pb2.TIER_FREE))
            keys += [user_key, doomed.api_key]
            admin.admin_call("ListApiKeys", admin_pb2.ListApiKeysRequest(include_revoked=True))
            admin.admin_call("GetApiKeyStats", admin_pb2.GetApiKeyStatsRequest())
            with CredScopeClient(sp.target, api_key=user_key, retries=False) as user:
                scored = user.score(applicant(), explain=True, top_k=3)
                assert scored.default_probability > 0
                assert len(user.batch_score([applicant(), applicant(amt_credit=-5)]).results) == 2
                with pytest.raises(CredScopeRpcError) as e:
                    user.score(applicant(amt_credit=-5))
                errors.append(error_text(e.value))
                with pytest.raises(CredScopeRpcError) as e:  # a user key on an admin RPC
                    user.admin_call("ListApiKeys", admin_pb2.ListApiKeysRequest())
                errors.append(error_text(e.value))
            with CredScopeClient(sp.target, api_key=doomed.api_key, retries=False) as revoked:
                assert revoked.score(applicant()).default_probability > 0
                admin.admin_call("RevokeApiKey", admin_pb2.RevokeApiKeyRequest(key_id=doomed.key.key_id))
                deadline = time.monotonic() + 10
                while True:  # each worker notices within auth.key_cache_seconds
                    try:
                        revoked.score(applicant())
                    except CredScopeRpcError as e:
                        errors.append(error_text(e))
                        assert e.reason == "API_KEY_REVOKED", e
                        break
                    assert time.monotonic() < deadline, "the revoked key was still accepted"
                    time.sleep(0.1)
        made_up = [f"csk_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}" for _ in range(3)]
        wrong_secret = f"csk_{user_key.split('_', 2)[1]}_{secrets.token_urlsafe(32)}"  # a real id
        keys += [*made_up, wrong_secret]
        for k in [*made_up, wrong_secret]:
            with CredScopeClient(sp.target, api_key=k, retries=False) as c:
                refused(c, "API_KEY_INVALID")
        with CredScopeClient(sp.target, api_key=user_key, retries=False) as c:  # 5 failures: throttled
            refused(c, "AUTH_THROTTLED")
        collector.wait_for(lambda s: s.name.endswith("/RevokeApiKey"))
        collector.wait_for(lambda s: s.name.endswith("/Score"), count=8)
        deadline = time.monotonic() + 15
        while True:  # the workers flush their metrics every 0.25 s
            status, metrics_text = sidecar.get("/metrics")
            assert status == 200
            if "credscope_auth_throttled_total 1.0" in metrics_text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        sp.stop()
        sidecar.stop()
        redis.stop()

    rows = asyncio.run(_dump_tables(pg_role.dsn))
    with collector.lock:
        spans = "\n".join(f"{resource}\n{span}" for resource, span in collector.spans)
    haystacks = {
        "server log": sp.log(), "sidecar log": sidecar.log(), "error messages and metadata": "\n".join(errors),
        "spans": spans, "/metrics": metrics_text, "database rows": rows,
        "metrics files": "\n".join(p.read_bytes().decode("latin-1") for p in metrics_dir.iterdir()),
    }
    # The haystacks hold what they should (so that finding nothing in them means something).
    assert " DEBUG " in haystacks["server log"] and "postgresql://" in haystacks["server log"]
    assert "API_KEY_REVOKED" in haystacks["error messages and metadata"]
    assert "credscope.v1.AdminService/RevokeApiKey" in spans and "credscope.request_id" in spans
    assert "credscope_auth_failures_total" in metrics_text and "credscope_predictions_total" in metrics_text
    assert doomed.key.key_id in rows  # the key store's rows: ids and hashes
    assert scored.request_id in rows  # the audit trail's rows
    needles = {"PostgreSQL password": pg_role.password, "Redis password": redis.password or ""}
    for i, k in enumerate(keys):
        needles[f"key {i}"] = k
        needles[f"secret of key {i}"] = secret_part(k)
    found = [f"{needle} in {where}" for where, text in haystacks.items() for needle, value in needles.items()
             if value in text]
    assert not found, found
