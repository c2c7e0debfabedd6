"""Per-key usage counters for AdminService.GetApiKeyStats and ``credscope-keys usage``, off the hot path.

The rate-limit interceptor calls :meth:`UsageRecorder.record` (a dict increment); a background task adds
the counts to ``api_key_usage`` (key, hour) rows of the key store every ``auth.usage_flush_seconds``, in one
batch, and at shutdown. Every worker adds its own counts, so the table holds the sum over workers and
replicas. If the store is down the counts wait in memory for the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from server.auth.store import HOUR, KeyStore, KeyStoreError, UsageRow, hour_start

log = logging.getLogger("credscope.auth")


class UsageRecorder:
    def __init__(self, store: KeyStore, *, flush_seconds: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.flush_seconds = flush_seconds
        self.clock = clock
        self._counts: dict[tuple[str, str, int], list[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def record(self, key_id: str, tier: str, *, rate_limited: bool) -> None:
        """Count one call (and whether the rate limit refused it)."""
        k = (key_id, tier, hour_start(self.clock()))
        c = self._counts.get(k)
        if c is None:
            c = self._counts[k] = [0, 0]
        c[0] += 1
        if rate_limited:
            c[1] += 1

    async def flush(self) -> None:
        """Write the counts gathered since the last flush (kept for the next one if the store fails)."""
        if not self._counts:
            return
        counts, self._counts = self._counts, {}
        rows = [UsageRow(k[0], k[1], k[2], v[0], v[1]) for k, v in counts.items()]
        try:
            await self.store.add_usage(rows)
        except KeyStoreError as e:
            for k, v in counts.items():
                c = self._counts.setdefault(k, [0, 0])
                c[0] += v[0]
                c[1] += v[1]
            if not self._failing:
                self._failing = True
                log.error("cannot write API-key usage counts (%s); keeping them for the next flush", e)
            return
        if self._failing:
            self._failing = False
            log.warning("API-key usage counts are written again")

    async def usage_24h(self) -> list[UsageRow]:
        """Counts per key over the current hour and the 23 before it (this worker's pending counts first
        flushed), i.e. over the last 23 to 24 hours."""
        await self.flush()
        return await self.store.usage_since(hour_start(self.clock()) - 23 * HOUR)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            await self.flush()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="credscope-usage-flush")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
