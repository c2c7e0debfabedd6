"""Prometheus metrics of a server worker, and one small function to record each.

Every worker process records into prometheus-client's multiprocess directory
(``PROMETHEUS_MULTIPROC_DIR``, from the ``telemetry.metrics_dir`` setting; :mod:`server.main` sets it
before prometheus-client is imported); the telemetry sidecar (``credscope-telemetry``) sums the files
of all workers into one ``/metrics``. Without a metrics directory the metrics stay in the process's
default registry (nothing serves them).

Names follow the Prometheus conventions: ``credscope_`` prefix, base units (seconds, bytes), ``_total``
for counters. Labels are bounded sets (method, status code, decision, risk level, tier, cache name,
feature); never a key, a request id or applicant data.

Hooks for the components built on other branches (cache, rate limit, key store, audit) are the
``cache_*``, ``ratelimit_*``, ``active_keys`` and ``audit_*`` functions below.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter as _Tally
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("credscope.metrics")

#: RPC latency buckets (seconds): dense below 5 ms, where the service's targets are (p50 <= 1 ms).
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025,
               0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Model run latency buckets (seconds): one row takes ~20 us, 1,000 rows a few ms.
INFERENCE_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                     0.025, 0.05, 0.1, 0.25, 1.0)
#: Default probability buckets, with the policy's thresholds (0.10, 0.20, 0.35, 0.50) as bounds.
PROBABILITY_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# --- calls ---------------------------------------------------------------------------------------
RPC_REQUESTS = Counter("credscope_grpc_requests_total", "gRPC calls handled, by service, method and status code.",
                       ["service", "method", "code"])
RPC_DURATION = Histogram("credscope_grpc_request_duration_seconds",
                         "Time to handle a gRPC call (whole interceptor chain), by service, method and status code.",
                         ["service", "method", "code"], buckets=RPC_BUCKETS)
TIER_REQUESTS = Counter("credscope_api_key_requests_total", "gRPC calls made with an API key, by the key's tier.",
                        ["tier"])

# --- predictions ---------------------------------------------------------------------------------
PREDICTIONS = Counter("credscope_predictions_total", "Applicants scored by the model, by decision and risk level.",
                      ["decision", "risk_level"])
PROBABILITY = Histogram("credscope_default_probability", "Predicted default probabilities of scored applicants.",
                        buckets=PROBABILITY_BUCKETS)
INFERENCE_DURATION = Histogram("credscope_inference_duration_seconds",
                               "Time of one model run (onnxruntime), single applicants and batches alike.",
                               buckets=INFERENCE_BUCKETS)
INFERENCE_ROWS = Counter("credscope_inference_rows_total", "Rows run through the model.")
MODEL_LOADED = Gauge("credscope_model_loaded", "1 for the model version a worker serves, 0 for one it served before.",
                     ["version"], multiprocess_mode="livemax")
PREDICTION_ERRORS = Counter("credscope_prediction_errors_total",
                            "Scoring calls or batch applicants that got no prediction, by error type "
                            "(the status code in lower case, e.g. invalid_argument, internal, unavailable).",
                            ["type"])

# --- cache (hooks for the cache component) -------------------------------------------------------
CACHE_HITS = Counter("credscope_cache_hits_total", "Cache look-ups that found an entry, by cache.", ["cache"])
CACHE_MISSES = Counter("credscope_cache_misses_total", "Cache look-ups that found nothing, by cache.", ["cache"])
CACHE_ERRORS = Counter("credscope_cache_errors_total",
                       "Cache operations that failed (the call went on uncached), by cache.", ["cache"])

# --- rate limits and keys (hooks for the security components) -----------------------------------
RATELIMIT_REJECTIONS = Counter("credscope_ratelimit_rejections_total", "Calls refused by the rate limiter, by tier.",
                               ["tier"])
RATELIMIT_FALLBACKS = Counter("credscope_ratelimit_fallbacks_total",
                              "Rate-limit decisions taken on the local buckets because the shared store failed.")
ACTIVE_KEYS = Gauge("credscope_api_keys_active", "API keys that are neither revoked nor expired, by tier.",
                    ["tier"], multiprocess_mode="livemax")

# --- hardening: failed authentication, throttled peers, expired deadlines ------------------------
AUTH_FAILURES = Counter("credscope_auth_failures_total", "Calls refused by authentication (missing, invalid or "
                        "revoked key; admin RPC without the admin flag), by ErrorInfo reason.", ["reason"])
AUTH_THROTTLED = Counter("credscope_auth_throttled_total", "Calls refused without a key check because their "
                         "client address failed authentication too often (brute-force slowing).")
DEADLINE_EXPIRED = Counter("credscope_deadline_expired_total", "Calls ended with DEADLINE_EXCEEDED before a stage "
                           "ran, because their deadline had passed (stage: scoring, explanation).", ["stage"])

# --- audit (hooks for the audit component) ------------------------------------------------------
AUDIT_QUEUE = Gauge("credscope_audit_queue_depth", "Audit records waiting to be written (summed over workers).",
                    multiprocess_mode="livesum")
AUDIT_SPOOL = Gauge("credscope_audit_spool_bytes", "Bytes of audit batches spooled on disk while the database "
                    "is unreachable (summed over workers).", multiprocess_mode="livesum")
AUDIT_WRITTEN = Counter("credscope_audit_records_written_total", "Audit records committed to the database.")
AUDIT_FAILURES = Counter("credscope_audit_write_failures_total", "Audit batch writes that failed (then spooled).")

# --- process (the multiprocess mode has no default process collector) ---------------------------
WORKERS = Gauge("credscope_server_workers", "Live server worker processes.", multiprocess_mode="livesum")
RSS = Gauge("credscope_process_resident_memory_bytes", "Resident memory of a server worker, by pid.",
            multiprocess_mode="liveall")
CPU = Counter("credscope_process_cpu_seconds_total", "CPU time (user + system) of the server workers.")

#: Status codes that a scoring call may end with and that count as a prediction error (auth and rate
#: limit refusals are counted by their own metrics; a caller's cancellation is no error of ours).
_NOT_PREDICTION_ERRORS = frozenset({"OK", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "CANCELLED"})
_SCORING_METHODS = frozenset({"Score", "BatchScore", "ScoreStream"})


@lru_cache(maxsize=256)
def split_method(full_method: str) -> tuple[str, str]:
    """``/credscope.v1.ScoringService/Score`` -> ``("credscope.v1.ScoringService", "Score")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


# --- the write buffer -------------------------------------------------------------------------------
# In multiprocess mode every increment takes a lock, checks the pid and writes the mmapped file (a few
# microseconds; a call records six or seven values). Calls append (metric, amount) pairs to a deque
# instead (thread-safe, ~0.1 us), and :func:`flush` adds them up and writes each series once: from the
# worker's background task every FLUSH_SECONDS, and inline once the buffer is FLUSH_ITEMS long or older
# than FLUSH_SECONDS (so a process without the background task stays bounded and current).

FLUSH_SECONDS = 0.25
FLUSH_ITEMS = 4096
_INC, _OBSERVE, _OBSERVE_MANY = 0, 1, 2
_pending: deque[tuple[Any, Any, int]] = deque()
_last_flush = [time.monotonic()]


def _record(metric: Any, amount: Any, kind: int) -> None:
    _pending.append((metric, amount, kind))
    if len(_pending) >= FLUSH_ITEMS or time.monotonic() - _last_flush[0] >= FLUSH_SECONDS:
        flush()


_before_flush: list[Callable[[], None]] = []


def before_flush(hook: Callable[[], None]) -> None:
    """Run ``hook`` at the start of every :func:`flush` (e.g. to turn rows buffered per call into counts)."""
    if hook not in _before_flush:
        _before_flush.append(hook)


def flush() -> None:
    """Write the buffered increments and observations to the metrics (each series once)."""
    _last_flush[0] = time.monotonic()
    for hook in _before_flush:
        hook()
    incs: dict[Any, float] = defaultdict(float)
    observed: dict[Any, list[float]] = defaultdict(list)
    while True:
        try:
            metric, amount, kind = _pending.popleft()
        except IndexError:
            break
        if kind == _INC:
            incs[metric] += amount
        elif kind == _OBSERVE:
            observed[metric].append(amount)
        else:
            observed[metric].extend(amount)
    for metric, n in incs.items():
        metric.inc(n)
    for metric, values in observed.items():
        _observe_many(metric, values)


_rpc_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}


def rpc_done(full_method: str, code: str, seconds: float, tier: str | None = None) -> None:
    """Record one finished call: its method (``/pkg.Service/Method``), status code name and duration."""
    children = _rpc_children.get((full_method, code))
    if children is None:
        service, method = split_method(full_method)
        error = PREDICTION_ERRORS.labels(code.lower()) \
            if code not in _NOT_PREDICTION_ERRORS and method in _SCORING_METHODS else None
        children = (RPC_REQUESTS.labels(service, method, code), RPC_DURATION.labels(service, method, code), error)
        _rpc_children[(full_method, code)] = children
    _record(children[0], 1, _INC)
    _record(children[1], seconds, _OBSERVE)
    if children[2] is not None:
        _record(children[2], 1, _INC)
    if tier:
        _record(_child(TIER_REQUESTS, tier), 1, _INC)


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached."""
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def count(metric: Any, amount: float = 1, *labels: str) -> None:
    """Add ``amount`` to a counter (the child of ``labels`` when given) through the worker's buffer: for
    counters defined outside this module (e.g. ``server.input_signals``)."""
    _record(_child(metric, *labels) if labels else metric, amount, _INC)


class _Prediction(Protocol):
    @property
    def probability(self) -> float: ...
    @property
    def decision(self) -> str: ...
    @property
    def risk_level(self) -> str: ...


def predictions(results: Sequence[_Prediction]) -> None:
    """Record scored applicants (decision, risk level, probability)."""
    if len(results) == 1:
        r = results[0]
        _record(_child(PREDICTIONS, r.decision, r.risk_level), 1, _INC)
        _record(PROBABILITY, r.probability, _OBSERVE)
        return
    for (decision, risk), n in _Tally((r.decision, r.risk_level) for r in results).items():
        _record(_child(PREDICTIONS, decision, risk), n, _INC)
    _record(PROBABILITY, [r.probability for r in results], _OBSERVE_MANY)


def _observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """``histogram.observe(v)`` for every value, with one increment per bucket."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if buckets is None or bounds is None or not hasattr(histogram, "_sum"):
        for v in arr:  # a prometheus-client without these internals: the slow way
            histogram.observe(float(v))
        return
    # Bucket i holds bounds[i-1] < v <= bounds[i] (prometheus-client keeps them non-cumulative).
    counts = np.bincount(np.searchsorted(np.asarray(bounds, dtype=np.float64), arr, side="left"),
                         minlength=len(bounds))
    histogram._sum.inc(float(arr.sum()))
    for i, n in enumerate(counts[:len(bounds)]):
        if n:
            buckets[i].inc(int(n))


def inference(seconds: float, rows: int) -> None:
    """Record one model run over ``rows`` rows."""
    _record(INFERENCE_DURATION, seconds, _OBSERVE)
    _record(INFERENCE_ROWS, rows, _INC)


_loaded_version: str | None = None


def model_loaded(version: str) -> None:
    """The worker now serves ``version`` (a version served before drops to 0)."""
    global _loaded_version
    if _loaded_version is not None and _loaded_version != version:
        MODEL_LOADED.labels(_loaded_version).set(0)
    MODEL_LOADED.labels(version).set(1)
    _loaded_version = version


def prediction_error(kind: str, n: int = 1) -> None:
    """Applicants that got no prediction inside an otherwise answered call (e.g. invalid batch rows)."""
    if n:
        _record(_child(PREDICTION_ERRORS, kind), n, _INC)


def cache_hit(cache: str) -> None:
    """A look-up in ``cache`` ("prediction" or "explanation") found an entry."""
    _record(_child(CACHE_HITS, cache), 1, _INC)


def cache_miss(cache: str) -> None:
    _record(_child(CACHE_MISSES, cache), 1, _INC)


def cache_lookups(cache: str, hits: int, misses: int, errors: int = 0) -> None:
    """One look-up round trip of ``cache``: how many keys hit, missed, and failed (failed ones also miss)."""
    if hits:
        _record(_child(CACHE_HITS, cache), hits, _INC)
    if misses:
        _record(_child(CACHE_MISSES, cache), misses, _INC)
    if errors:
        _record(_child(CACHE_ERRORS, cache), errors, _INC)


def cache_error(cache: str) -> None:
    """A cache operation failed and the call went on uncached (fail open)."""
    _record(_child(CACHE_ERRORS, cache), 1, _INC)


def ratelimit_rejected(tier: str) -> None:
    _record(_child(RATELIMIT_REJECTIONS, tier), 1, _INC)


def ratelimit_fallback() -> None:
    """The shared bucket store failed; the local buckets decided."""
    _record(RATELIMIT_FALLBACKS, 1, _INC)


def active_keys(counts: dict[str, int]) -> None:
    """Active API keys per tier (the key store's latest count)."""
    for tier, n in counts.items():
        ACTIVE_KEYS.labels(tier).set(n)


def auth_failed(reason: str) -> None:
    """A call was refused by authentication (``reason``: the ErrorInfo reason, a small fixed set)."""
    _record(_child(AUTH_FAILURES, reason), 1, _INC)


def auth_throttled() -> None:
    """A call was refused because its client address failed authentication too often."""
    _record(AUTH_THROTTLED, 1, _INC)


def deadline_expired(stage: str) -> None:
    """A call's deadline had passed before ``stage``; it was not run."""
    _record(_child(DEADLINE_EXPIRED, stage), 1, _INC)


def audit_queue_depth(n: int) -> None:
    AUDIT_QUEUE.set(n)


def audit_spool_bytes(n: int) -> None:
    AUDIT_SPOOL.set(n)


def audit_written(n: int) -> None:
    _record(AUDIT_WRITTEN, n, _INC)


def audit_write_failed() -> None:
    _record(AUDIT_FAILURES, 1, _INC)


# --- process metrics ------------------------------------------------------------------------------

class ProcessSampler:
    """Records this worker's resident memory and CPU time (call :meth:`sample` periodically)."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.cpu_seen = 0.0
        WORKERS.set(1)

    def sample(self) -> None:
        try:
            RSS.set(self.process.memory_info().rss)
            times = self.process.cpu_times()
        except Exception:  # noqa: BLE001 - a failed sample must never hurt serving
            log.debug("process sample failed", exc_info=True)
            return
        cpu = times.user + times.system
        if cpu > self.cpu_seen:
            CPU.inc(cpu - self.cpu_seen)
            self.cpu_seen = cpu

    async def run(self, interval: float = 5.0) -> None:
        """Sample now and every ``interval`` seconds, and flush the buffered metrics every FLUSH_SECONDS,
        until cancelled (then flush once more)."""
        next_sample = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    self.sample()
                    next_sample = now + interval
                if _pending:
                    flush()
                await asyncio.sleep(FLUSH_SECONDS)
        finally:
            flush()


def multiprocess_enabled() -> bool:
    """Whether this process records into a multiprocess directory (PROMETHEUS_MULTIPROC_DIR was set
    before prometheus-client was imported)."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


def mark_dead(metrics_dir: str | os.PathLike[str], pid: int | None = None) -> None:
    """Drop a (this, by default) worker's live gauges from the multiprocess directory at its exit; its
    counters and histograms stay, so totals do not go backwards."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid(), str(metrics_dir))


# --- champion/challenger -------------------------------------------------------------------------
CHALLENGER_SCORED = Counter("credscope_challenger_scored_total", "Applicants the challenger model scored in shadow.")
CHALLENGER_DROPPED = Counter("credscope_challenger_dropped_total",
                             "Sampled applicants the challenger did not score or record, by reason "
                             "(queue_full, error).", ["reason"])
