"""The security chain end to end: real server processes, real channels, the real key stores and buckets.

Two servers share one working directory (one SQLite key store, one host-local bucket table), as the
worker processes of one host do; two more share a real Redis and a real PostgreSQL, as replicas do.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import CredScopeClient, CredScopeRpcError
from credscope.v1 import admin_pb2, scoring_pb2, scoring_pb2_grpc
from tests.helpers import ROOT, ServerProcess, start_server
from tests.test_api import GOOD, applicant

#: Every key this module makes: the last test greps logs and files for them.
MADE_KEYS: list[str] = []
FREE_LIMIT = 5
PRO_LIMIT = 30


def keys_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "tools.keys", "--url", url, *args], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    return out


def make_key(url: str, tier: str = "free", *, admin: bool = False, name: str = "test") -> str:
    out = keys_cli(url, "create", "--name", name, "--tier", tier, *(["--admin"] if admin else []))
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("csk_") and "shown only this once" in out.stderr and key not in out.stderr
    MADE_KEYS.append(key)
    return key


class Pair:
    """Two servers of one host: shared working directory, key store and bucket table."""

    def __init__(self, servers: list[ServerProcess], work: Path) -> None:
        self.servers = servers
        self.work = work
        self.url = f"sqlite:///{work / 'credscope.db'}"
        self.admin_key = make_key(self.url, "enterprise", admin=True, name="ops")

    def client(self, i: int, api_key: str | None) -> CredScopeClient:
        return CredScopeClient(self.servers[i].target, api_key=api_key, timeout=10, retries=False)


@pytest.fixture(scope="module")
def pair(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    work = tmp_path_factory.mktemp("host")
    env = {"CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": str(FREE_LIMIT), "CREDSCOPE_RATE_LIMIT__PRO_PER_HOUR": str(PRO_LIMIT),
           "CREDSCOPE_AUTH__KEY_CACHE_SECONDS": "1", "CREDSCOPE_AUTH__USAGE_FLUSH_SECONDS": "0.3",
           "CREDSCOPE_SERVER__DRAIN_SECONDS": "0"}
    servers: list[ServerProcess] = []
    try:
        for _ in range(2):
            servers.append(start_server(model_dir, cwd=work, env=env, args=["--log-level", "DEBUG"]))
        yield Pair(servers, work)
    finally:
        for sp in servers:
            sp.stop()


def call_error(fn, *args, **kwargs) -> CredScopeRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(CredScopeRpcError) as e:
        fn(*args, **kwargs)
    return e.value


def test_calls_need_a_valid_key(pair: Pair) -> None:
    with pair.client(0, None) as c:
        e = call_error(c.score, GOOD)
        assert e.code == grpc.StatusCode.UNAUTHENTICATED and e.reason == "API_KEY_MISSING" and "x-api-key" in e.message
        assert e.request_id  # errors carry the request id too
    for bad in ("hello", "csk_0123456789abcdef_" + "A" * 43, pair.admin_key[:-2] + "xx"):
        with pair.client(1, bad) as c:
            e = call_error(c.score, GOOD)
            assert e.code == grpc.StatusCode.UNAUTHENTICATED and e.reason == "API_KEY_INVALID"
            assert "x-ratelimit-limit" not in e.metadata
    with grpc.insecure_channel(pair.servers[0].target) as ch:  # health stays open
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_admin_rpcs_need_the_admin_flag(pair: Pair) -> None:
    key = make_key(pair.url, "enterprise")
    with pair.client(0, key) as c:
        e = call_error(c.admin_call, "ListApiKeys", admin_pb2.ListApiKeysRequest())
        assert e.code == grpc.StatusCode.PERMISSION_DENIED and e.reason == "ADMIN_REQUIRED"
        assert c.score(GOOD).decision  # the key itself is fine
    with pair.client(0, pair.admin_key) as c:
        keys = c.admin_call("ListApiKeys", admin_pb2.ListApiKeysRequest()).keys
        assert any(k.key_id in key and k.tier == admin_pb2.TIER_ENTERPRISE and not k.admin for k in keys)


def wait_refused(client: CredScopeClient, seconds: float = 10.0) -> CredScopeRpcError:
    """Call until the key is refused (bounded); return the error."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.model_info()
        except CredScopeRpcError as e:
            return e
        assert time.monotonic() < deadline, "the revoked key was still accepted"
        time.sleep(0.2)


def test_keys_made_and_revoked_over_rpc_reach_every_worker(pair: Pair) -> None:
    with pair.client(0, pair.admin_key) as admin:
        e = call_error(admin.admin_call, "CreateApiKey", admin_pb2.CreateApiKeyRequest(name=""))
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and {v.field for v in e.field_violations} == {"name", "tier"}
        made = admin.admin_call("CreateApiKey", admin_pb2.CreateApiKeyRequest(
            name="partner", tier=admin_pb2.TIER_PRO))
        MADE_KEYS.append(made.api_key)
        assert made.api_key.startswith(f"csk_{made.key.key_id}_") and made.key.tier == admin_pb2.TIER_PRO
        assert made.key.created_at.seconds > 0 and not made.key.HasField("revoked_at")
        listed = admin.admin_call("ListApiKeys", admin_pb2.ListApiKeysRequest())
        assert made.key.key_id in {k.key_id for k in listed.keys} and made.api_key not in str(listed)
        with pair.client(0, made.api_key) as c0, pair.client(1, made.api_key) as c1:
            assert c0.model_info().model_version and c1.model_info().model_version
            revoked = admin.admin_call("RevokeApiKey", admin_pb2.RevokeApiKeyRequest(key_id=made.key.key_id))
            assert revoked.key.HasField("revoked_at")
            e0 = call_error(c0.model_info)  # the worker that revoked it: at once
            assert e0.code == grpc.StatusCode.UNAUTHENTICATED and e0.reason == "API_KEY_REVOKED"
            e1 = wait_refused(c1)  # the other worker: within auth.key_cache_seconds
            assert e1.code == grpc.StatusCode.UNAUTHENTICATED and e1.reason == "API_KEY_REVOKED"
        e = call_error(admin.admin_call, "RevokeApiKey", admin_pb2.RevokeApiKeyRequest(key_id="0" * 16))
        assert e.code == grpc.StatusCode.NOT_FOUND
        everything = admin.admin_call("ListApiKeys", admin_pb2.ListApiKeysRequest(include_revoked=True))
        assert any(k.key_id == made.key.key_id and k.HasField("revoked_at") for k in everything.keys)
        assert made.key.key_id not in {k.key_id for k in admin.admin_call(
            "ListApiKeys", admin_pb2.ListApiKeysRequest()).keys}


def test_a_key_revoked_with_the_cli_is_refused_within_seconds(pair: Pair) -> None:
    key = make_key(pair.url, "pro")
    with pair.client(1, key) as c:
        c.model_info()
        out = keys_cli(pair.url, "revoke", key.split("_")[1])
        assert out.returncode == 0 and "revoked" in out.stdout, out.stderr
        assert wait_refused(c).reason == "API_KEY_REVOKED"
    listed = keys_cli(pair.url, "list", "--all")
    assert key.split("_")[1] in listed.stdout and key not in listed.stdout
    assert keys_cli(pair.url, "revoke", "f" * 16).returncode == 1


def test_rate_limit_headers_and_refusal(pair: Pair) -> None:
    key = make_key(pair.url, "free")
    remaining = []
    for i in range(FREE_LIMIT):  # alternating between the two workers: one bucket
        with pair.client(i % 2, key) as c:
            c.score(GOOD)
            md = c.last_metadata
            assert md["x-ratelimit-limit"] == str(FREE_LIMIT) and md["x-request-id"]
            assert 0 < int(md["x-ratelimit-reset"]) <= 3600
            remaining.append(int(md["x-ratelimit-remaining"]))
    assert remaining == [4, 3, 2, 1, 0]
    with pair.client(1, key) as c:
        e = call_error(c.score, GOOD)
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "RATE_LIMITED"
    assert [q.field for q in e.quota_violations] == [f"api_key:{key.split('_')[1]}"]
    assert e.retry_delay_seconds == pytest.approx(3600 / FREE_LIMIT, abs=5)
    assert e.metadata["x-ratelimit-remaining"] == "0" and e.metadata["x-ratelimit-limit"] == str(FREE_LIMIT)
    assert int(e.metadata["x-ratelimit-reset"]) == pytest.approx(3600, abs=5) and e.request_id


def test_batch_score_costs_one_token_per_applicant(pair: Pair) -> None:
    key = make_key(pair.url, "free")
    with pair.client(0, key) as c:
        assert len(c.batch_score([GOOD] * 3).results) == 3
        assert c.last_metadata["x-ratelimit-remaining"] == "2"
        e = call_error(c.batch_score, [GOOD] * 3)
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.retry_delay_seconds is not None
        e = call_error(c.batch_score, [GOOD] * (FREE_LIMIT + 1))  # more than the whole bucket: no retry advice
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "COST_OVER_LIMIT"
        assert e.retry_delay_seconds is None and "smaller batches" in e.message
        c.score(GOOD)  # refusals took nothing
        assert c.last_metadata["x-ratelimit-remaining"] == "1"


async def _fire(targets: list[str], key: str, calls: int) -> dict[str, int]:
    """``calls`` Score calls at once, spread over ``targets``; counts by status code."""
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    try:
        stubs = [scoring_pb2_grpc.ScoringServiceStub(ch) for ch in channels]
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 10)
        req = scoring_pb2.ScoreRequest(applicant=applicant())

        async def one(i: int) -> str:
            try:
                await stubs[i % len(stubs)].Score(req, metadata=(("x-api-key", key),), timeout=30)
                return "OK"
            except grpc.aio.AioRpcError as e:
                return e.code().name

        codes = await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        for ch in channels:
            await ch.close()
    return {c: codes.count(c) for c in set(codes)}


def test_two_workers_of_one_host_allow_exactly_the_limit(pair: Pair) -> None:
    key = make_key(pair.url, "pro")
    counts = asyncio.run(_fire([s.target for s in pair.servers], key, 3 * PRO_LIMIT))
    assert counts == {"OK": PRO_LIMIT, "RESOURCE_EXHAUSTED": 2 * PRO_LIMIT}


def test_api_key_stats_count_calls_and_refusals(pair: Pair) -> None:
    def stats() -> dict[int, admin_pb2.TierStats]:
        with pair.client(0, pair.admin_key) as admin:
            return {t.tier: t for t in admin.admin_call("GetApiKeyStats", admin_pb2.GetApiKeyStatsRequest()).tiers}

    before = stats()
    assert set(before) == {admin_pb2.TIER_FREE, admin_pb2.TIER_PRO, admin_pb2.TIER_ENTERPRISE}
    assert before[admin_pb2.TIER_FREE].limit_per_hour == FREE_LIMIT
    assert before[admin_pb2.TIER_PRO].limit_per_hour == PRO_LIMIT
    key = make_key(pair.url, "free")
    for i in range(FREE_LIMIT + 2):
        with pair.client(i % 2, key) as c:
            try:
                c.model_info()
            except CredScopeRpcError as e:
                assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    deadline = time.monotonic() + 10  # the other worker's counts arrive with its next flush
    while True:
        after = stats()
        free, was = after[admin_pb2.TIER_FREE], before[admin_pb2.TIER_FREE]
        if free.calls_24h - was.calls_24h >= FREE_LIMIT + 2 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert free.calls_24h - was.calls_24h == FREE_LIMIT + 2
    assert free.rate_limited_24h - was.rate_limited_24h == 2
    assert free.active_keys == was.active_keys + 1
    usage = keys_cli(pair.url, "usage")
    assert usage.returncode == 0 and key.split("_")[1] in usage.stdout


def test_streaming_handlers_cannot_bypass_auth(tmp_path: Path) -> None:
    """A streaming RPC (none is declared yet) is guarded as well: a tiny server with a generic handler."""
    from server.auth import keys
    from server.auth.store import open_key_store
    from server.auth.verifier import KeyVerifier
    from server.interceptors.auth import AuthInterceptor

    async def run() -> None:
        store = await open_key_store(f"sqlite:///{tmp_path / 'k.db'}")
        record, api_key = keys.generate("streamer", "free")
        await store.create(record)

        async def numbers(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            for i in range(3):
                yield bytes([i])

        server = grpc.aio.server(interceptors=[AuthInterceptor(KeyVerifier(store))])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Numbers", {"Count": grpc.unary_stream_rpc_method_handler(numbers)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                count = ch.unary_stream("/test.Numbers/Count")
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    [m async for m in count(b"", timeout=5)]
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                got = [m async for m in count(b"", metadata=(("x-api-key", api_key),), timeout=5)]
                assert got == [b"\x00", b"\x01", b"\x02"]
        finally:
            await server.stop(0)
            await store.close()

    asyncio.run(run())


def test_anonymous_dev_mode_is_the_free_tier(server: ServerProcess) -> None:
    with CredScopeClient(server.target, timeout=10) as c:  # the session server runs with allow_anonymous
        c.score(GOOD)
        assert int(c.last_metadata["x-ratelimit-limit"]) > 0 and "x-ratelimit-remaining" in c.last_metadata
        e = call_error(c.admin_call, "GetApiKeyStats", admin_pb2.GetApiKeyStatsRequest())
        assert e.code == grpc.StatusCode.PERMISSION_DENIED
    with CredScopeClient(server.target, api_key="csk_bogus", timeout=10) as c:  # a bad key is not anonymous
        assert call_error(c.score, GOOD).code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.redis
@pytest.mark.postgres
def test_two_replicas_sharing_redis_allow_exactly_the_limit(model_dir: Path, tmp_path: Path, redis_url: str,
                                                            redis_prefix: str, postgres_dsn: str) -> None:
    limit = 20
    env = {"CREDSCOPE_RATE_LIMIT__REDIS_URL": redis_url, "CREDSCOPE_RATE_LIMIT__KEY_PREFIX": redis_prefix,
           "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": str(limit), "CREDSCOPE_AUTH__KEY_STORE_URL": postgres_dsn,
           "CREDSCOPE_SERVER__DRAIN_SECONDS": "0",
           # A loaded CI machine must not push Redis past its timeout: that is the (tested elsewhere)
           # fallback to host-local buckets, which is not shared between these two replicas.
           "CREDSCOPE_RATE_LIMIT__REDIS_TIMEOUT_SECONDS": "5"}
    servers = []
    try:
        for i in range(2):  # separate directories: nothing shared but Redis and PostgreSQL
            (tmp_path / str(i)).mkdir()
            servers.append(start_server(model_dir, cwd=tmp_path / str(i), env=env))
        key = make_key(postgres_dsn, "free")
        counts = asyncio.run(_fire([s.target for s in servers], key, 3 * limit))
        assert not any("limiting with local buckets" in s.log() for s in servers)
        assert counts == {"OK": limit, "RESOURCE_EXHAUSTED": 2 * limit}
    finally:
        for sp in servers:
            sp.stop()
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        assert r.exists(redis_prefix + key.split("_")[1]) and r.pttl(redis_prefix + key.split("_")[1]) > 0
    finally:
        r.close()
    for sp in servers:
        assert "local buckets" not in sp.log() and key not in sp.log()


def test_a_dead_redis_falls_back_to_local_buckets(model_dir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"CREDSCOPE_RATE_LIMIT__REDIS_URL": f"redis://127.0.0.1:{port}/0",
           "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "3", "CREDSCOPE_SERVER__DRAIN_SECONDS": "0"}
    sp = start_server(model_dir, cwd=tmp_path, env=env)
    try:
        key = make_key(f"sqlite:///{tmp_path / 'credscope.db'}", "free")
        with CredScopeClient(sp.target, api_key=key, timeout=10, retries=False) as c:
            for expected in (2, 1, 0):
                c.score(GOOD)
                assert c.last_metadata["x-ratelimit-remaining"] == str(expected)
            assert call_error(c.score, GOOD).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        assert sp.stop() == 0
    assert sp.log().count("limiting with local buckets") == 1


def test_keys_never_appear_in_clear_text(pair: Pair) -> None:
    """Run last in this module: every key it made, in whole or its secret alone, is absent from the servers'
    logs, the key store's files (database, WAL) and the bucket table."""
    assert len(MADE_KEYS) >= 8
    files = [p for p in pair.work.iterdir() if p.is_file()]
    assert any(p.name == "credscope.db" for p in files) and any(p.suffix == ".buckets" for p in files)
    blobs = {p.name: p.read_bytes() for p in files}
    logs = {f"server {i} log": sp.log() for i, sp in enumerate(pair.servers)}
    assert all("DEBUG" in log for log in logs.values())
    import hashlib

    assert any(hashlib.sha256(pair.admin_key.encode()).hexdigest().encode() in b for b in blobs.values())
    for key in MADE_KEYS:
        secret = key.split("_", 2)[2]
        for name, blob in blobs.items():
            assert key.encode() not in blob and secret.encode() not in blob, name
        for name, log in logs.items():
            assert key not in log and secret not in log, name
