"""Host-local buckets, exact across the worker processes of one host: a shared-memory table in a file.

The file (``rate_limit.local_path``) is a fixed open-addressing hash table ``mmap``-ed by every worker;
each take runs under an exclusive POSIX record lock (``fcntl.lockf``) on it, so read-refill-write is atomic
across processes and workers that share the file allow exactly the limit between them. The lock is per
process (workers forked with the file already open still exclude each other), and the kernel drops it if a
worker dies. One take costs a few microseconds (two lock syscalls, a hash and a slot read/write), no I/O:
the pages live in the page cache and the kernel writes them back lazily; the state survives restarts.

Slot: 16-byte BLAKE2b digest of the subject, tokens, last update, and the time the bucket is full again.
A full bucket is the same as no bucket, so slots past that time are reused; when every slot of a probe run
holds a live bucket (more active keys than ``rate_limit.local_slots``), the fullest is evicted and that
subject starts again from a full bucket — counted in ``evictions`` and logged once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from server.ratelimit.buckets import BucketStoreError, Decision, decide, refill

log = logging.getLogger("credscope.ratelimit")

MAGIC = b"CSRLBKT1"
HEADER = struct.Struct("<8sII")  # magic, slots, slot size
SLOT = struct.Struct("<16sddd")  # subject digest, tokens, updated, full_at
EMPTY = bytes(16)
MAX_PROBE = 32


class LocalBucketStore:
    name = "local"

    def __init__(self, path: Path | str, *, slots: int = 65536, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.slots_wanted = slots
        self.clock = clock
        self.evictions = 0
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._slots = 0
        self._thread_lock = threading.Lock()

    def open(self) -> None:
        """Create or attach to the table file (call in the worker process)."""
        if self._mm is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise BucketStoreError(f"cannot open the rate-limit table {self.path}: {e.strerror}") from e
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size < HEADER.size:
                    total = HEADER.size + self.slots_wanted * SLOT.size
                    os.ftruncate(fd, total)
                    os.pwrite(fd, HEADER.pack(MAGIC, self.slots_wanted, SLOT.size), 0)
                    size = total
                magic, slots, slot_size = HEADER.unpack(os.pread(fd, HEADER.size, 0))
                if magic != MAGIC or slot_size != SLOT.size or size < HEADER.size + slots * SLOT.size:
                    raise BucketStoreError(f"{self.path} is not a CredScope rate-limit table; remove it or set "
                                           "rate_limit.local_path to another file")
                self._mm = mmap.mmap(fd, HEADER.size + slots * SLOT.size)
                self._slots = slots
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if slots != self.slots_wanted:
            log.info("rate-limit table %s has %d slots (kept; remove the file to resize)", self.path, slots)

    async def take(self, subject: str, capacity: int, period_seconds: float, cost: int) -> Decision:
        return self.take_now(subject, capacity, period_seconds, cost)

    def take_now(self, subject: str, capacity: int, period_seconds: float, cost: int) -> Decision:
        """The take, synchronously (it never blocks longer than another worker's take)."""
        if self._mm is None:
            self.open()
        mm = self._mm
        assert mm is not None
        digest = hashlib.blake2b(subject.encode("utf-8"), digest_size=16).digest()
        base = int.from_bytes(digest[:8], "little") % self._slots
        rate = capacity / period_seconds
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                now = self.clock()
                found = reuse = victim = -1
                victim_full_at = float("inf")
                for i in range(min(MAX_PROBE, self._slots)):
                    off = HEADER.size + ((base + i) % self._slots) * SLOT.size
                    d, tokens, updated, full_at = SLOT.unpack_from(mm, off)
                    if d == digest:
                        found = off
                        break
                    if d == EMPTY:
                        if reuse < 0:
                            reuse = off
                        break
                    if full_at <= now and reuse < 0:
                        reuse = off
                    if full_at < victim_full_at:
                        victim, victim_full_at = off, full_at
                if found >= 0:
                    tokens = refill(tokens, updated, now, capacity, rate)
                    off = found
                else:
                    if reuse < 0:
                        reuse = victim
                        self._evicted()
                    off, tokens, updated = reuse, float(capacity), now
                decision, left = decide(tokens, capacity, rate, cost)
                SLOT.pack_into(mm, off, digest, left, max(now, updated), now + decision.reset_seconds)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
        return decision

    def _evicted(self) -> None:
        self.evictions += 1
        if self.evictions == 1:
            log.warning("rate-limit table %s is full: evicting the fullest buckets (raise rate_limit.local_slots)",
                        self.path)

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
