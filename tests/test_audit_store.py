"""Contract suite of the audit trail: every test runs on SQLite (embedded) and on a real PostgreSQL.

The store (idempotent writes, statistics, top features, outcomes) and the writer over it (batching by
size and time, group commit, flush, spool on an outage and replay, backpressure, drain at close). An
outage is real: PostgreSQL is reached through a TCP proxy that the test stops and restarts; SQLite is
held under an exclusive lock by another connection.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest

from server.audit.records import COLUMN_NAMES, entries_from_json
from server.audit.spool import PREFIX, REJECTED_PREFIX, SUFFIX, read_frames
from server.audit.store import AuditStoreError, OutcomeResult, open_store
from server.audit.writer import AuditWriter
from server.db import sqlite_path
from server.settings import AuditSettings
from tests.audit_helpers import TcpProxy, eventually, fetch, make_entry

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return request.getfixturevalue("postgres_dsn")


@dataclass
class Outage:
    """A database the test can cut off (``down``) and bring back (``up``); ``url`` reaches it."""

    url: str
    admin_url: str
    down: Any
    up: Any


@pytest.fixture(params=BACKENDS)
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'audit.db'}"
        asyncio.run(_create_schema(url))  # before the lock
        holder: dict[str, sqlite3.Connection] = {}

        def down() -> None:
            conn = sqlite3.connect(sqlite_path(url), isolation_level=None, check_same_thread=False)
            conn.execute("BEGIN EXCLUSIVE")
            holder["conn"] = conn

        def up() -> None:
            conn = holder.pop("conn")
            conn.execute("ROLLBACK")
            conn.close()

        yield Outage(url, url, down, up)
        if "conn" in holder:
            up()
        return
    dsn = request.getfixturevalue("postgres_dsn")
    u = urlparse(dsn)
    proxy = TcpProxy(u.hostname or "127.0.0.1", u.port or 5432)
    proxy.start()
    try:
        yield Outage(proxy.url_for(dsn), dsn, proxy.stop, proxy.start)
    finally:
        proxy.close()


async def _create_schema(url: str) -> None:
    s = open_store(url)
    await s.open()
    await s.close()


def settings(url: str, tmp_path: Path, **overrides: Any) -> AuditSettings:
    base: dict[str, Any] = {"url": url, "spool_dir": tmp_path / "spool", "batch_size": 50, "flush_seconds": 0.05,
                            "timeout_seconds": 2.0, "retry_seconds": 0.1}
    base.update(overrides)
    return AuditSettings(**base)


@pytest.fixture(params=[False, True], ids=["in-process", "child-process"])
async def store(url: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    s = open_store(url, process=request.param)
    await s.open()
    yield s
    await s.close()


async def count(url: str, table: str, where: str = "") -> int:
    return (await fetch(url, f"SELECT count(*) FROM {table} {where}"))[0][0]


def spool_files(directory: Path, prefix: str = PREFIX) -> list[Path]:
    return sorted(directory.glob(f"{prefix}*{SUFFIX}")) if directory.is_dir() else []


# --- the store ------------------------------------------------------------------------------------

async def test_write_records_every_row_once(store: Any, url: str) -> None:
    expl = [("EXT_SOURCE_3", 0.5, -0.4), ("AMT_CREDIT", None, 0.2)]
    entries = [make_entry(i, explanation=expl) for i in range(20)]
    entries += [make_entry(100, predictions=3), make_entry(101, status="INVALID_ARGUMENT")]
    await store.write(entries)
    await store.write(entries[5:] + [make_entry(102)])  # a replay overlapping the first batch
    await store.write([make_entry(103), make_entry(103)])  # a duplicate inside one batch
    assert await count(url, "predictions") == 20 + 3 + 2
    assert await count(url, "api_usage") == 20 + 2 + 2
    assert await count(url, "api_usage", "WHERE status_code = 'INVALID_ARGUMENT'") == 1
    assert await count(url, "shap_explanations") == 40
    ids = {r[0] for r in await fetch(url, "SELECT request_id FROM predictions")}
    assert {"req-100/0", "req-100/1", "req-100/2", "req-102", "req-103"} <= ids and "req-101" not in ids

    (rid, key_id, client, method, inp, decision, risk, cache, version), = await fetch(
        url, "SELECT request_id, key_id, client_name, method, input, decision, risk_level, from_cache, "
             "model_version FROM predictions WHERE request_id = 'req-3'")
    doc = json.loads(inp)
    assert sorted(doc) == sorted(COLUMN_NAMES)  # (jsonb keeps no key order)
    row = entries[3].predictions[0].row
    assert [doc[c] for c in COLUMN_NAMES] == [None if math.isnan(v) else v for v in row]
    assert (key_id, client, method, decision, risk, bool(cache), version) == (
        "key-1", "tests", "/credscope.v1.ScoringService/Score", "APPROVE", "VERY_LOW", False, "v-test")
    shap = await fetch(url, "SELECT rank, feature, value, shap_value FROM shap_explanations "
                            "WHERE request_id = 'req-3' ORDER BY rank")
    assert shap == [(1, "EXT_SOURCE_3", 0.5, -0.4), (2, "AMT_CREDIT", None, 0.2)]
    created = (await fetch(url, "SELECT created_at FROM api_usage WHERE request_id = 'req-3'"))[0][0]
    created = created if isinstance(created, datetime) else datetime.fromisoformat(created)
    assert abs(created.timestamp() - entries[3].created_at) < 1e-3


async def test_a_batch_by_column_is_stored_as_its_records(store: Any, url: str) -> None:
    """A BatchScore's records held by column (``PredictionBatch``) leave the same rows, in every store and in the
    child process, as the same records one by one: inputs with missing values, explanations with missing and
    infinite values, reason codes, cache hits; a replay of the batch adds nothing."""
    expl = [("EXT_SOURCE_3", 0.5, -0.4), ("AMT_CREDIT", None, 0.2), ("PAYMENT_RATE", float("inf"), 0.1)]
    at = 1_700_000_000.25
    by_column = [make_entry(i, prefix="col", predictions=4, explanation=expl if i % 2 else None, columns=True,
                            created_at=at, from_cache=i == 2) for i in range(3)]
    by_record = [make_entry(i, prefix="rec", predictions=4, explanation=expl if i % 2 else None, created_at=at,
                            from_cache=i == 2) for i in range(3)]
    for col, rec in zip(by_column, by_record, strict=True):
        assert col.batch is not None
        col.batch.reason_codes = [["R1", "R2"], None, [], None]  # type: ignore[assignment]
        for p, codes in zip(rec.predictions, col.batch.reason_codes, strict=True):
            p.reason_codes = codes
    await store.write(by_column)
    await store.write(by_column[1:])  # replayed: nothing new
    await store.write(by_record)

    async def rows(table: str, prefix: str) -> list[tuple[Any, ...]]:
        found = await fetch(url, f"SELECT * FROM {table} WHERE request_id LIKE '{prefix}-%' ORDER BY 1, 2")
        return [tuple(v.replace(prefix, "x", 1) if isinstance(v, str) and v.startswith(prefix) else v for v in r)
                for r in found]

    for table in ("predictions", "shap_explanations", "api_usage"):
        assert await rows(table, "col") == await rows(table, "rec"), table
    assert len(await rows("predictions", "col")) == 12 and len(await rows("shap_explanations", "col")) == 12


async def test_invalid_rows_are_refused_as_permanent(store: Any, url: str) -> None:
    with pytest.raises(AuditStoreError) as e:
        await store.write([make_entry(1), make_entry(2, decision="MAYBE")])
    assert e.value.permanent
    assert await count(url, "predictions") == 0  # one transaction: nothing of the batch


async def test_stats_over_a_period(store: Any) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    t0 = now.timestamp() - 3600
    rng = np.random.default_rng(3)
    latencies = [float(x) for x in rng.gamma(2.0, 1.5, size=57)]
    entries = []
    for i, lat in enumerate(latencies):
        d, r, p = [("APPROVE", "VERY_LOW", 0.05), ("REVIEW", "MEDIUM", 0.3), ("REJECT", "VERY_HIGH", 0.7)][i % 3]
        entries.append(make_entry(i, created_at=t0 + i, decision=d, risk_level=r, probability=p, latency_ms=lat,
                                  from_cache=i % 4 == 0))
    entries += [make_entry(500 + i, created_at=t0 + i, status="UNAUTHENTICATED") for i in range(4)]
    entries += [make_entry(900, created_at=t0 - 7200, latency_ms=1e6),  # before the period
                make_entry(901, created_at=now.timestamp(), latency_ms=1e6)]  # at its end (exclusive)
    await store.write(entries)
    s = await store.stats(datetime.fromtimestamp(t0, UTC), now)
    assert s.total == 57
    assert s.by_decision == {"APPROVE": 19, "REVIEW": 19, "REJECT": 19}
    assert s.by_risk_level == {"VERY_LOW": 19, "LOW": 0, "MEDIUM": 19, "HIGH": 0, "VERY_HIGH": 19}
    assert s.mean_probability == pytest.approx(np.mean([0.05, 0.3, 0.7]))
    for q in (0.5, 0.95, 0.99):
        assert s.latency_ms[q] == pytest.approx(np.percentile(latencies, q * 100), rel=1e-9)
    assert s.cache_hit_rate == pytest.approx(15 / 57)
    assert s.error_calls == 4
    empty = await store.stats(now + timedelta(hours=1), now + timedelta(hours=2))
    assert empty.total == 0 and empty.latency_ms[0.99] == 0.0 and empty.error_calls == 0


async def test_top_features_by_mean_absolute_shap(store: Any) -> None:
    approve = [("A", 1.0, 0.5), ("B", 2.0, -0.1), ("C", None, 0.05)]
    reject = [("B", 2.0, 0.9), ("A", 1.0, -0.2)]
    await store.write([make_entry(i, explanation=approve) for i in range(3)]
                      + [make_entry(10 + i, decision="REJECT", risk_level="VERY_HIGH", explanation=reject)
                         for i in range(2)]
                      + [make_entry(20)])  # not explained
    top = await store.top_features(None, 10)
    assert [(f.feature, f.count) for f in top] == [("B", 5), ("A", 5), ("C", 3)]
    assert top[0].mean_abs_shap == pytest.approx((3 * 0.1 + 2 * 0.9) / 5)
    assert [f.feature for f in await store.top_features("REJECT", 10)] == ["B", "A"]
    assert [f.feature for f in await store.top_features("APPROVE", 1)] == ["A"]
    assert await store.top_features("REVIEW", 10) == []


async def test_report_outcome(store: Any, url: str) -> None:
    await store.write([make_entry(1), make_entry(2, predictions=2)])
    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    now = datetime.now(UTC)
    assert await store.report_outcome("nope", True, t, now) is OutcomeResult.NOT_FOUND
    assert await store.report_outcome("req-1", True, t, now) is OutcomeResult.RECORDED
    assert await store.report_outcome("req-1", True, t, now) is OutcomeResult.UNCHANGED
    assert await store.report_outcome("req-1", False, t + timedelta(days=1), now) is OutcomeResult.RECORDED
    assert await store.report_outcome("req-2/1", True, t, now) is OutcomeResult.RECORDED
    rows = dict(await fetch(url, "SELECT request_id, defaulted FROM outcomes"))
    assert {k: bool(v) for k, v in rows.items()} == {"req-1": False, "req-2/1": True}
    assert await store.has_prediction("req-2/0") and not await store.has_prediction("req-2")


# --- the writer -----------------------------------------------------------------------------------

async def test_writer_flushes_by_time(url: str, tmp_path: Path) -> None:
    w = AuditWriter(settings(url, tmp_path, batch_size=10_000, flush_seconds=0.05))
    await w.start()
    try:
        await w.record(make_entry(1))
        await eventually(lambda: count(url, "predictions"))
    finally:
        await w.close()


async def test_writer_flushes_by_size(url: str, tmp_path: Path) -> None:
    w = AuditWriter(settings(url, tmp_path, batch_size=10, flush_seconds=3600))
    await w.start()
    try:
        for i in range(4):  # 4 calls of 2 rows each (api_usage + predictions)
            await w.record(make_entry(i))
        await asyncio.sleep(0.2)
        assert await count(url, "api_usage") == 0  # below the size, the hour-long timer holds it
        await w.record(make_entry(4))
        await eventually(lambda: count(url, "api_usage"))
        assert await count(url, "api_usage") == 5
    finally:
        await w.close()


async def test_writer_flush_and_close_drain_the_queue(url: str, tmp_path: Path) -> None:
    w = AuditWriter(settings(url, tmp_path, batch_size=10_000, flush_seconds=3600))
    await w.start()
    await w.record(make_entry(1))
    await w.flush()
    assert await count(url, "predictions") == 1
    for i in range(2, 40):
        await w.record(make_entry(i, predictions=2))
    await w.close()
    assert await count(url, "predictions") == 1 + 38 * 2
    assert await count(url, "api_usage") == 39


async def test_sync_durability_group_commit(url: str, tmp_path: Path) -> None:
    w = AuditWriter(settings(url, tmp_path, durability="sync", flush_seconds=3600))
    await w.start()
    try:
        await asyncio.gather(*(w.record(make_entry(i)) for i in range(60)))
        assert await count(url, "predictions") == 60  # every call returned only after its commit
        assert w.counters.transactions < 60  # concurrent calls shared transactions
    finally:
        await w.close()


async def test_outage_spools_in_order_then_replays_without_duplicates(outage: Outage, tmp_path: Path) -> None:
    s = settings(outage.url, tmp_path, timeout_seconds=0.5)
    w = AuditWriter(s)
    await w.start()
    try:
        for i in range(10):
            await w.record(make_entry(i))
        await w.flush()
        outage.down()
        for i in range(10, 60):
            await w.record(make_entry(i, predictions=1 + i % 3))
            if i % 10 == 0:
                await w.flush()  # several batches in the spool
        await w.flush()
        assert w.spooling and w.healthy()
        frames = [f for p in spool_files(s.spool_dir) for f in read_frames(p.read_bytes()).frames]
        assert len(frames) >= 5
        spooled = [e.usage.request_id for f in frames for e in entries_from_json(f)]
        assert spooled == [f"req-{i}" for i in range(10, 60)]  # in the order recorded, each once
        outage.up()
        await eventually(lambda: _spool_empty(w, s.spool_dir))
        assert not w.spooling and w.counters.batches_replayed == len(frames)
        await w.record(make_entry(60))
    finally:
        await w.close()
    want = 10 + sum(1 + i % 3 for i in range(10, 60)) + 1
    assert await count(outage.admin_url, "predictions") == want
    assert await count(outage.admin_url, "api_usage") == 61


async def _spool_empty(w: AuditWriter, directory: Path) -> bool:
    return not w.spooling and not spool_files(directory)


async def test_spool_left_by_a_stopped_writer_is_replayed_at_start(outage: Outage, tmp_path: Path) -> None:
    s = settings(outage.url, tmp_path, timeout_seconds=0.5)
    outage.down()
    first = AuditWriter(s)
    await first.start()
    for i in range(25):
        await first.record(make_entry(i))
    await first.close()  # the database is down: the queue drains into the spool
    assert spool_files(s.spool_dir)
    outage.up()
    second = AuditWriter(s)
    await second.start()
    try:
        await eventually(lambda: _spool_empty(second, s.spool_dir))
    finally:
        await second.close()
    assert await count(outage.admin_url, "predictions") == 25


async def test_full_queue_waits_instead_of_dropping(outage: Outage, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the spool directory should be")
    s = settings(outage.url, tmp_path, spool_dir=blocked / "spool", batch_size=10, queue_size=10,
                 timeout_seconds=0.5)
    w = AuditWriter(s)
    await w.start()
    try:
        outage.down()
        calls = [asyncio.ensure_future(w.record(make_entry(i))) for i in range(30)]
        await eventually(lambda: _async_value(not w.healthy()))  # database down and spool unusable
        await asyncio.sleep(0.3)
        assert not all(c.done() for c in calls)  # past the bound (5 calls queued, 5 in flight), calls wait
        outage.up()
        await asyncio.wait_for(asyncio.gather(*calls), 20)
        await w.flush()
        assert w.healthy()
    finally:
        await w.close()
    assert await count(outage.admin_url, "predictions") == 30  # nothing was dropped


async def _async_value(v: Any) -> Any:
    return v


async def test_refused_entries_are_set_aside_and_the_rest_written(url: str, tmp_path: Path) -> None:
    s = settings(url, tmp_path)
    w = AuditWriter(s)
    await w.start()
    try:
        for i in range(5):
            await w.record(make_entry(i, decision="MAYBE" if i == 2 else "APPROVE"))
        await w.flush()
    finally:
        await w.close()
    assert await count(url, "api_usage") == 4
    (rejected,) = spool_files(s.spool_dir, REJECTED_PREFIX)
    assert b"req-2" in rejected.read_bytes() and w.counters.entries_rejected == 1
    assert not spool_files(s.spool_dir)


def test_settings_defaults_are_embedded() -> None:
    s = AuditSettings()
    assert s.url.startswith("sqlite:///") and s.durability == "async" and s.queue_size >= s.batch_size


def test_input_document_keeps_every_value() -> None:
    """``predictions.input``: every column by name, missing as null, floats exact (numpy scalars too)."""
    from server.audit.records import PredictionRecord

    values = [float("nan"), -0.0, 1e-300, 1.7976931348623157e308, 0.1, np.float64(123456.789), 365243.0]
    row = (values * len(COLUMN_NAMES))[:len(COLUMN_NAMES)]
    record = PredictionRecord("r", row, 0.1, "APPROVE", "LOW", 0.9, "v", 1.0)
    doc = json.loads(record.input_json())
    assert list(doc) == list(COLUMN_NAMES)
    for name, value in zip(COLUMN_NAMES, row, strict=True):
        assert doc[name] is None if math.isnan(value) else doc[name] == float(value), (name, value, doc[name])


def test_server_request_ids_are_time_ordered_uuids() -> None:
    """Request ids the server makes are UUIDv7 (RFC 9562): unique, and ordered by time, so the audit tables'
    request_id indexes append at their right edge instead of dirtying a random page per row."""
    import time
    import uuid

    from server.context import new_request_id

    before = time.time_ns() // 1_000_000
    ids = [uuid.UUID(new_request_id()) for _ in range(20_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    assert {u.version for u in ids} == {7} and {u.variant for u in ids} == {uuid.RFC_4122}
    stamps = [u.int >> 80 for u in ids]
    assert stamps == sorted(stamps) and before <= stamps[0] and stamps[-1] <= after
