"""The audit writer of one worker process: a queue off the calls' critical path, batched writes,
the spool when the database is down, replay when it returns, and a drain at shutdown.

* Calls hand their :class:`AuditEntry` to :meth:`AuditWriter.record`. In ``async`` durability that
  returns at once; in ``sync`` durability it returns once the entry is durable (committed, or fsync'd to
  the spool while the database is down). Concurrent ``sync`` calls share one transaction: while one batch
  commits, the next calls gather and go together (group commit).
* One flusher task writes a batch when it reaches ``batch_size`` rows or when its oldest entry has waited
  ``flush_seconds``, whichever comes first.
* A batch the database cannot take goes to the spool (:mod:`server.audit.spool`). From then on, batches
  keep going to the spool, in order, and every ``retry_seconds`` the writer tries the database; when it
  answers, the spool is replayed (in order, idempotently) before anything new is written directly.
* The queue is bounded (``queue_size`` rows). When it is full, calls wait for room — backpressure, never
  a drop. That happens only if neither the database nor the spool keeps up.
* A batch the database refuses as invalid (a permanent error, not an outage) is retried entry by entry;
  the entries it still refuses are kept in a ``rejected-*.spool`` file and logged.
* :meth:`close` (the server's stop path, on SIGTERM) writes or spools everything queued before it returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server import metrics
from server.audit.records import AuditEntry, entries_from_json, entries_to_json
from server.audit.spool import Spool
from server.audit.store import AuditStore, AuditStoreError, open_store
from server.db import redact
from server.settings import AuditSettings

log = logging.getLogger("credscope.audit")

#: Rows per transaction when replaying the spool.
REPLAY_ROWS = 5_000


class AuditUnavailable(Exception):
    """A ``sync`` call's record could not be made durable in time."""


@dataclass(slots=True)
class _Item:
    entry: AuditEntry | None
    """None for a flush marker."""
    future: asyncio.Future[None] | None = None
    weight: int = 0


@dataclass
class WriterCounters:
    """What the writer did, for metrics and tests."""

    transactions: int = 0
    rows_written: int = 0
    batches_spooled: int = 0
    batches_replayed: int = 0
    entries_rejected: int = 0
    outages: int = 0
    spool_errors: int = 0


class _NotDurable(Exception):
    """Neither the database nor the spool took the batch."""


class AuditWriter:
    def __init__(self, settings: AuditSettings, store: AuditStore | None = None) -> None:
        self.settings = settings
        self.store = store or open_store(settings.url, timeout=settings.timeout_seconds,
                                         pool_size=settings.pool_size, process=settings.store_process,
                                         nice=settings.store_process_nice)
        self.spool = Spool(settings.spool_dir)
        self.sync = settings.durability == "sync"
        self.batch_size = settings.batch_size
        self.counters = WriterCounters()
        self._items: deque[_Item] = deque()
        self._weight = 0
        self._urgent = 0
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._db_ok = False
        self._spool_ok = True
        self._spooling = False
        """Batches go to the spool (the database failed, or the spool holds batches to replay)."""
        self._next_retry = 0.0
        self._spool_reported = True  # report the spool size once at start (0 or what a dead worker left)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database (if it answers) and start the flusher; replays any spool left behind."""
        loop = asyncio.get_running_loop()
        self._spool_ok = await asyncio.to_thread(self.spool.writable)
        try:
            await self.store.open()
            self._db_ok = True
        except AuditStoreError as e:
            self._spooling = True
            self._next_retry = loop.time() + self.settings.retry_seconds
            self.counters.outages += 1
            log.warning("audit database unreachable at start (%s); records are spooled to %s until it answers",
                        e, self.spool.dir)
        if await asyncio.to_thread(self.spool.orphans):
            self._spooling = True
            self._next_retry = 0.0
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def close(self, within: float | None = None) -> None:
        """Write (or spool) everything queued (giving up, loudly, after ``within`` seconds), then release
        the database and the spool."""
        if self._task is None:
            await self.store.close()
            return
        self._closing = True
        self._wake.set()
        timeout = within if within is not None else 3 * self.settings.timeout_seconds + 5
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            log.error("audit writer could not drain in %.0fs: %d record(s) were NOT recorded "
                      "(database and spool both failing)", timeout, self._weight)
        finally:
            self._fail_waiters()
            await asyncio.to_thread(self.spool.close)
            await self.store.close()

    # -- producers --------------------------------------------------------------------------------

    async def record(self, entry: AuditEntry) -> None:
        """Queue an entry (waiting for room if the queue is full); in ``sync`` durability, return only
        once it is durable (raises :class:`AuditUnavailable` past ``sync_timeout_seconds``)."""
        weight = entry.weight
        while self._weight and self._weight + weight > self.settings.queue_size and not self._closing:
            self._space.clear()
            await self._space.wait()
        if not self.sync:
            self._push(_Item(entry, None, weight))
            return
        future = asyncio.get_running_loop().create_future()
        self._push(_Item(entry, future, weight))
        await self._wait(future)

    def record_nowait(self, entry: AuditEntry) -> None:
        """Queue an entry without waiting (for calls being cancelled); may pass the queue bound."""
        self._push(_Item(entry, None, entry.weight))

    async def flush(self) -> None:
        """Return once everything queued before this call is durable."""
        future = asyncio.get_running_loop().create_future()
        self._push(_Item(None, future, 0))
        await self._wait(future)

    async def _wait(self, future: asyncio.Future[None]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(future), self.settings.sync_timeout_seconds)
        except TimeoutError as e:
            raise AuditUnavailable("the audit trail could not record the call in time") from e

    def _push(self, item: _Item) -> None:
        self._items.append(item)
        self._weight += item.weight
        if item.future is not None:
            self._urgent += 1
        self._schedule()

    def _schedule(self) -> None:
        if not self._items:
            return
        if self._urgent or self._weight >= self.batch_size or self._closing:
            self._wake.set()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.settings.flush_seconds, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._wake.set()

    # -- state ------------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """False when nothing can record audits: the database is down and the spool is not writable."""
        return self._db_ok or self._spool_ok

    @property
    def spooling(self) -> bool:
        """Whether recent batches are on disk rather than in the database."""
        return self._spooling

    @property
    def queue_depth(self) -> int:
        """Rows waiting in the queue."""
        return self._weight

    def spool_bytes(self) -> int:
        """Bytes this worker holds in the spool."""
        return self.spool.own_size_bytes()

    # -- the flusher ------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._closing:
                pass  # drain without waiting
            elif self._spooling and not self._items:
                try:  # nothing to write: wake up to try the database again
                    await asyncio.wait_for(self._wake.wait(), max(0.0, self._next_retry - loop.time()))
                except TimeoutError:
                    pass
            else:
                await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._spooling:
                try:
                    await self._recover()
                except Exception:  # noqa: BLE001 - a bug must not stop the writer; the spool stays for later
                    log.exception("audit spool replay failed; retrying in %.1fs", self.settings.retry_seconds)
                    self._next_retry = loop.time() + self.settings.retry_seconds
            if not self._items:
                if self._closing:
                    return
                continue
            batch = self._take()
            try:
                await self._persist([i.entry for i in batch if i.entry is not None])
            except Exception as e:  # noqa: BLE001 - _NotDurable, or a bug: keep the records, retry
                if not isinstance(e, _NotDurable):
                    log.exception("audit batch could not be written; retrying in %.1fs", self.settings.retry_seconds)
                for item in reversed(batch):  # back to the front, in order; try again after a pause
                    self._items.appendleft(item)
                    self._weight += item.weight
                    self._urgent += item.future is not None
                await asyncio.sleep(self.settings.retry_seconds)
                self._wake.set()
                continue
            for item in batch:
                if item.future is not None and not item.future.done():
                    item.future.set_result(None)
            self._report()

    def _report(self) -> None:
        """Queue depth and spool size for the worker's metrics (after every batch)."""
        metrics.audit_queue_depth(self._weight)
        spooled = self.spool.own_size_bytes() if self._spooling or self._spool_reported else 0
        if spooled or self._spool_reported:
            metrics.audit_spool_bytes(spooled)
        self._spool_reported = spooled > 0

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        weight = 0
        while self._items and (not batch or weight + self._items[0].weight <= self.batch_size):
            item = self._items.popleft()
            batch.append(item)
            weight += item.weight
            if item.future is not None:
                self._urgent -= 1
        self._weight -= weight
        self._space.set()
        self._schedule()
        return batch

    async def _persist(self, entries: list[AuditEntry]) -> None:
        if not entries:
            return
        if not self._spooling:
            try:
                await self._write(entries)
                return
            except AuditStoreError as e:
                metrics.audit_write_failed()
                self._outage(e)
        try:
            await asyncio.to_thread(lambda: self.spool.append(entries_to_json(entries)))
        except OSError as e:
            self.counters.spool_errors += 1
            if self._spool_ok:
                log.error("audit spool %s cannot take batches (%s); calls wait until the database or the "
                          "spool works again", self.spool.dir, e)
            self._spool_ok = False
            raise _NotDurable from e
        self._spool_ok = True
        self.counters.batches_spooled += 1

    async def _write(self, entries: Sequence[AuditEntry]) -> None:
        """Write to the database; a batch refused as invalid is retried entry by entry and what is still
        refused is set aside. Raises AuditStoreError for an outage."""
        try:
            await self.store.write(entries)
        except AuditStoreError as e:
            if not e.permanent:
                raise
            for entry in entries:
                try:
                    await self.store.write([entry])
                except AuditStoreError as one:
                    if not one.permanent:
                        raise
                    path = await asyncio.to_thread(self._reject, entry)  # (a batch expands to 1,000 rows)
                    self.counters.entries_rejected += 1
                    log.error("audit record of request %s refused by the database (%s); kept in %s",
                              entry.usage.request_id, one, path)
                else:
                    self._count(1, entry.weight)
            return
        self._count(1, sum(e.weight for e in entries))

    def _reject(self, entry: AuditEntry) -> Path:
        """Set aside an entry the database refuses (in a thread: encoding it is the work). One that cannot even
        be encoded is kept as text, so that it does not stop the writer (it would be retried forever)."""
        try:
            payload = entries_to_json([entry])
        except Exception as e:  # noqa: BLE001 - any failure to encode: keep what can be kept
            payload = json.dumps({"unencodable": f"{type(e).__name__}: {e}", "entry": repr(entry)}).encode()
        return self.spool.reject(payload)

    def _count(self, transactions: int, rows: int) -> None:
        self._db_ok = True
        self.counters.transactions += transactions
        self.counters.rows_written += rows
        metrics.audit_written(rows)

    def _outage(self, error: AuditStoreError) -> None:
        if not self._spooling:
            self.counters.outages += 1
            log.warning("audit database %s unreachable (%s); spooling batches to %s",
                        redact(getattr(self.store, "url", "")), error, self.spool.dir)
        self._db_ok = False
        self._spooling = True
        self._next_retry = asyncio.get_running_loop().time() + self.settings.retry_seconds

    async def _recover(self) -> None:
        """If it is time, try the database; if it answers, replay the spool and go back to direct writes."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_retry:
            return
        replayed = 0
        try:
            await self.store.ping()
            for f in await asyncio.to_thread(self.spool.claim):
                frames = await asyncio.to_thread(lambda f=f: list(self.spool.frames(f)))  # type: ignore[misc]
                chunk: list[AuditEntry] = []
                for payload in frames:
                    try:
                        chunk.extend(entries_from_json(payload))
                    except (ValueError, TypeError, KeyError) as e:  # whole (checksum) but not ours to read
                        path = await asyncio.to_thread(self.spool.reject, payload)
                        log.error("audit spool %s: a batch could not be decoded (%s); kept in %s", f.path.name,
                                  e, path)
                        continue
                    if sum(e.weight for e in chunk) >= REPLAY_ROWS:
                        await self._write(chunk)
                        chunk = []
                if chunk:
                    await self._write(chunk)
                await asyncio.to_thread(self.spool.done, f)
                replayed += len(frames)
        except AuditStoreError as e:
            self._db_ok = False
            self._next_retry = loop.time() + self.settings.retry_seconds
            if replayed:
                log.warning("audit spool replay interrupted after %d batch(es): %s", replayed, e)
            return
        self.counters.batches_replayed += replayed
        self._report()
        self._spooling = False
        self._db_ok = True
        log.info("audit database answers: replayed %d spooled batch(es); writing directly again", replayed)

    def _fail_waiters(self) -> None:
        for item in self._items:
            if item.future is not None and not item.future.done():
                item.future.set_exception(AuditUnavailable("the server stopped before the call was recorded"))
                item.future.exception()  # retrieved: a waiter that already gave up leaves no warning behind
