"""The audit store in a child process (``server.audit.process``): what the worker sends arrives intact,
errors keep their kind, and a child that dies or hangs loses nothing (the writer spools and replays)."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from server.audit.process import ProcessAuditStore, pack_entries, unpack_entries
from server.audit.records import AuditEntry, PredictionBatch, iso_utc
from server.audit.store import AuditStoreError, to_rows
from server.audit.writer import AuditWriter
from server.settings import AuditSettings
from tests.audit_helpers import eventually, fetch, make_entry
from tests.helpers import ROOT


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'audit.db'}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_entries_survive_packing() -> None:
    weird = [("a", float("nan"), float("inf")), ("b", None, -0.0), ("c", 1e-310, -1.5)]
    entries = [make_entry(1, predictions=3, explanation=weird), make_entry(2, status="INVALID_ARGUMENT"),
               make_entry(3, from_cache=True)]
    entries[0].predictions[1].reason_codes = ["R1", "R2"]
    entries.append(make_entry(4, predictions=3, explanation=weird, columns=True))  # a BatchScore's, by column
    back = unpack_entries(pack_entries(entries))
    assert back[3].batch is not None and not back[3].predictions  # by column: the store shapes its rows so
    back[3].expand()
    entries[3].expand()
    assert [b.usage for b in back] == [e.usage for e in entries]
    for b, e in zip(back, entries, strict=True):
        assert (b.created_at, b.client_name, len(b.predictions)) == (e.created_at, e.client_name, len(e.predictions))
        for pb, pe in zip(b.predictions, e.predictions, strict=True):
            assert pb.row == pe.row or all(x == y or (math.isnan(x) and math.isnan(y))
                                           for x, y in zip(pb.row, pe.row, strict=True))
            assert (pb.request_id, pb.probability, pb.reason_codes, pb.from_cache) == (
                pe.request_id, pe.probability, pe.reason_codes, pe.from_cache)
            assert repr(pb.explanation) == repr(pe.explanation)


def test_a_batch_shaped_by_column_gives_the_rows_of_its_records() -> None:
    """``to_rows`` shapes a PredictionBatch column by column; the rows are those of its records, one by one
    (NaN inputs, reason codes, explanations with missing and infinite values, a duplicate id: first wins)."""
    weird = [("a", float("nan"), float("inf")), ("b", None, -0.0), ("c", 1e-310, -1.5)]
    by_column = [make_entry(1, predictions=5, explanation=weird, columns=True),
                 make_entry(2, predictions=4, columns=True), make_entry(3)]
    batch = by_column[0].batch
    assert batch is not None
    batch.reason_codes = [["R1", "R2"], None, [], None, ["R3"]]  # type: ignore[assignment]
    batch.from_cache = [True, False, True, False, False]  # type: ignore[assignment]
    batch.rows[1, 3] = float("nan")
    by_column[0].predictions = [make_entry(1, predictions=2).predictions[0]]  # "req-1/0" twice: the record first
    by_record = [AuditEntry(e.created_at, e.usage, [*e.predictions, *(e.batch.records() if e.batch else [])],
                            e.client_name) for e in by_column]
    for stamp in (None, iso_utc):
        col, rec = to_rows(by_column, stamp=stamp), to_rows(by_record, stamp=stamp)
        assert repr(col) == repr(rec)  # (repr: NaN compares unequal to itself)
        assert len(col.predictions) == 5 + 4 + 1 and len(col.shap) == 5 * 3 and len(col.usage) == 3
    assert by_column[0].batch is batch  # shaped, not expanded
    batch.decision = batch.decision[:-1]
    with pytest.raises(ValueError, match="different lengths"):
        to_rows(by_column)


async def test_rows_written_by_the_child_equal_the_in_process_ones(tmp_path: Path) -> None:
    """The same entries written in a thread of this process and by the child give the same rows (the child
    shapes a batch's rows by column; the in-process store is given its records, one by one)."""
    expl = [("EXT_SOURCE_MEAN", 0.25, -0.5), ("PAYMENT_RATE", float("inf"), 0.125), ("AGE", None, 0.0625)]
    entries = [make_entry(i, predictions=1 + i % 3, explanation=expl if i % 2 else None, columns=i % 4 == 2)
               for i in range(20)]
    tables = ("predictions", "shap_explanations", "api_usage")
    rows = {}
    by_record = [AuditEntry(e.created_at, e.usage, [*e.predictions, *(e.batch.records() if e.batch else [])],
                            e.client_name) for e in entries]
    assert any(e.batch for e in entries)
    for process in (True, False):
        url = f"sqlite:///{tmp_path / f'audit-{process}.db'}"
        from server.audit.store import open_store

        store = open_store(url, process=process)
        await store.open()
        await store.write(entries if process else by_record)
        await store.close()
        rows[process] = {t: await fetch(url, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}
    assert rows[True] == rows[False]
    assert len(rows[True]["predictions"]) == sum(e.weight - 1 for e in entries)


async def test_errors_keep_their_kind(tmp_path: Path) -> None:
    store = ProcessAuditStore(sqlite_url(tmp_path))
    await store.open()
    try:
        bad = make_entry(1, decision="MAYBE")  # breaks the CHECK constraint: about the data, not the database
        with pytest.raises(AuditStoreError) as refused:
            await store.write([bad])
        assert refused.value.permanent
        await store.write([make_entry(2)])
        assert await store.has_prediction("req-2")
        assert not await store.has_prediction("req-1")
    finally:
        await store.close()


async def test_a_killed_child_is_replaced_and_the_writer_loses_nothing(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    url = sqlite_url(tmp_path)
    settings = AuditSettings(url=url, spool_dir=tmp_path / "spool", batch_size=20, flush_seconds=0.02,
                             retry_seconds=0.1, timeout_seconds=2.0)
    writer = AuditWriter(settings)
    assert isinstance(writer.store, ProcessAuditStore)
    await writer.start()
    try:
        for i in range(50):
            await writer.record(make_entry(i, predictions=5))
        await writer.flush()
        first = writer.store.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for i in range(50, 150):  # some batches meet the dead child: spooled, then replayed
            await writer.record(make_entry(i, predictions=5))
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        await writer.flush()
        await eventually(lambda: _settled(writer))
    finally:
        await writer.close()
    assert writer.store.pid != first
    assert f"audit store process (pid {first})" in caplog.text  # said, not silent
    assert await fetch(url, "SELECT count(*), count(DISTINCT request_id) FROM api_usage") == [(150, 150)]
    assert await fetch(url, "SELECT count(*), count(DISTINCT request_id) FROM predictions") == [(750, 750)]


async def _settled(writer: AuditWriter) -> bool:
    return not writer.spooling and writer.queue_depth == 0


async def test_a_hung_child_times_out_and_is_replaced(tmp_path: Path) -> None:
    store = ProcessAuditStore(sqlite_url(tmp_path), call_timeout=1.0)
    await store.open()
    try:
        hung = store.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(AuditStoreError, match="did not answer"):
                await store.write([make_entry(1)])
            assert time.monotonic() - started < 5
        finally:
            if alive(hung):
                os.kill(hung, signal.SIGCONT)
        await store.write([make_entry(2)])  # a new child
        assert store.pid != hung
        assert await store.has_prediction("req-2")
        await eventually(lambda: _gone(hung), within=10)
    finally:
        await store.close()


async def _gone(pid: int) -> bool:
    return not alive(pid)


async def test_the_url_stays_off_the_command_line_and_the_child_exits_on_close(postgres_dsn: str) -> None:
    from urllib.parse import urlparse

    parts = urlparse(postgres_dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    url = parts._replace(netloc=f"credscope_no_such_role:s3cr3t-pw@{host}").geturl()
    store = ProcessAuditStore(url, timeout=1.0)
    with pytest.raises(AuditStoreError):  # a user that does not exist: refused, and said so
        await store.open()
    pid = store.pid
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")  # noqa: ASYNC240
    assert "s3cr3t" not in cmdline and "postgresql" not in cmdline
    await store.close()
    await eventually(lambda: _gone(pid), within=10)


def test_the_child_stops_when_its_worker_dies(tmp_path: Path) -> None:
    """A worker killed outright: the child sees its stdin close and exits instead of living on."""
    script = textwrap.dedent(f"""
        import asyncio, sys, time
        from server.audit.process import ProcessAuditStore

        async def main():
            store = ProcessAuditStore({sqlite_url(tmp_path)!r})
            await store.open()
            print(store.pid, flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_child_help() -> None:
    out = subprocess.run([sys.executable, "-m", "server.audit.process", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "child process" in out.stdout



async def test_the_child_runs_at_the_niceness_asked(tmp_path: Path) -> None:
    """Below the serving workers' CPU priority by default (``audit.store_process_nice``)."""
    assert AuditSettings().store_process_nice == 10
    store = ProcessAuditStore(sqlite_url(tmp_path), nice=7)
    await store.open()
    try:
        assert store.pid is not None
        assert os.getpriority(os.PRIO_PROCESS, store.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7
    finally:
        await store.close()


@pytest.mark.parametrize("process", [True, False])
async def test_a_batch_that_cannot_be_shaped_is_set_aside_and_the_rest_written(tmp_path: Path, process: bool) -> None:
    """A batch whose columns disagree (no serving path builds one: ``PredictionBatch`` refuses it when built)
    is refused as invalid, set aside in a rejected file even though it cannot be encoded for it, and does not
    stop the writer: the calls around it are written."""
    with pytest.raises(ValueError, match="different lengths"):
        PredictionBatch("x", [0, 1], np.zeros((2, 3)), [0.1], ["APPROVE"] * 2, ["LOW"] * 2, [0.5] * 2, "v", 1.0,
                        [False] * 2, [None] * 2)
    url = sqlite_url(tmp_path)
    settings = AuditSettings(url=url, spool_dir=tmp_path / "spool", batch_size=50, flush_seconds=0.02,
                             retry_seconds=0.1, store_process=process)
    writer = AuditWriter(settings)
    await writer.start()
    try:
        bad = make_entry(1, predictions=3, columns=True)
        assert bad.batch is not None
        bad.batch.decision = bad.batch.decision[:-1]  # (changed after it was built)
        for entry in (make_entry(0), bad, make_entry(2, predictions=4, columns=True)):
            await writer.record(entry)
        await writer.flush()
    finally:
        await writer.close()
    assert writer.counters.entries_rejected == 1
    assert await fetch(url, "SELECT request_id FROM api_usage ORDER BY 1") == [("req-0",), ("req-2",)]
    assert await fetch(url, "SELECT count(*) FROM predictions") == [(1 + 4,)]
    rejected = list((tmp_path / "spool").glob("rejected-*"))
    assert len(rejected) == 1 and b"req-1" in rejected[0].read_bytes()
