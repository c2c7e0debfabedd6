"""Verifies API keys against the key store through a short-lived per-worker cache.

A worker trusts what it looked up for ``auth.key_cache_seconds`` (5 s by default), so a revocation reaches
every worker within that time while a busy key costs one store lookup per worker per period. Lookups of the
same key id that arrive together share one store query. When the store fails, keys looked up within
``auth.key_stale_seconds`` are still served from the cache (DESIGN: "keys: serve from a short-lived local
cache"); others get UNAVAILABLE. Unknown key ids are cached too (bounded), so a flood of made-up keys
does not reach the store more than once per id and period.

Nothing here logs or keeps the clear key: the cache holds store records (hashes) by key id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from server.auth.keys import ApiKeyRecord, key_id_of, matches
from server.auth.store import KeyStore, KeyStoreError
from server.context import Principal
from server.errors import Unauthenticated, Unavailable

log = logging.getLogger("credscope.auth")


class MissingKey(Unauthenticated):
    reason = "API_KEY_MISSING"


class InvalidKey(Unauthenticated):
    reason = "API_KEY_INVALID"


class RevokedKey(Unauthenticated):
    reason = "API_KEY_REVOKED"


class KeyStoreUnavailable(Unavailable):
    reason = "KEY_STORE_UNAVAILABLE"


def principal_of(record: ApiKeyRecord) -> Principal:
    return Principal(key_id=record.key_id, name=record.name, tier=record.tier, admin=record.admin)


class KeyVerifier:
    def __init__(self, store: KeyStore, *, cache_seconds: float = 5.0, stale_seconds: float = 60.0,
                 max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self.stale_seconds = max(stale_seconds, cache_seconds)
        self.max_entries = max_entries
        self.clock = clock
        self._cache: OrderedDict[str, tuple[ApiKeyRecord | None, float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[ApiKeyRecord | None]] = {}
        self._store_down = False
        self.store_failures = 0
        """Lookups the store failed (served stale from the cache or answered UNAVAILABLE)."""

    async def verify(self, api_key: str) -> Principal:
        """The principal of a valid, active key; raises Unauthenticated or (store down) Unavailable."""
        key_id = key_id_of(api_key)
        if key_id is None:
            raise InvalidKey("the API key is not valid: CredScope keys look like csk_<id>_<secret>")
        record = await self.lookup(key_id)
        if record is None or not matches(api_key, record):
            raise InvalidKey("the API key is not valid")
        if record.revoked_at is not None:
            raise RevokedKey(f"the API key {record.display} was revoked; ask an operator for a new one")
        return principal_of(record)

    def forget(self, key_id: str) -> None:
        """Drop a cached record (this worker revoked the key: take effect here at once)."""
        self._cache.pop(key_id, None)

    async def lookup(self, key_id: str) -> ApiKeyRecord | None:
        now = self.clock()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[1] < self.cache_seconds:
            return cached[0]
        pending = self._inflight.get(key_id)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._inflight[key_id] = pending
            try:
                record = await self.store.get(key_id)
            except KeyStoreError as e:
                pending.set_exception(e)
                pending.exception()  # mark retrieved: waiters may be none
            else:
                pending.set_result(record)
                self._remember(key_id, record, self.clock())
            finally:
                self._inflight.pop(key_id, None)
                if not pending.done():  # cancelled or a bug: release the waiters with a store error
                    pending.set_exception(KeyStoreError("key lookup interrupted"))
                    pending.exception()
        try:
            record = await asyncio.shield(pending)
        except KeyStoreError as e:
            return self._stale(key_id, cached, now, e)
        if self._store_down:
            self._store_down = False
            log.warning("key store is answering again")
        return record

    def _stale(self, key_id: str, cached: tuple[ApiKeyRecord | None, float] | None, now: float,
               error: KeyStoreError) -> ApiKeyRecord | None:
        self.store_failures += 1
        if not self._store_down:
            self._store_down = True
            log.error("key store unavailable (%s); serving keys looked up in the last %.0fs from the cache",
                      error, self.stale_seconds)
        if cached is not None and now - cached[1] < self.stale_seconds:
            return cached[0]
        raise KeyStoreUnavailable("API keys cannot be checked right now; retry shortly")

    def _remember(self, key_id: str, record: ApiKeyRecord | None, at: float) -> None:
        self._cache[key_id] = (record, at)
        self._cache.move_to_end(key_id)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
