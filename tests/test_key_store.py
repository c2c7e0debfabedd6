"""API keys: the format, one contract suite over both key stores (SQLite, PostgreSQL), the verifier's cache."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.auth import keys
from server.auth.store import HOUR, KeyStore, KeyStoreError, UsageRow, hour_start, open_key_store
from server.auth.usage import UsageRecorder
from server.auth.verifier import InvalidKey, KeyStoreUnavailable, KeyVerifier, RevokedKey


def test_key_format_and_hash() -> None:
    record, api_key = keys.generate("ops", "enterprise", admin=True)
    assert api_key.startswith("csk_") and keys.key_id_of(api_key) == record.key_id
    assert record.key_hash == hashlib.sha256(api_key.encode()).hexdigest() and keys.matches(api_key, record)
    assert not keys.matches(api_key[:-1] + ("A" if api_key[-1] != "A" else "B"), record)
    assert api_key not in repr(record)
    others = {keys.generate("x", "free")[1] for _ in range(200)}
    assert len(others) == 200 and len({k.split("_")[1] for k in others}) == 200
    for bad in ("", "csk_", "csk_zz_abc", "sk_" + api_key[4:], api_key + "x"):
        assert keys.key_id_of(bad) is None
    with pytest.raises(ValueError, match="tier"):
        keys.generate("x", "gold")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        keys.generate("  ", "free")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each key store: an embedded SQLite file, a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture()
async def store(store_url: str) -> AsyncIterator[KeyStore]:
    s = await open_key_store(store_url)
    yield s
    await s.close()


async def test_create_get_list_revoke(store: KeyStore) -> None:
    t0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    a, _ = keys.generate("alice", "pro", now=t0)
    b, _ = keys.generate("bob-admin", "enterprise", admin=True, now=t0 + timedelta(seconds=1))
    await store.create(a)
    await store.create(b)
    assert await store.get(a.key_id) == a and await store.get(b.key_id) == b
    assert await store.get("0" * 16) is None
    assert [r.key_id for r in await store.list_keys()] == [a.key_id, b.key_id]
    revoked = await store.revoke(a.key_id, t0 + timedelta(hours=1))
    assert revoked is not None and revoked.revoked_at == t0 + timedelta(hours=1) and not revoked.active
    again = await store.revoke(a.key_id, t0 + timedelta(hours=2))  # the first revocation time stays
    assert again is not None and again.revoked_at == t0 + timedelta(hours=1)
    assert await store.revoke("f" * 16, t0) is None
    assert [r.key_id for r in await store.list_keys()] == [b.key_id]
    assert [r.key_id for r in await store.list_keys(include_revoked=True)] == [a.key_id, b.key_id]


async def test_duplicate_key_is_refused(store: KeyStore) -> None:
    a, _ = keys.generate("alice", "free")
    await store.create(a)
    with pytest.raises(KeyStoreError):
        await store.create(a)


async def test_usage_counters_add_up(store: KeyStore) -> None:
    h = hour_start(1_800_000_000)
    await store.add_usage([UsageRow("k1", "pro", h, 3, 1), UsageRow("k2", "free", h, 5, 0),
                           UsageRow("k1", "pro", h - 30 * HOUR, 100, 100)])
    await store.add_usage([UsageRow("k1", "pro", h, 2, 2), UsageRow("k1", "pro", h - HOUR, 10, 0)])
    usage = {u.key_id: (u.tier, u.calls, u.rate_limited) for u in await store.usage_since(h - 23 * HOUR)}
    assert usage == {"k1": ("pro", 15, 3), "k2": ("free", 5, 0)}


async def test_usage_recorder_batches_and_keeps_counts_when_the_store_fails(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    store = await open_key_store(f"sqlite:///{tmp_path / 'u.db'}")
    rec = UsageRecorder(store, flush_seconds=3600, clock=lambda: now[0])
    for i in range(10):
        rec.record("k1", "pro", rate_limited=i >= 7)
    rec.record("anonymous", "free", rate_limited=False)
    assert await store.usage_since(0) == []  # nothing written until a flush
    await rec.flush()
    await store.close()
    rec.record("k1", "pro", rate_limited=False)
    await rec.flush()  # the store is closed: the count waits
    store2 = await open_key_store(f"sqlite:///{tmp_path / 'u.db'}")
    rec.store = store2
    rows = {u.key_id: (u.calls, u.rate_limited) for u in await rec.usage_24h()}
    assert rows == {"k1": (11, 3), "anonymous": (1, 0)}
    now[0] += 25 * HOUR
    assert await rec.usage_24h() == []
    await store2.close()


async def test_verifier_checks_hash_revocation_and_caches(tmp_path: Path) -> None:
    store = await open_key_store(f"sqlite:///{tmp_path / 'v.db'}")
    now = [0.0]
    v = KeyVerifier(store, cache_seconds=5, stale_seconds=60, clock=lambda: now[0])
    record, api_key = keys.generate("alice", "pro")
    await store.create(record)
    p = await v.verify(api_key)
    assert (p.key_id, p.name, p.tier, p.admin) == (record.key_id, "alice", "pro", False)
    wrong = f"csk_{record.key_id}_{'A' * 43}"
    with pytest.raises(InvalidKey):
        await v.verify(wrong)
    with pytest.raises(InvalidKey):
        await v.verify("not-a-key")
    # Revoked in the store: the cached record serves until key_cache_seconds have passed, then refused.
    await store.revoke(record.key_id, datetime.now(UTC))
    assert (await v.verify(api_key)).key_id == record.key_id
    now[0] = 5.1
    with pytest.raises(RevokedKey):
        await v.verify(api_key)
    await store.close()


async def test_verifier_serves_recent_keys_while_the_store_is_down(tmp_path: Path) -> None:
    store = await open_key_store(f"sqlite:///{tmp_path / 'v.db'}")
    now = [0.0]
    v = KeyVerifier(store, cache_seconds=5, stale_seconds=30, clock=lambda: now[0])
    known, known_key = keys.generate("known", "free")
    other, other_key = keys.generate("other", "free")
    await store.create(known)
    await store.create(other)
    await v.verify(known_key)
    await store.close()  # the store goes away
    now[0] = 10.0
    assert (await v.verify(known_key)).key_id == known.key_id  # stale but recent: served
    with pytest.raises(KeyStoreUnavailable) as e:
        await v.verify(other_key)  # never looked up: cannot be checked
    assert "keys.db" not in e.value.message and "sqlite" not in e.value.message.lower()
    now[0] = 31.0
    with pytest.raises(KeyStoreUnavailable):
        await v.verify(known_key)
    assert v.store_failures == 3


async def test_verifier_shares_one_lookup_between_concurrent_calls(tmp_path: Path) -> None:
    store = await open_key_store(f"sqlite:///{tmp_path / 'v.db'}")
    record, api_key = keys.generate("alice", "pro")
    await store.create(record)
    lookups = [0]
    get = store.get

    async def counting_get(key_id: str):  # type: ignore[no-untyped-def]
        lookups[0] += 1
        return await get(key_id)

    store.get = counting_get  # type: ignore[method-assign]
    v = KeyVerifier(store, cache_seconds=5)
    principals = await asyncio.gather(*(v.verify(api_key) for _ in range(50)))
    assert {p.key_id for p in principals} == {record.key_id} and lookups[0] == 1
    await store.close()


async def test_postgres_store_outage_is_a_store_error_without_credentials() -> None:
    with pytest.raises(KeyStoreError) as e:
        await open_key_store("postgresql://postgres:s3cret@127.0.0.1:1/nowhere")
    assert "s3cret" not in str(e.value)
