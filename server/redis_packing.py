"""Commands to Redis packed by hiredis on redis-py's asyncio connections.

redis-py's *sync* connections pack a command with hiredis when it is installed (``HiredisRespSerializer``); its
asyncio connections pack in Python, one argument at a time (``Connection.pack_command``): an MGET of a
BatchScore's 1,000 keys, or the write-behind script with 1,000 keys and values, took ~1.3 ms of the event
loop that way. :func:`hiredis_packing` gives a client's connections redis-py's own hiredis serializer
instead: the same bytes (a test holds them equal for the argument types the server sends), from C.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE


class _HiredisPacking:
    """Mixed in before a redis-py asyncio connection class: ``pack_command`` through hiredis."""

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._serializer.pack(*args)


def hiredis_packing(client: aioredis.Redis) -> aioredis.Redis:
    """``client`` whose new connections pack commands with hiredis (unchanged when hiredis is missing)."""
    pool = client.connection_pool
    cls = pool.connection_class
    if HIREDIS_AVAILABLE and not issubclass(cls, _HiredisPacking):
        pool.connection_class = type(f"Hiredis{cls.__name__}", (_HiredisPacking, cls), {})
    return client
