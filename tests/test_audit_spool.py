"""The audit spool on its own: frames survive a round trip, a torn or corrupt tail is detected and
skipped, files are claimed for replay only when no live writer holds them, and entries round-trip
through the spool encoding (NaN inputs and all)."""

from __future__ import annotations

import fcntl
import math
import os
from pathlib import Path

import pytest

from server.audit.records import entries_from_json, entries_to_json
from server.audit.spool import HEADER, PREFIX, SUFFIX, Spool, encode_frame, read_frames
from tests.audit_helpers import make_entry


def test_frames_round_trip_and_a_torn_tail_is_cut() -> None:
    payloads = [b"[]", b'[{"a":1}]', os.urandom(3000)]
    data = b"".join(encode_frame(p) for p in payloads)
    assert read_frames(data).frames == payloads and read_frames(data).torn_bytes == 0
    for cut in (1, HEADER.size - 1, HEADER.size + 1, len(encode_frame(payloads[2])) - 1):
        r = read_frames(data[:-cut])
        assert r.frames == payloads[:2] and r.torn_bytes == len(encode_frame(payloads[2])) - cut


def test_a_corrupt_frame_ends_the_readable_part() -> None:
    frames = [encode_frame(b"first"), encode_frame(b"second"), encode_frame(b"third")]
    bad = bytearray(b"".join(frames))
    bad[len(frames[0]) + HEADER.size + 2] ^= 0xFF  # flip a byte of the second payload
    r = read_frames(bytes(bad))
    assert r.frames == [b"first"] and r.torn_bytes == len(frames[1]) + len(frames[2])


def test_append_claim_done(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert not spool.has_own() and spool.claim() == []
    spool.append(b"one")
    spool.append(b"two")
    assert spool.has_own() and spool.size_bytes() == 2 * HEADER.size + 6
    (f,) = spool.claim()  # seals the active file: the next append starts a new one
    spool.append(b"three")
    assert list(spool.frames(f)) == [b"one", b"two"]
    spool.done(f)
    assert not f.path.exists()
    (g,) = spool.claim()
    assert list(spool.frames(g)) == [b"three"]
    spool.done(g)
    assert not spool.has_own() and spool.size_bytes() == 0
    spool.close()


def test_files_of_live_writers_are_left_alone_and_orphans_are_taken(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    live, other = Spool(directory), Spool(directory)
    live.append(b"live")
    assert other.claim() == [] and not other.orphans()  # locked by a live writer
    live.close()  # the writer is gone (as after kill -9: its lock is released with its process)
    assert other.orphans()
    (f,) = other.claim()
    assert list(other.frames(f)) == [b"live"]
    other.done(f)
    assert not list(directory.glob(f"{PREFIX}*{SUFFIX}"))


def test_a_crash_mid_append_leaves_a_detectable_tail(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory)
    spool.append(b"whole")
    spool.close()
    (path,) = directory.glob(f"{PREFIX}*{SUFFIX}")
    with path.open("ab") as fh:
        fh.write(encode_frame(b"never acknowledged")[:10])
    reader = Spool(directory)
    (f,) = reader.claim()
    assert list(reader.frames(f)) == [b"whole"]
    reader.done(f)


def test_claimed_files_are_locked(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append(b"x")
    (f,) = spool.claim()
    fd = os.open(f.path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    spool.close()


def test_entries_round_trip_through_the_spool_encoding() -> None:
    entries = [make_entry(1, explanation=[("A", None, 0.5), ("B", 2.0, -0.25)]), make_entry(2, predictions=3),
               make_entry(3, status="INTERNAL"), make_entry(4, predictions=2, columns=True)]
    back = entries_from_json(entries_to_json(entries))
    assert entries[3].batch is None and len(entries[3].predictions) == 2  # expanded to be spooled
    assert [e.usage for e in back] == [e.usage for e in entries]
    assert [e.created_at for e in back] == [e.created_at for e in entries]
    for a, b in zip(back, entries, strict=True):
        assert len(a.predictions) == len(b.predictions)
        for p, q in zip(a.predictions, b.predictions, strict=True):
            assert [math.isnan(v) for v in p.row] == [math.isnan(v) for v in q.row]
            assert [v for v in p.row if not math.isnan(v)] == [v for v in q.row if not math.isnan(v)]
            assert (p.request_id, p.probability, p.decision, p.explanation) == (
                q.request_id, q.probability, q.decision, q.explanation)


def test_own_size_counts_only_this_writers_files(tmp_path: Path) -> None:
    a, b = Spool(tmp_path / "spool"), Spool(tmp_path / "spool")
    a.append(b"12345")
    b.append(b"1")
    assert a.own_size_bytes() == HEADER.size + 5 and b.own_size_bytes() == HEADER.size + 1
    assert a.size_bytes() == 2 * HEADER.size + 6
    a.close()
    b.close()
