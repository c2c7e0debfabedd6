"""Helpers of the audit tests: a loopback TCP proxy to cut a database off and bring it back, audit
entries to write, and plain queries against either database."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import numpy as np

from server.audit.records import AuditEntry, PredictionBatch, PredictionRecord, UsageRecord
from server.db import dialect, sqlite_path
from server.schema import COLUMNS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target, from an event loop in a thread of its own. ``stop`` closes
    the listener and every open connection (the database looks gone: refused, reset); ``start`` brings it
    back on the same port."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> None:
        async def start() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        self._call(start())

    def stop(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                self.server.close()
                self.server = None
            for w in list(self.writers):
                w.transport.abort()
            self.writers.clear()

        self._call(stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    def url_for(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the proxy's."""
        u = urlparse(dsn)
        netloc = (f"{u.username}@" if u.username else "") + f"127.0.0.1:{self.port}"
        return u._replace(netloc=netloc).geturl()


def make_entry(i: int, *, prefix: str = "req", created_at: float | None = None, decision: str = "APPROVE",
               risk_level: str = "VERY_LOW", probability: float = 0.05, latency_ms: float = 1.0,
               from_cache: bool = False, predictions: int = 1, status: str = "OK",
               explanation: list[tuple[str, float | None, float]] | None = None, columns: bool = False) -> AuditEntry:
    """An audit entry of call ``i``: one prediction (or ``predictions`` of a batch: ids ``<id>/<k>``, held by
    column in a :class:`PredictionBatch` when ``columns``, as BatchScore leaves them)."""
    rid = f"{prefix}-{i}"
    row = [float(k % 3) if k % 5 else float("nan") for k in range(len(COLUMNS))]
    preds = []
    if status == "OK":
        ids = [rid] if predictions == 1 else [f"{rid}/{k}" for k in range(predictions)]
        preds = [PredictionRecord(request_id=pid, row=row, probability=probability, decision=decision,
                                  risk_level=risk_level, confidence=0.5, model_version="v-test",
                                  latency_ms=latency_ms, from_cache=from_cache, explanation=explanation)
                 for pid in ids]
    method = "/credscope.v1.ScoringService/" + ("Score" if predictions == 1 else "BatchScore")
    usage = UsageRecord(request_id=rid, method=method, status_code=status, duration_ms=latency_ms + 0.1,
                        key_id="key-1", tier="pro", error=None if status == "OK" else "bad applicant")
    batch = None
    if columns and preds:
        batch = PredictionBatch(rid, list(range(len(preds))), np.array([p.row for p in preds]),
                                [p.probability for p in preds], [p.decision for p in preds],
                                [p.risk_level for p in preds], [p.confidence for p in preds], "v-test", latency_ms,
                                [p.from_cache for p in preds], [p.reason_codes for p in preds],
                                None if explanation is None else [p.explanation for p in preds])
        preds = []
    return AuditEntry(created_at=time.time() if created_at is None else created_at, usage=usage,
                      predictions=preds, client_name="tests", batch=batch)


async def fetch(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query (no parameters) on either database, through a connection of its own."""
    if dialect(url) == "sqlite":
        def run() -> list[tuple[Any, ...]]:
            conn = sqlite3.connect(sqlite_path(url), timeout=30)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()

        return await asyncio.to_thread(run)
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def eventually(check: Callable[[], Any], *, within: float = 20.0, interval: float = 0.05) -> Any:
    """Await ``check()`` until it returns a truthy value (returned); AssertionError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {within}s (last: {result!r})")
        await asyncio.sleep(interval)
