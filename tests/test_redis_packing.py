"""Commands to Redis packed by hiredis (``server.redis_packing``): the same bytes as redis-py's own asyncio
packer for every kind of argument the server sends, and the server's clients use it."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.utils import HIREDIS_AVAILABLE

from server.backends.cache import RedisLink
from server.ratelimit.redis_store import RedisBucketStore
from server.redis_packing import hiredis_packing

pytestmark = pytest.mark.skipif(not HIREDIS_AVAILABLE, reason="hiredis is not installed (a dependency)")

COMMANDS = [
    ("MGET", *[f"credscope:pred:6aa597fdac68ae83:{i:032x}" for i in range(1_000)]),
    ("EVALSHA", "0123abcd", 2, "k1", b"k2", 1.5, 1701234567.123456, 0.1, 1e-7, 3600.0, 123456789012345678, -3),
    ("SET", "k", b"\x00\xff" * 100, "PX", 86_400_000),
    ("CLIENT SETNAME", "credscope"),  # a command name of two words
    (b"CLIENT SETNAME", "credscope"),
    ("SET", "k", memoryview(b"view"), "NX"),
    ("SET", "k", bytearray(b"array")),
    ("SET", "ключ", "значение"),  # UTF-8
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0]))
def test_the_bytes_are_redis_pys_own(args: tuple[object, ...]) -> None:
    plain = Connection()
    packed = hiredis_packing(aioredis.Redis()).connection_pool.connection_class()
    assert b"".join(packed.pack_command(*args)) == b"".join(plain.pack_command(*args))
    assert b"".join(packed.pack_commands([args, args])) == b"".join(plain.pack_commands([args, args]))


def test_the_servers_clients_pack_with_hiredis() -> None:
    link = RedisLink("redis://127.0.0.1:6379/0", timeout=1.0, retry_seconds=1.0)
    buckets = RedisBucketStore("rediss://127.0.0.1:6379/0", prefix="t:", timeout=1.0)
    for client in (link.client, buckets.redis):
        cls = client.connection_pool.connection_class
        assert cls.__name__.startswith("Hiredis") and hasattr(cls, "_serializer")
    assert "SSL" in buckets.redis.connection_pool.connection_class.__name__  # TLS kept
    assert hiredis_packing(link.client).connection_pool.connection_class is link.client.connection_pool.connection_class
