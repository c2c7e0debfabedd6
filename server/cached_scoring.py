"""The cache-aware scoring step, the prediction and explanation caches, and their keys and values.

Keys: ``<model version>:<digest>``, where the digest is a BLAKE2b hash of the applicant's encoded model
input row (``server.convert.applicant_to_row``: float32 values in schema order, NaN for missing). The row
is canonical already: field order in the request, an enum left at ``*_UNSPECIFIED`` vs unset, or a
non-optional field sent as its default all give the same row. The digest also normalises every NaN to one
bit pattern and -0.0 to 0.0. In Redis the full key is ``<key_prefix>pred:<version>:<digest>`` (predictions)
or ``<key_prefix>expl:<version>:<digest>`` (explanations). The model version is part of the key and of the
stored value, so a new model version never serves an old version's result.

Values are compact and never pickled (a network store must not be able to run code here): a prediction is
a 19-byte struct plus the model version; an explanation is the bytes of ``Explanation.to_bytes``; reason
codes are JSON (any value: JSON or bytes, as its caller chooses).

The scoring step (:func:`score_rows`): one lookup (GET, or one MGET for a batch) for all rows; the misses
are scored in one ONNX call; their results are written back in one round trip (one command: a script of
``SET … PX`` per entry). Over the network the write is done behind the response, coalesced with the
writes of the calls of the next few milliseconds (bounded; past the bound writes are dropped and counted);
the embedded cache is written at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import orjson

from server import metrics, tracing
from server.backends.cache import CacheBackend, CacheSpec, backend_kind, open_backends
from server.policy import DECISIONS, RISK_LEVELS
from server.schema import COLUMNS
from server.scoring import EncodedRows, Scorer, ScoreResult
from server.settings import CacheSettings

log = logging.getLogger("credscope.cache")

PREDICTIONS = "pred"
EXPLANATIONS = "expl"
DIGEST_BYTES = 16
MAX_PENDING_WRITES = 10_000
"""Entries waiting to be written behind, at most; past that a write is dropped (and counted)."""
WRITE_GATHER_SECONDS = 0.005
"""A write behind waits this long for more entries before it goes out: one round trip for the calls of those
milliseconds instead of one each (each redis-py command costs the event loop ~50-100 µs of CPU)."""

V = TypeVar("V")
_CANONICAL_NAN = np.float32(np.nan)


def matrix_digests(matrix: np.ndarray) -> list[str]:
    """The canonical digest (hex) of each encoded row of a float32 matrix [N, len(COLUMNS)]."""
    m = np.array(matrix, dtype=np.float32, copy=True).reshape(-1, len(COLUMNS))
    m += np.float32(0.0)  # -0.0 -> 0.0
    m[m != m] = _CANONICAL_NAN  # one NaN bit pattern
    data, width = m.tobytes(), m.shape[1] * 4
    return [hashlib.blake2b(data[i * width:(i + 1) * width], digest_size=DIGEST_BYTES).hexdigest()
            for i in range(m.shape[0])]


def row_digest(row: Sequence[float] | np.ndarray) -> str:
    """The canonical digest (hex) of one encoded row (``applicant_to_row``'s first value)."""
    return matrix_digests(np.asarray(row, dtype=np.float32).reshape(1, -1))[0]


def cache_key(version: str, digest: str) -> str:
    """The key of one entry within a cache namespace."""
    return f"{version}:{digest}"


# Prediction value: format, probability, confidence, decision index, risk-level index, then the version.
_RESULT = struct.Struct("<BddBB")
_RESULT_FORMAT = 1
_DECISION_INDEX = {name: i for i, name in enumerate(DECISIONS)}
_RISK_INDEX = {name: i for i, name in enumerate(RISK_LEVELS)}


def encode_result(result: ScoreResult) -> bytes:
    """A ScoreResult as bytes (19 + len(model_version))."""
    return _RESULT.pack(_RESULT_FORMAT, result.probability, result.confidence,
                        _DECISION_INDEX[result.decision], _RISK_INDEX[result.risk_level]
                        ) + result.model_version.encode()


def decode_result(data: bytes, version: str) -> ScoreResult | None:
    """The ScoreResult stored in ``data``, or None if it is unreadable or of another model version."""
    if len(data) < _RESULT.size:
        return None
    fmt, probability, confidence, decision, risk = _RESULT.unpack_from(data)
    if fmt != _RESULT_FORMAT or decision >= len(DECISIONS) or risk >= len(RISK_LEVELS):
        return None
    if data[_RESULT.size:] != version.encode():
        return None
    return ScoreResult(probability, DECISIONS[decision], RISK_LEVELS[risk], confidence, version)


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a JSON-able value (orjson would write them as null)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(map(_finite, value))
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    return True


def encode_json(value: Any) -> bytes:
    """A JSON-able value as compact UTF-8 JSON; bytes pass through untouched (prefixed so they stay apart).

    orjson (~15x faster than ``json.dumps`` on an explanation) unless a float is NaN or infinite (an engineered
    feature's value can be x/0): those keep ``json.dumps``'s ``NaN`` / ``Infinity`` so they read back as such."""
    if isinstance(value, bytes | bytearray | memoryview):
        return b"b" + bytes(value)
    if _finite(value):
        try:
            return b"j" + orjson.dumps(value)
        except orjson.JSONEncodeError:  # what orjson does not take (e.g. non-str keys): json.dumps decides
            pass
    return b"j" + json.dumps(value, separators=(",", ":"), allow_nan=True).encode()


def decode_json(data: bytes, version: str) -> Any:
    """Inverse of :func:`encode_json` (None if unreadable)."""
    tag, body = data[:1], data[1:]
    if tag == b"b":
        return body
    if tag == b"j":
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        try:
            return json.loads(body)  # NaN / Infinity
        except ValueError:
            return None
    return None


class ValueCache(Generic[V]):
    """Typed values over one backend namespace, keyed by model version + row digest.

    ``get``/``get_many`` answer None for a miss (including an unreadable value or a backend failure: the
    cache fails open). ``put``/``put_many`` wait for the write; ``put_later`` writes behind (over the
    network) or at once (embedded).
    """

    def __init__(self, backend: CacheBackend, encode: Callable[[V], bytes],
                 decode: Callable[[bytes, str], V | None], name: str = "prediction") -> None:
        self.backend = backend
        self.name = name
        self._encode = encode
        self._decode = decode
        self.writer = WriteBehind(backend)

    @property
    def stats(self) -> dict[str, float]:
        """hits, misses, errors, hit_rate and the other counters of :class:`CacheStats`."""
        return self.backend.stats.as_dict()

    def _decoded(self, data: bytes | None, version: str) -> V | None:
        if data is None:
            return None
        value = self._decode(data, version)
        if value is None:
            self.backend.stats.record_invalid()
        return value

    async def get(self, version: str, digest: str) -> V | None:
        return self._decoded(await self.backend.get(cache_key(version, digest)), version)

    async def get_many(self, version: str, digests: Sequence[str]) -> list[V | None]:
        """One round trip for all ``digests`` (a single GET when there is one); counted in the metrics and
        traced as a ``credscope.cache.get`` span."""
        errors_before = self.backend.stats.errors
        with tracing.span("credscope.cache.get", cache=self.name, keys=len(digests)) as sp:
            if len(digests) == 1:
                values = [await self.get(version, digests[0])]
            else:
                found = await self.backend.mget([cache_key(version, d) for d in digests])
                values = [self._decoded(data, version) for data in found]
            hits = sum(v is not None for v in values)
            tracing.set_attributes(sp, hits=hits)
        metrics.cache_lookups(self.name, hits, len(values) - hits, self.backend.stats.errors - errors_before)
        return values

    async def put(self, version: str, digest: str, value: V) -> None:
        await self.backend.set(cache_key(version, digest), self._encode(value))

    async def put_many(self, version: str, items: Sequence[tuple[str, V]]) -> None:
        """One round trip (a pipeline of SETs with TTL) for all ``items`` of (digest, value)."""
        if len(items) == 1:
            await self.put(version, items[0][0], items[0][1])
        elif items:
            await self.backend.mset([(cache_key(version, d), self._encode(v)) for d, v in items])

    async def put_later(self, version: str, items: Sequence[tuple[str, V]]) -> None:
        """Write ``items`` behind the caller over the network; at once into the embedded cache."""
        if not items:
            return
        if self.backend.remote:
            self.writer.put([(cache_key(version, d), self._encode(v)) for d, v in items])
        else:
            await self.put_many(version, items)

    async def size(self) -> int:
        return await self.backend.size()

    async def clear(self) -> int:
        return await self.backend.clear()


class WriteBehind:
    """Writes behind the caller, coalesced: what is put within ``gather_seconds`` of the first entry, or
    while a write is in flight, goes out in one write, so concurrent calls share round trips. At most
    ``max_pending`` entries wait; more are dropped (counted in ``dropped_writes``), never queued without
    bound."""

    def __init__(self, backend: CacheBackend, max_pending: int = MAX_PENDING_WRITES,
                 gather_seconds: float = WRITE_GATHER_SECONDS) -> None:
        self.backend = backend
        self.max_pending = max_pending
        self.gather_seconds = gather_seconds
        self._buffer: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        room = self.max_pending - len(self._buffer)
        if room < len(items):
            self.backend.stats.dropped_writes += len(items) - max(room, 0)
            items = items[:max(room, 0)]
        if not items:
            return
        self._buffer.extend(items)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        if self.gather_seconds > 0:  # let the next calls' writes join this one
            await asyncio.sleep(self.gather_seconds)
        while self._buffer:
            items, self._buffer = self._buffer, []
            await self.backend.mset(items)

    async def drain(self, limit: float = 2.0) -> None:
        """Wait (at most ``limit`` seconds) for the writes waiting or in flight."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait([task], timeout=limit)


class Caches:
    """The prediction and explanation caches of one worker (one backend kind for both).

    ``predictions`` holds :class:`ScoreResult` values; ``explanations`` holds any JSON-able value or bytes
    (the explanation engine decides the shape), keyed like predictions by model version + row digest::

        digest = row_digest(row)
        cached = await caches.explanations.get(version, digest)
        ...
        await caches.explanations.put_later(version, [(digest, explanation_as_dict)])
    """

    def __init__(self, predictions: ValueCache[ScoreResult], explanations: ValueCache[Any], *,
                 enabled: bool = True, kind: str = "memory", where: str = "in-process") -> None:
        self.predictions = predictions
        self.explanations = explanations
        self.enabled = enabled
        self.kind = kind
        self.where = where

    @classmethod
    def from_backends(cls, predictions: CacheBackend, explanations: CacheBackend, *, enabled: bool = True,
                      where: str = "in-process") -> Caches:
        return cls(ValueCache(predictions, encode_result, decode_result, "prediction"),
                   ValueCache(explanations, encode_json, decode_json, "explanation"),
                   enabled=enabled, kind=predictions.kind, where=where)

    def stats(self) -> dict[str, dict[str, float]]:
        """Counters of both caches: ``{"predictions": {...}, "explanations": {...}}``, each with hits,
        misses, errors, bypassed, hit_rate, sets, evictions, expirations, invalid, dropped_writes (see
        ``server.backends.cache.CacheStats``). Cheap and synchronous: fit for a metrics collector."""
        return {"predictions": self.predictions.stats, "explanations": self.explanations.stats}

    async def clear(self) -> tuple[int, int]:
        """Remove every entry of both caches; return (predictions removed, explanations removed).

        Raises ``server.backends.cache.CacheUnavailable`` when the networked backend does not answer."""
        return await self.predictions.clear(), await self.explanations.clear()

    async def check(self) -> bool:
        """Whether the backend answers now (always True for the embedded cache)."""
        link = getattr(self.predictions.backend, "link", None)
        return True if link is None else await link.ping()

    async def drain(self, limit: float = 2.0) -> None:
        """Wait (at most ``limit`` seconds each) for the writes behind of both caches."""
        await self.predictions.writer.drain(limit)
        await self.explanations.writer.drain(limit)

    async def close(self) -> None:
        """Finish writes in flight (briefly), then release connections."""
        await self.drain()
        await self.predictions.backend.close()
        await self.explanations.backend.close()


def open_caches(settings: CacheSettings) -> Caches:
    """The caches ``settings`` describe: Redis when ``redis_url`` is set, else the embedded LRU."""
    specs = {PREDICTIONS: CacheSpec(settings.prediction_max_items, settings.prediction_ttl_seconds),
             EXPLANATIONS: CacheSpec(settings.explanation_max_items, settings.explanation_ttl_seconds)}
    url = settings.redis_url or None
    backends = open_backends(url, specs, key_prefix=settings.key_prefix, timeout=settings.timeout_seconds,
                             retry_seconds=settings.retry_seconds)
    kind = backend_kind(url)
    where = "in-process" if kind == "memory" else backends[PREDICTIONS].link.where  # type: ignore[attr-defined]
    return Caches.from_backends(backends[PREDICTIONS], backends[EXPLANATIONS], enabled=settings.enabled,
                                where=where)


def digests_of(rows: EncodedRows) -> list[str]:
    """The rows' digests, computed on first use and kept on ``rows`` (both caches key on them)."""
    if rows.digests is None:
        rows.digests = matrix_digests(rows.matrix)
    return rows.digests


async def score_rows(scorer: Scorer, matrix: np.ndarray | EncodedRows, caches: Caches | None
                     ) -> list[tuple[ScoreResult, bool]]:
    """Score an encoded float32 matrix through the prediction cache: (result, from_cache) per row.

    One lookup for all rows, one model call for the misses, one write (behind, over the network) for the
    newly scored rows. Without caches (or disabled) it is ``scorer.score``. Given :class:`EncodedRows`, their
    digests are kept, and their ``features`` set for the rows the model scored (``known`` marks them when
    some rows came from the cache).
    """
    rows = EncodedRows.of(matrix)
    n = len(rows)
    if n == 0:
        return []
    if caches is None or not caches.enabled:
        return [(r, False) for r in scorer.score(rows)]
    version = scorer.version
    digests = digests_of(rows)
    cache = caches.predictions
    found = await cache.get_many(version, digests)
    missing = [i for i, r in enumerate(found) if r is None]
    hits = [r for r in found if r is not None]
    if hits:
        metrics.predictions(hits)  # served decisions count as predictions, cached or not
    if not missing:
        return [(r, True) for r in found]  # type: ignore[misc]
    if len(missing) == n:
        scored = scorer.score(rows)
    else:  # the misses alone; their features are kept for the explanations of those rows
        part = rows.take(missing)
        scored = scorer.score(part)
        rows.with_features_of(missing, part)
    out: list[tuple[ScoreResult, bool]] = [(r, True) if r is not None else None for r in found]  # type: ignore[misc]
    for i, result in zip(missing, scored, strict=True):
        out[i] = (result, False)
    await cache.put_later(version, [(digests[i], r) for i, r in zip(missing, scored, strict=True)])
    return out


async def explain_rows(scorer: Scorer, matrix: np.ndarray | EncodedRows, caches: Caches | None,
                       compute: Callable[[Scorer, EncodedRows], Any]) -> list[Any]:
    """Explanations of an encoded matrix through the explanation cache.

    ``compute(scorer, rows)`` is awaited for the misses only (one call, :class:`EncodedRows`) and returns
    :class:`server.explain.Explanation` objects; they are cached whole (all contributions, in their binary
    form, ``to_bytes()``), so any top-k is served from one entry.
    """
    from server.explain import Explanation

    return await _through_cache(scorer, matrix, caches, compute, "", Explanation.from_cached, Explanation.to_bytes)


#: Reason codes live in the explanation cache's namespace, under keys of their own.
REASONS_KEY = "reasons/"


def _codes(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise TypeError("not a list of reason codes")
    return value


async def reason_rows(scorer: Scorer, matrix: np.ndarray | EncodedRows, caches: Caches | None,
                      compute: Callable[[Scorer, EncodedRows], Any]) -> list[list[str]]:
    """Adverse-action reason codes of an encoded matrix through the explanation cache (its own keys):
    ``compute(scorer, rows)`` (e.g. ``Scorer.reason_codes`` in a thread) is awaited for the misses only."""
    return await _through_cache(scorer, matrix, caches, compute, REASONS_KEY, _codes, list)


async def _through_cache(scorer: Scorer, matrix: np.ndarray | EncodedRows, caches: Caches | None,
                         compute: Callable[[Scorer, EncodedRows], Any], prefix: str,
                         decode: Callable[[Any], Any], encode: Callable[[Any], Any]) -> list[Any]:
    """Values per row from the explanation cache (keys ``prefix + digest``), computed for the misses only
    (one ``compute`` call) and written back; an entry that does not ``decode`` is computed again."""
    rows = EncodedRows.of(matrix)
    if len(rows) == 0:
        return []
    if caches is None or not caches.enabled:
        return list(await compute(scorer, rows))
    version = scorer.version
    digests = [prefix + d for d in digests_of(rows)]
    found = await caches.explanations.get_many(version, digests)
    out: list[Any] = [None] * len(found)
    missing = []
    for i, value in enumerate(found):
        if value is None:
            missing.append(i)
            continue
        try:
            out[i] = decode(value)
        except (KeyError, TypeError, ValueError):
            missing.append(i)  # an entry of another shape: compute it again
    if missing:
        computed = await compute(scorer, rows if len(missing) == len(rows) else rows.take(missing))
        for i, value in zip(missing, computed, strict=True):
            out[i] = value
        await caches.explanations.put_later(version, [(digests[i], encode(out[i])) for i in missing])
    return out
