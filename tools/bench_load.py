"""The bench's load generator: several processes, each running grpc.aio calls with raw request bytes.

Requests are serialized once, before the run (the generator sends bytes and reads bytes: no protobuf
work on the client side), so the client's CPU goes to gRPC alone; that matters on a 2-core host where
the generator and the server share the cores. Each process opens its own channels (a local subchannel
pool, so each is its own TCP connection): SO_REUSEPORT spreads connections, not calls, over the
server's workers, so calls go round a process's channels, one after the other (like grpc's round_robin
policy over several subchannels). With one channel per call in flight, as before, four connections over
two workers landed 3-1 in some runs (here: 1,300 instead of 1,700 Score calls/s, the same code); with
calls spread over 4 channels per process the runs' spread shrank to ~10%.

A run is bounded by time and by count: each process warms up for ``warmup`` seconds (results thrown
away), waits for the others at a barrier, then calls until ``duration`` seconds have passed or it has
sent its share of ``max_requests``. With ``unique=True`` every measured call sends a payload of its
own (no payload is sent twice, so a cache cannot answer it) and the run also ends when they run out.

Two ways to load the server. *Closed loop* (the default): ``concurrency`` calls in flight, each sent as the
one before it returns; the server sets the pace, so a level that keeps both cores busy measures latency at
saturation. *Open loop* (``rate`` set): calls go out at a fixed offered rate with random (Poisson)
arrivals, whatever the server does, up to ``concurrency`` calls in flight (a call due while every slot is
taken waits for one, and that wait counts in its latency); this is how a fixed share of the server's
capacity is measured (the bench's "moderate load"). A call's latency runs from its arrival time, less at
most 1 ms of lateness in sending it (asyncio's timers wake to the millisecond: that slack is the
generator's, not the server's); a wait for a free slot counts in full, and a call that ran out of time
counts with the time it took. An open-loop run sends until ``duration`` is up: arrivals due before then but
not sent (the server, or the generator, fell behind) are counted as ``NOT_SENT`` errors, not dropped.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import random
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LoadResult", "LoadSpec", "run_load"]

NOT_SENT = "due before the end of the run but not sent (the server or the generator was behind)"


@dataclass
class LoadSpec:
    """What to send, to whom, how hard and for how long."""

    target: str
    method: str
    """Full method path, e.g. ``/credscope.v1.ScoringService/Score``."""
    payloads: list[bytes]
    """Serialized requests for the measured phase (process ``p`` of ``P`` sends ``payloads[p::P]``)."""
    warmup_payloads: list[bytes] | None = None
    """Requests for the warm-up (default: ``payloads``)."""
    unique: bool = False
    """Send every measured payload at most once (cache-miss runs)."""
    concurrency: int = 8
    """Calls in flight at once, over all processes."""
    processes: int = 2
    channels_per_process: int = 2
    duration: float = 3.0
    warmup: float = 1.0
    max_requests: int = 1_000_000
    metadata: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0
    """Deadline of each call, in seconds."""
    rate: float | None = None
    """Open loop: calls per second over all processes (Poisson arrivals), at most ``concurrency`` in flight.
    None: closed loop, ``concurrency`` calls in flight."""
    seed: int = 20261203


@dataclass
class LoadResult:
    """What a run measured (latencies in milliseconds)."""

    requests: int
    errors: int
    seconds: float
    rps: float
    p50: float
    p90: float
    p99: float
    mean: float
    max: float
    error_codes: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None
    concurrency: int = 0
    processes: int = 0
    server_cpu_us: float | None = None
    """Server CPU time (all its processes) per measured call, in microseconds, when the caller measured it."""
    rate: float | None = None
    """The offered rate (calls/s) of an open-loop run; ``rps`` is what the server answered."""

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _share(n: int, parts: int, index: int) -> int:
    return n // parts + (1 if index < n % parts else 0)


async def _drive(spec: LoadSpec, index: int, barrier: Any, started: Any) -> dict[str, Any]:
    import grpc

    procs = spec.processes
    conc = max(1, _share(spec.concurrency, procs, index))
    mine = spec.payloads[index::procs]
    warm = (spec.warmup_payloads or spec.payloads)[index::procs] or mine
    quota = _share(spec.max_requests, procs, index)
    if spec.unique:
        quota = min(quota, len(mine))
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20),
               ("grpc.max_send_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(spec.target, options=[*options, ("credscope.bench.channel", i)])
                for i in range(max(1, spec.channels_per_process))]
    calls = [ch.unary_unary(spec.method) for ch in channels]
    md = spec.metadata or None
    errors: Counter[str] = Counter()
    first_error: list[str] = []
    lat = array("d")
    state = {"next": 0}

    def failed(name: str, detail: str, count: int = 1) -> None:
        errors[name] += count
        if not first_error:
            first_error.append(f"{name}: {detail}")

    async def worker(payloads: list[bytes], until: float, limit: int, record: bool) -> None:
        n = len(payloads)
        k = len(calls)
        while True:
            i = state["next"]
            if i >= limit or time.perf_counter() >= until:
                return
            state["next"] = i + 1
            t0 = time.perf_counter()
            try:  # calls go round the channels (like grpc's round_robin policy over several subchannels)
                await calls[i % k](payloads[i % n], timeout=spec.timeout, metadata=md)
            except grpc.aio.AioRpcError as e:
                if record:
                    failed(e.code().name, str(e.details()))
                continue
            if record:
                lat.append(time.perf_counter() - t0)

    async def paced(payloads: list[bytes], start: float, until: float, limit: int, record: bool) -> None:
        """Open loop: calls at Poisson arrivals of ``rate / processes`` per second, at most ``conc`` in flight,
        sent until ``until`` (arrivals due before then but not sent by then are counted as NOT_SENT errors)."""
        assert spec.rate is not None
        rng = random.Random(spec.seed * 1000 + index)
        per_second = spec.rate / procs
        slots = asyncio.Semaphore(conc)
        n, k = len(payloads), len(calls)
        running: set[asyncio.Task[None]] = set()

        async def one(i: int, ready: float) -> None:
            try:
                await calls[i % k](payloads[i % n], timeout=spec.timeout, metadata=md)
            except grpc.aio.AioRpcError as e:
                if record:
                    failed(e.code().name, str(e.details()))
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # the slowest calls stay in the percentiles
                        lat.append(time.perf_counter() - ready)
            except Exception as e:  # noqa: BLE001 - any other failure is counted too, never lost
                if record:
                    failed(type(e).__name__, str(e))
            else:
                if record:
                    lat.append(time.perf_counter() - ready)
            finally:
                slots.release()

        due, i = start, 0
        while i < limit:
            due += rng.expovariate(per_second)
            if due >= until:
                break
            now = time.perf_counter()
            if now >= until:  # behind at the end: what was due and not sent is counted, not dropped
                if record:
                    left = 1
                    while i + left < limit and (due := due + rng.expovariate(per_second)) < until:
                        left += 1
                    failed("NOT_SENT", NOT_SENT, left)
                break
            if due > now:
                await asyncio.sleep(due - now)
            # A call is ready when it was due; the timer's slack (asyncio sleeps to the millisecond) is the
            # generator's, so up to 1 ms of lateness is left out and the rest (a busy generator) counts.
            ready = min(time.perf_counter(), due + 0.001)
            try:  # every slot taken: the server is behind, and the wait is part of the latency
                await asyncio.wait_for(slots.acquire(), max(until - time.perf_counter(), 0.001))
            except TimeoutError:  # the end came while this call waited for a slot
                if record:
                    failed("NOT_SENT", NOT_SENT)
                continue
            task = asyncio.ensure_future(one(i, ready))
            running.add(task)
            task.add_done_callback(running.discard)
            i += 1
        if running:
            await asyncio.gather(*running)

    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), timeout=10)
        if spec.warmup > 0 and warm:
            state["next"] = 0
            now = time.perf_counter()
            if spec.rate:  # warmed up at the measured rate (not at every slot in flight)
                await paced(warm, now, now + spec.warmup, 1 << 62, False)
            else:
                await asyncio.gather(*(worker(warm, now + spec.warmup, 1 << 62, False) for _ in range(conc)))
        await asyncio.to_thread(barrier.wait, 60)
        if index == 0:
            started.put((index, {"started": True}))
        state["next"] = 0
        start = time.perf_counter()
        if spec.rate:
            await paced(mine, start, start + spec.duration, quota, True)
        else:
            await asyncio.gather(*(worker(mine, start + spec.duration, quota, True) for _ in range(conc)))
        stop = time.perf_counter()
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return {"lat": lat.tobytes(), "errors": dict(errors), "first_error": first_error[0] if first_error else None,
            "start": start, "stop": stop}


def _process(spec: LoadSpec, index: int, barrier: Any, out: Any) -> None:
    try:
        out.put((index, asyncio.run(_drive(spec, index, barrier, out))))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the run
        try:
            barrier.abort()
        finally:
            out.put((index, {"fatal": f"{type(e).__name__}: {e}"}))


def run_load(spec: LoadSpec, on_start: Callable[[], None] | None = None) -> LoadResult:
    """Run ``spec`` with ``spec.processes`` processes; return the merged result. ``on_start`` is called
    when the measured phase starts (after the warm-up), e.g. to read the server's CPU time."""
    if not spec.payloads:
        raise ValueError("no payloads to send")
    if spec.rate is not None and not spec.rate > 0:
        raise ValueError(f"the offered rate must be > 0 calls/s, got {spec.rate}")
    ctx = multiprocessing.get_context("fork")  # the payload lists are shared copy-on-write
    barrier = ctx.Barrier(spec.processes)
    out = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(spec, i, barrier, out), name=f"bench-load-{i}", daemon=True)
             for i in range(spec.processes)]
    for p in procs:
        p.start()
    results: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + spec.warmup + spec.duration + spec.timeout + 90
    try:
        while len(results) < len(procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the load generator did not finish in time")
            try:
                index, res = out.get(timeout=min(left, 1.0))
            except Exception:  # noqa: BLE001 - queue.Empty; check the processes are alive
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"load process {dead[0].name} died with status {dead[0].exitcode}") from None
                continue
            if "fatal" in res:
                raise RuntimeError(f"load process {index} failed: {res['fatal']}")
            if "started" in res:
                if on_start is not None:
                    on_start()
                continue
            results[index] = res
    finally:
        for p in procs:
            p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join(5)
    lat = np.concatenate([np.frombuffer(r["lat"], dtype=np.float64) for r in results.values()]) * 1000.0
    errors: Counter[str] = Counter()
    for r in results.values():
        errors.update(r["errors"])
    first = next((r["first_error"] for r in results.values() if r["first_error"]), None)
    seconds = max(r["stop"] for r in results.values()) - min(r["start"] for r in results.values())
    n = len(lat)

    def pct(q: float) -> float:
        return float(np.percentile(lat, q)) if n else math.nan

    return LoadResult(requests=n, errors=sum(errors.values()), seconds=seconds,
                      rps=n / seconds if seconds > 0 else math.nan, p50=pct(50), p90=pct(90), p99=pct(99),
                      mean=float(lat.mean()) if n else math.nan, max=float(lat.max()) if n else math.nan,
                      error_codes=dict(errors), first_error=first, concurrency=spec.concurrency,
                      processes=spec.processes, rate=spec.rate)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
