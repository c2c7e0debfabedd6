"""The audit spool: where batches wait on disk while the database cannot take them.

Each writer (one per worker process) appends to its own file ``<dir>/audit-<time_ns>-<pid>.spool``,
holding an exclusive ``flock`` on it for as long as the process lives. A file is a sequence of frames::

    b"CSPL" | length (4 bytes, big endian) | crc32 of the payload (4 bytes) | payload (JSON of a batch)

Every append is followed by ``fsync`` (and the directory is fsync'd when a file is created), so a batch
the spool accepted survives a crash of the process or the machine. A crash in the middle of an append
leaves a torn last frame: the reader detects it (short frame or checksum mismatch), reports the bytes it
skips and stops there; that batch was never acknowledged.

Replay goes file by file in creation order and frame by frame in append order. A file is deleted only
after all its batches are committed, and the inserts are idempotent (``ON CONFLICT DO NOTHING``), so a
replay cut short by another failure or crash is simply repeated. Files of a process that died (their
lock is free) are replayed by whichever writer finds them first; files still locked by a live process
are left to it. Batches the database rejects as invalid (not as unreachable) are moved to
``rejected-*.spool`` files, in the same format, for an operator: never dropped, never replayed blindly.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("credscope.audit")

MAGIC = b"CSPL"
HEADER = struct.Struct(">4sII")
SUFFIX = ".spool"
PREFIX = "audit-"
REJECTED_PREFIX = "rejected-"


def encode_frame(payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass
class ReadResult:
    frames: list[bytes]
    torn_bytes: int
    """Bytes after the last whole frame (a torn or corrupt tail); 0 for a clean file."""


def read_frames(data: bytes) -> ReadResult:
    """The whole frames of a spool file's bytes, and how many bytes at the end are not a whole frame."""
    frames: list[bytes] = []
    pos = 0
    n = len(data)
    while pos < n:
        if n - pos < HEADER.size:
            break
        magic, length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if magic != MAGIC or end > n:
            break
        payload = data[pos + HEADER.size:end]
        if zlib.crc32(payload) != crc:
            break
        frames.append(payload)
        pos = end
    return ReadResult(frames, n - pos)


@dataclass
class SpoolFile:
    """A spool file this writer holds the lock of (its own, or one it took over for replay)."""

    path: Path
    fd: int


class Spool:
    """The spool directory of one writer. Not thread-safe: one caller at a time (the writer's flusher)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self._active: SpoolFile | None = None
        self._sealed: list[SpoolFile] = []
        """Own files that no longer take appends, oldest first, waiting for replay."""

    # -- writing ----------------------------------------------------------------------------------

    def append(self, payload: bytes) -> None:
        """Append one batch and fsync it. Raises OSError when the disk cannot take it."""
        if self._active is None:
            self._active = self._create()
        frame = encode_frame(payload)
        fd = self._active.fd
        written = 0
        try:
            while written < len(frame):
                written += os.write(fd, frame[written:])
            os.fsync(fd)
        except OSError:
            # Whatever part of the frame reached the file is a torn tail; start a clean file next time.
            self.seal()
            raise

    def _create(self) -> SpoolFile:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{PREFIX}{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _fsync_dir(self.dir)
        except OSError:
            os.close(fd)
            raise
        return SpoolFile(path, fd)

    def seal(self) -> None:
        """Stop appending to the active file (the next append starts a new one); it stays locked."""
        if self._active is not None:
            self._sealed.append(self._active)
            self._active = None

    def writable(self) -> bool:
        """Whether the spool directory can take files (created if missing)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.dir, os.W_OK | os.X_OK)

    # -- replaying --------------------------------------------------------------------------------

    def claim(self) -> list[SpoolFile]:
        """Seal the active file and lock every spool file to replay, oldest first: this writer's own
        and those of dead processes. Files locked by a live process are left alone."""
        self.seal()
        own = {f.path: f for f in self._sealed}
        out: list[SpoolFile] = []
        for path in sorted(self.dir.glob(f"{PREFIX}*{SUFFIX}")) if self.dir.is_dir() else []:
            if path in own:
                out.append(own[path])
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # replayed and deleted by another writer meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            if not path.exists():  # deleted between our open and our lock
                os.close(fd)
                continue
            f = SpoolFile(path, fd)
            self._sealed.append(f)
            out.append(f)
        return out

    def frames(self, f: SpoolFile) -> Iterator[bytes]:
        data = f.path.read_bytes()
        result = read_frames(data)
        if result.torn_bytes:
            log.warning("audit spool %s: skipping a torn tail of %d byte(s) after %d whole batch(es) "
                        "(a crash during an append; that batch was never acknowledged)",
                        f.path.name, result.torn_bytes, len(result.frames))
        return iter(result.frames)

    def done(self, f: SpoolFile) -> None:
        """Every batch of ``f`` is committed: delete it and release its lock."""
        try:
            f.path.unlink(missing_ok=True)
            _fsync_dir(self.dir)
        finally:
            os.close(f.fd)
            self._sealed = [s for s in self._sealed if s is not f]

    def reject(self, payload: bytes) -> Path:
        """Keep a batch the database refuses as invalid, for an operator (fsync'd, never replayed)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{REJECTED_PREFIX}{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, encode_frame(payload))
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.dir)
        return path

    # -- state ------------------------------------------------------------------------------------

    def has_own(self) -> bool:
        """Whether this writer holds batches on disk (its active or sealed files)."""
        return self._active is not None or bool(self._sealed)

    def orphans(self) -> bool:
        """Whether the directory holds files no live process has locked (left by a dead worker)."""
        if not self.dir.is_dir():
            return False
        mine = {f.path for f in self._sealed} | ({self._active.path} if self._active else set())
        for path in self.dir.glob(f"{PREFIX}*{SUFFIX}"):
            if path in mine:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            else:
                return True
            finally:
                os.close(fd)
        return False

    def size_bytes(self) -> int:
        """Bytes waiting in spool files of this directory (all processes')."""
        if not self.dir.is_dir():
            return 0
        total = 0
        for path in self.dir.glob(f"{PREFIX}*{SUFFIX}"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def own_size_bytes(self) -> int:
        """Bytes in the files this writer holds (its own, and those it took over for replay)."""
        total = 0
        for f in [*self._sealed, *([self._active] if self._active else [])]:
            try:
                total += os.fstat(f.fd).st_size
            except OSError:
                pass
        return total

    def close(self) -> None:
        """Release the locks (files stay on disk for the next writer to replay)."""
        self.seal()
        for f in self._sealed:
            os.close(f.fd)
        self._sealed = []


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
