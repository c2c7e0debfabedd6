"""The security chain's parts for one server worker: key store, key verifier, usage counters, rate limiter.

Built (without I/O) with the server; :meth:`Security.start` opens the key store (migrated by the server
just before) and the rate-limit table and starts the usage flusher; :meth:`Security.close` flushes the
usage counts and closes everything.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from server import db, metrics
from server.auth.store import KeyStore, key_store
from server.auth.usage import UsageRecorder
from server.auth.verifier import KeyVerifier
from server.ratelimit.limiter import RateLimiter
from server.settings import Settings

log = logging.getLogger("credscope.auth")


class Security:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        a = settings.auth
        self.store: KeyStore = key_store(a.key_store_url)
        self.verifier = KeyVerifier(self.store, cache_seconds=a.key_cache_seconds, stale_seconds=a.key_stale_seconds)
        self.usage = UsageRecorder(self.store, flush_seconds=a.usage_flush_seconds)
        self.limiter: RateLimiter | None = (RateLimiter.from_settings(settings.rate_limit)
                                            if settings.rate_limit.enabled else None)
        self._gauge_task: asyncio.Task[None] | None = None

    async def count_active_keys(self) -> dict[str, int]:
        """Active keys by tier, from the key store; exported as ``credscope_api_keys_active``."""
        counts = Counter(k.tier for k in await self.store.list_keys(include_revoked=False))
        found = {tier: counts.get(tier, 0) for tier in ("free", "pro", "enterprise")}
        metrics.active_keys(found)
        return found

    async def _keep_key_gauge(self) -> None:
        while True:
            try:
                await self.count_active_keys()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a store outage is handled by the verifier; just retry
                log.debug("active-key count failed: %s", type(e).__name__)
            await asyncio.sleep(max(self.settings.auth.usage_flush_seconds, 1.0))

    async def start(self) -> None:
        await self.store.open()
        if self.limiter is not None:
            self.limiter.open()
        self.usage.start()
        self._gauge_task = asyncio.create_task(self._keep_key_gauge())
        rl = self.settings.rate_limit
        log.info("auth: key store %s, anonymous calls %s; rate limits %s (%s)",
                 db.redact(self.settings.auth.key_store_url),
                 "ALLOWED (dev mode)" if self.settings.auth.allow_anonymous else "refused",
                 f"{rl.free_per_hour}/{rl.pro_per_hour}/{rl.enterprise_per_hour} an hour" if self.limiter else "off",
                 self.limiter.store.name if self.limiter else "-")

    async def close(self) -> None:
        if self._gauge_task is not None:
            self._gauge_task.cancel()
        try:
            await self.usage.close()
        finally:
            try:
                if self.limiter is not None:
                    await self.limiter.close()
            finally:
                await self.store.close()
