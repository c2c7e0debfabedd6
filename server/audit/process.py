"""An audit store run in a child process of the worker (``audit.store_process``, on by default).

Why: the audit rows of a call are shaped and inserted off the call's path, but in a thread of the worker
they still hold the worker's GIL for that work (to_rows, binding hundreds of parameters per statement,
asyncpg's COPY encoding on the event loop) and the serving thread waits for it: a BatchScore of 1,000
applicants writes 1,000 rows, ~15 ms of CPU, and the next calls waited for the GIL meanwhile. In a child
process that work runs on its own interpreter (another core when there is one); the worker only packs
the entries into plain tuples and pickles them (~3 µs a row; a BatchScore's records go by column, a
few arrays and lists, ~1 ms for 1,000 applicants all told, and the child shapes their rows by column).

:class:`ProcessAuditStore` is the parent's side: it implements :class:`~server.audit.store.AuditStore` by
forwarding every call (write, ping, the statistics, outcomes, replay lookups, challenger rows) to the
store the child opened from the same URL (``open_store``: SQLite or PostgreSQL), and returns what the
child answers: the result, or the :class:`AuditStoreError` it raised (``permanent`` kept), so the
:class:`~server.audit.writer.AuditWriter`'s rules (spool on an outage, set aside what the database
refuses, group commit, drain) are unchanged. A child that exits or stops answering within
``timeout_seconds`` × 4 + 10 s fails the calls in flight with an (outage) :class:`AuditStoreError` — the
writer spools those batches and replays them, so nothing is lost — and the next call starts a new child.

The child (``python -m server.audit.process``) reads length-prefixed pickled frames on its stdin and
answers on a private copy of its stdout (its stdout itself goes to stderr, the worker's log); the first
frame carries the URL (never the command line, which ``ps`` shows) and the child's CPU priority (``nice``,
``audit.store_process_nice``): on a busy host the serving processes come first and the writes fill the
gaps; if they cannot keep up, the writer's bounded queue makes calls wait (backpressure), as before. It
exits when the worker closes the store or when its stdin reaches end of file (the worker died). Pickle is
safe here: both ends are this worker and the child it started, over pipes nobody else holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle  # nosec B403 - frames between a worker and its own child, over private pipes
import struct
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from server.audit.records import AuditEntry, PredictionBatch, PredictionRecord, UsageRecord
from server.audit.store import AuditedPrediction, AuditStoreError, FeatureStat, OutcomeResult, Stats

log = logging.getLogger("credscope.audit")

_LEN = struct.Struct("<I")
#: Calls the parent forwards (the AuditStore protocol, ``open`` and ``close`` aside).
METHODS = frozenset({"write", "ping", "stats", "top_features", "report_outcome", "has_prediction", "prediction",
                     "write_challenger", "challenger_pairs"})


# --- entries as plain tuples (pickled by C code alone: no per-object reducers) --------------------------

def pack_entries(entries: Sequence[AuditEntry]) -> list[tuple[Any, ...]]:
    """The entries as nested tuples and lists of builtins (a batch's columns as they are: lists, and its
    rows as one array), so the child, not the worker, shapes a batch's rows."""
    out = []
    for e in entries:
        u, b = e.usage, e.batch
        out.append((e.created_at, e.client_name,
                    (u.request_id, u.method, u.status_code, u.duration_ms, u.key_id, u.tier, u.error),
                    [(p.request_id, p.row, p.probability, p.decision, p.risk_level, p.confidence, p.model_version,
                      p.latency_ms, p.from_cache, p.explanation, p.reason_codes) for p in e.predictions],
                    None if b is None else (b.request_id, b.positions, b.rows, b.probability, b.decision,
                                            b.risk_level, b.confidence, b.model_version, b.latency_ms,
                                            b.from_cache, b.reason_codes, b.explanation)))
    return out


def unpack_entries(packed: Sequence[tuple[Any, ...]]) -> list[AuditEntry]:
    """Inverse of :func:`pack_entries` (a batch stays by column: the store shapes its rows that way)."""
    return [AuditEntry(created_at=created, client_name=client, usage=UsageRecord(*usage),
                       predictions=[PredictionRecord(*p) for p in preds],
                       batch=None if batch is None else PredictionBatch(*batch))
            for created, client, usage, preds, batch in packed]


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's object, or None at end of file."""
    try:
        head = await reader.readexactly(_LEN.size)
        data = await reader.readexactly(_LEN.unpack(head)[0])
    except asyncio.IncompleteReadError:
        return None
    return pickle.loads(data)  # noqa: S301  # nosec B301 - written by this worker or its own child, over a private pipe


# --- the parent's side ----------------------------------------------------------------------------

class ProcessAuditStore:
    """An :class:`~server.audit.store.AuditStore` whose database work runs in a child process."""

    def __init__(self, url: str, *, timeout: float = 5.0, pool_size: int = 4, call_timeout: float | None = None,
                 nice: int = 0) -> None:
        self.url = url
        self.nice = nice
        self.timeout = timeout
        self.pool_size = pool_size
        self.call_timeout = 4 * timeout + 10 if call_timeout is None else call_timeout
        """Longest wait for the child's answer to one call before it is presumed hung (and replaced)."""
        self.children_started = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._starting = asyncio.Lock()
        self._closed = False
        self._closing = False

    # -- the child -------------------------------------------------------------------------------

    async def _child(self) -> asyncio.subprocess.Process:
        async with self._starting:
            proc = self._proc
            if proc is not None and proc.returncode is None and self._reader is not None and not self._reader.done():
                return proc
            if proc is not None:
                await self._reap(proc)
            try:  # (the worker's environment, sys.path and working directory: the same `server` package)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "server.audit.process", stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, limit=1 << 20)
            except OSError as e:
                raise AuditStoreError(f"cannot start the audit store process: {e}") from e
            self._proc = proc
            self.children_started += 1
            self._reader = asyncio.create_task(self._read(proc), name="audit-store-reader")
            level = logging.getLogger().getEffectiveLevel()
            self._send(proc, (0, "init", (self.url, self.timeout, self.pool_size, level, self.nice)))
            return proc

    def _send(self, proc: asyncio.subprocess.Process, message: tuple[Any, ...]) -> None:
        assert proc.stdin is not None
        proc.stdin.write(_frame(message))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                msg = await _read_frame(proc.stdout)
                if msg is None:
                    break
                call_id, ok, value = msg
                future = self._pending.pop(call_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    message, permanent = value
                    future.set_exception(AuditStoreError(message, permanent=permanent))
        except Exception as e:  # noqa: BLE001 - an unreadable frame: treat the child as gone
            log.error("audit store process: unreadable answer (%s: %s); starting a new one", type(e).__name__, e)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        finally:
            if not (self._closed or self._closing) and not self._pending:
                log.warning("audit store process (pid %d) is gone; a new one starts with the next call", proc.pid)
            self._fail_pending(proc)

    def _fail_pending(self, proc: asyncio.subprocess.Process) -> None:
        if not self._pending:
            return
        status = proc.returncode
        why = f"exited with status {status}" if status is not None else "stopped answering"
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(AuditStoreError(f"the audit store process {why}"))
                future.exception()  # retrieved: the caller may have given up already
        if not self._closed:
            log.warning("audit store process (pid %d) %s; the calls in flight failed (the writer spools and "
                        "retries)", proc.pid, why)

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)

    async def _call(self, method: str, *args: Any) -> Any:
        if self._closed:
            raise AuditStoreError("the audit store is closed")
        proc = await self._child()
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._send(proc, (call_id, method, args))
            assert proc.stdin is not None
            await asyncio.wait_for(proc.stdin.drain(), self.call_timeout)
            return await asyncio.wait_for(asyncio.shield(future), self.call_timeout)
        except (ConnectionError, BrokenPipeError) as e:
            raise AuditStoreError(f"the audit store process is gone: {e}") from e
        except TimeoutError as e:
            log.error("audit store process did not answer %s within %.0fs; starting a new one", method,
                      self.call_timeout)
            await self._reap(proc)
            raise AuditStoreError(f"the audit store process did not answer within {self.call_timeout:.0f}s") from e
        finally:
            self._pending.pop(call_id, None)

    # -- the AuditStore protocol -------------------------------------------------------------------

    async def open(self) -> None:
        self._closed = False
        await self._call("open")

    async def close(self) -> None:
        proc = self._proc
        if proc is None or self._closed:
            self._closed = True
            return
        self._closing = True
        try:
            if proc.returncode is None:
                await self._call("close")
        except AuditStoreError as e:
            log.warning("audit store process did not close cleanly: %s", e)
        finally:
            self._closed = True
            self._closing = False
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), self.call_timeout)
            except TimeoutError:
                await self._reap(proc)
            if self._reader is not None:
                with contextlib.suppress(Exception):
                    await self._reader

    async def write(self, entries: Sequence[AuditEntry]) -> None:
        await self._call("write", pack_entries(entries))

    async def ping(self) -> None:
        await self._call("ping")

    async def stats(self, start: datetime, end: datetime) -> Stats:
        result: Stats = await self._call("stats", start, end)
        return result

    async def top_features(self, decision: str | None, limit: int) -> list[FeatureStat]:
        result: list[FeatureStat] = await self._call("top_features", decision, limit)
        return result

    async def report_outcome(self, request_id: str, defaulted: bool, observed_at: datetime,
                             reported_at: datetime) -> OutcomeResult:
        result: OutcomeResult = await self._call("report_outcome", request_id, defaulted, observed_at, reported_at)
        return result

    async def has_prediction(self, request_id: str) -> bool:
        return bool(await self._call("has_prediction", request_id))

    async def prediction(self, request_id: str) -> AuditedPrediction | None:
        result: AuditedPrediction | None = await self._call("prediction", request_id)
        return result

    async def write_challenger(self, rows: Sequence[tuple[Any, ...]]) -> None:
        await self._call("write_challenger", list(rows))

    async def challenger_pairs(self, start: datetime, end: datetime) -> list[tuple[Any, ...]]:
        result: list[tuple[Any, ...]] = await self._call("challenger_pairs", start, end)
        return result

    @property
    def pid(self) -> int | None:
        """The child's process id (None before the first call)."""
        return self._proc.pid if self._proc is not None else None


# --- the child --------------------------------------------------------------------------------------

async def _serve(reader: asyncio.StreamReader, out: Any) -> int:
    from server.audit.store import open_store

    store: Any = None
    tasks: set[asyncio.Task[None]] = set()
    closing = asyncio.Event()

    def answer(call_id: int, ok: bool, value: Any) -> None:
        out.write(_frame((call_id, ok, value)))
        out.flush()

    async def run(call_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            if method == "open":
                await store.open()
                result = None
            elif method == "close":
                await store.close()
                closing.set()
                result = None
            elif method == "write":
                try:
                    entries = unpack_entries(args[0])
                except (ValueError, TypeError) as e:  # about the data: refused, not an outage (not retried)
                    raise AuditStoreError(f"the audit entries cannot be read: {type(e).__name__}: {e}",
                                          permanent=True) from e
                result = await store.write(entries)
            elif method in METHODS:
                result = await getattr(store, method)(*args)
            else:
                raise AuditStoreError(f"unknown audit store call {method!r}", permanent=True)
        except AuditStoreError as e:
            answer(call_id, False, (str(e), e.permanent))
        except Exception as e:  # noqa: BLE001 - a bug: report it as an outage (the batch is spooled, not lost)
            log.exception("audit store process: %s failed", method)
            answer(call_id, False, (f"{type(e).__name__}: {e}", False))
        else:
            answer(call_id, True, result)

    while not closing.is_set():
        msg = await _read_frame(reader)
        if msg is None:  # the worker is gone (or closed the pipe): stop
            break
        call_id, method, args = msg
        if method == "init":
            url, timeout, pool_size, level, nice = args
            if nice > 0:
                os.nice(nice)  # the serving processes come first; the queue's bound holds the writes' backlog
            logging.basicConfig(level=level, stream=sys.stderr,
                                format="%(asctime)s %(levelname)s %(name)s [audit store] %(message)s")
            store = open_store(url, timeout=timeout, pool_size=pool_size, process=False, yielding=False)
            continue
        if method == "close":  # after everything sent before it; then the loop ends
            if tasks:
                await asyncio.wait(tasks)
            await run(call_id, method, args)
            continue
        task = asyncio.create_task(run(call_id, method, args))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    if store is not None and not closing.is_set():
        with contextlib.suppress(Exception):
            await store.close()
    return 0


async def _child_main() -> int:
    out = os.fdopen(os.dup(1), "wb")  # the frames' channel; fd 1 itself now points at the log
    os.dup2(2, 1)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    try:
        return await _serve(reader, out)
    finally:
        out.close()


if __name__ == "__main__":
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print("python -m server.audit.process: the audit store's child process, started by a CredScope worker "
              "(audit.store_process); it takes its calls on stdin, not from a terminal.")
        sys.exit(0)
    sys.exit(asyncio.run(_child_main()))
