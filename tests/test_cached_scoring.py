"""The cache-aware scoring step with the real model: keys, values, versions, one lookup per batch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator

import numpy as np
import pytest

from client.applicants import applicant_from_mapping
from credscope.v1 import applicant_pb2
from server.backends.cache import CacheSpec, MemoryCache, open_backends
from server.cached_scoring import (
    EXPLANATIONS,
    PREDICTIONS,
    Caches,
    decode_json,
    decode_result,
    encode_json,
    encode_result,
    matrix_digests,
    open_caches,
    reason_rows,
    row_digest,
    score_rows,
)
from server.convert import applicant_to_row, rows_to_matrix
from server.scoring import EncodedRows, Scorer, ScoreResult
from server.settings import CacheSettings

BASE = {
    "name_contract_type": "Cash loans", "amt_income_total": 202500, "amt_credit": 406597.5, "amt_annuity": 24700.5,
    "amt_goods_price": 351000, "name_income_type": "Working", "days_birth": -12000, "days_employed": -2000,
    "ext_source_2": 0.6, "ext_source_3": 0.5, "cnt_fam_members": 2,
}


def row_of(a: applicant_pb2.Applicant) -> list[float]:
    row, violations = applicant_to_row(a)
    assert not violations
    return row


def varied_rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for x, c in zip(rng.uniform(0.01, 0.99, n), rng.uniform(1e5, 1e6, n), strict=True):
        rows.append(row_of(applicant_from_mapping({**BASE, "ext_source_2": float(x), "amt_credit": float(c)})))
    return rows_to_matrix(rows)


class CountingScorer(Scorer):
    """The real scorer, recording the size of every model call."""

    def __init__(self, model) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model)
        self.calls: list[int] = []

    def score(self, rows: np.ndarray) -> list[ScoreResult]:
        self.calls.append(len(rows))
        return super().score(rows)


def test_digest_ignores_field_order_and_explicit_defaults() -> None:
    a = applicant_from_mapping(BASE)
    # The same fields on the wire in reverse order (as another client may send them).
    reverse = b"".join(applicant_from_mapping({k: BASE[k]}).SerializeToString() for k in reversed(list(BASE)))
    assert reverse != a.SerializeToString()
    b = applicant_pb2.Applicant.FromString(reverse)
    # An enum sent explicitly at its UNSPECIFIED value (field 11 name_family_status = 0): still missing.
    c = applicant_pb2.Applicant.FromString(a.SerializeToString() + b"\x58\x00")
    assert row_digest(row_of(a)) == row_digest(row_of(b)) == row_digest(row_of(c))
    d = applicant_from_mapping({**BASE, "ext_source_2": 0.61})
    assert row_digest(row_of(d)) != row_digest(row_of(a))
    e = applicant_from_mapping({**BASE, "ext_source_1": 0.5})  # a missing value made present
    assert row_digest(row_of(e)) != row_digest(row_of(a))
    assert len({row_digest(row_of(x)) for x in (a, d, e)}) == 3


def test_digest_normalises_nan_and_negative_zero() -> None:
    row = np.asarray(row_of(applicant_from_mapping(BASE)), dtype=np.float32)
    odd = row.copy()
    nan_positions = np.flatnonzero(np.isnan(row))
    assert len(nan_positions) > 0
    bits = odd.view(np.uint32)
    bits[nan_positions[0]] = 0xFFC00001  # another NaN bit pattern
    assert row_digest(odd) == row_digest(row)
    plus, minus = row.copy(), row.copy()
    p = int(np.flatnonzero(~np.isnan(row) & (row != 0))[0])
    plus[p], minus[p] = 0.0, -0.0
    assert minus.tobytes() != plus.tobytes() and row_digest(minus) == row_digest(plus) != row_digest(row)
    assert matrix_digests(np.stack([row, odd])) == [row_digest(row)] * 2


def test_result_value_roundtrip_and_version_check() -> None:
    r = ScoreResult(0.123456789, "APPROVE", "LOW", 0.38, "0123456789abcdef")
    data = encode_result(r)
    assert len(data) == 19 + 16
    assert decode_result(data, "0123456789abcdef") == r
    assert decode_result(data, "fedcba9876543210") is None  # another version's value never decodes
    assert decode_result(b"\x02" + data[1:], r.model_version) is None
    assert decode_result(b"junk", r.model_version) is None
    assert decode_json(encode_json({"base": 0.5, "top": [["X", 1.0]]}), "v") == {"base": 0.5, "top": [["X", 1.0]]}
    assert decode_json(encode_json(b"\x00raw"), "v") == b"\x00raw"
    assert decode_json(b"?", "v") is None


def test_json_values_round_trip_exactly() -> None:
    """Every float comes back with the same bits — NaN and infinities too (an engineered feature's value can
    be x/0), and None stays None; values orjson does not take still encode."""
    import math
    import random

    rng = random.Random(5)
    floats = [rng.uniform(-1e6, 1e6) for _ in range(200)] + [5e-324, -0.0, 1.7976931348623157e308, 0.1, 1 / 3]
    value = {"base_value": -3.0195, "contributions": [["F", v, -v] for v in floats] + [["M", None, 0.25]]}
    assert decode_json(encode_json(value), "v") == value
    odd = {"base_value": 0.5, "contributions": [["X", math.inf, 0.1], ["Y", -math.inf, 0.2], ["Z", None, 0.3]]}
    assert decode_json(encode_json(odd), "v") == odd
    back = decode_json(encode_json({"v": [math.nan, 1.0]}), "v")
    assert math.isnan(back["v"][0]) and back["v"][1] == 1.0
    assert decode_json(encode_json({1: "a"}), "v") == {"1": "a"}  # json.dumps's rule for non-str keys


@pytest.fixture(params=["memory", "redis"])
async def caches(request: pytest.FixtureRequest) -> AsyncIterator[Caches]:
    if request.param == "memory":
        c = open_caches(CacheSettings())
    else:
        c = open_caches(CacheSettings(redis_url=request.getfixturevalue("redis_url"),
                                      key_prefix=request.getfixturevalue("redis_prefix"), timeout_seconds=2.0))
    yield c
    await c.close()


async def drain(caches: Caches) -> None:
    await caches.drain(limit=5)


async def test_score_misses_then_hits_with_the_same_result(model, caches: Caches) -> None:  # type: ignore[no-untyped-def]
    scorer = CountingScorer(model)
    m = varied_rows(1, seed=11)
    [(first, hit1)] = await score_rows(scorer, m, caches)
    await drain(caches)
    [(second, hit2)] = await score_rows(scorer, m, caches)
    assert (hit1, hit2) == (False, True)
    assert second == first
    assert first.probability == pytest.approx(float(model.predict_proba(m)[0]), abs=1e-12)
    assert scorer.calls == [1]
    s = caches.stats()["predictions"]
    assert (s["hits"], s["misses"], s["errors"]) == (1, 1, 0)


async def test_batch_scores_only_the_misses_in_one_model_call(model, caches: Caches) -> None:  # type: ignore[no-untyped-def]
    scorer = CountingScorer(model)
    m = varied_rows(40, seed=12)
    warm = [3, 7, 20, 39]
    for r, hit in await score_rows(scorer, m[warm], caches):
        assert not hit and r.model_version == model.version
    await drain(caches)
    out = await score_rows(scorer, m, caches)
    assert [i for i, (_, hit) in enumerate(out) if hit] == warm
    assert scorer.calls == [4, 36]
    expected = model.predict_proba(m)
    for (r, _), p in zip(out, expected, strict=True):
        assert r.probability == pytest.approx(float(p), abs=1e-12)
    await drain(caches)
    again = await score_rows(scorer, m, caches)
    assert all(hit for _, hit in again) and scorer.calls == [4, 36]
    assert [r for r, _ in again] == [r for r, _ in out]


async def test_a_new_model_version_never_serves_an_old_result(model, caches: Caches) -> None:  # type: ignore[no-untyped-def]
    old = Scorer(model)
    new = Scorer(dataclasses.replace(model, version="00000000000000ff"))
    m = varied_rows(5, seed=13)
    await score_rows(old, m, caches)
    await drain(caches)
    out = await score_rows(new, m, caches)
    assert [(hit, r.model_version) for r, hit in out] == [(False, "00000000000000ff")] * 5
    await drain(caches)
    back = await score_rows(old, m, caches)
    assert [(hit, r.model_version) for r, hit in back] == [(True, model.version)] * 5
    assert await caches.predictions.size() == 10


async def test_explanation_cache_api(caches: Caches) -> None:
    digest = row_digest(varied_rows(1, seed=14)[0])
    assert await caches.explanations.get("0123456789abcdef", digest) is None
    value = {"base_value": -2.1, "contributions": [["EXT_SOURCE_2", 0.6, -0.4]], "nan": math.inf}
    await caches.explanations.put("0123456789abcdef", digest, value)
    assert await caches.explanations.get("0123456789abcdef", digest) == value
    assert await caches.explanations.get("fedcba9876543210", digest) is None
    await caches.explanations.put_later("0123456789abcdef", [(digest + "x", [1, 2])])
    await drain(caches)
    assert await caches.explanations.get_many("0123456789abcdef", [digest + "x", "nope"]) == [[1, 2], None]
    assert await caches.predictions.size() == 0
    assert await caches.clear() == (0, 2)


async def test_reason_codes_are_cached_under_keys_of_their_own(model, caches: Caches) -> None:  # type: ignore[no-untyped-def]
    scorer = Scorer(model)
    m = varied_rows(6, seed=21)
    calls: list[int] = []

    async def compute(s: Scorer, rows: np.ndarray) -> list[list[str]]:
        calls.append(len(rows))
        return s.reason_codes(rows)

    first = await reason_rows(scorer, m[:4], caches, compute)
    await drain(caches)
    second = await reason_rows(scorer, m, caches, compute)
    assert calls == [4, 2]  # the cached rows were not computed again
    assert second[:4] == first and second == scorer.reason_codes(m)
    assert all(codes for codes in second)  # every row has reasons (positive SHAP somewhere)
    digest = matrix_digests(m[:1])[0]
    assert await caches.explanations.get(model.version, digest) is None  # not an explanation's key
    assert await caches.explanations.get(model.version, "reasons/" + digest) == first[0]
    await caches.explanations.put(model.version, "reasons/" + digest, {"not": "codes"})  # unreadable: recomputed
    assert (await reason_rows(scorer, m[:1], caches, compute)) == first[:1] and calls == [4, 2, 1]


class TransformCounting(Scorer):
    """The real scorer, counting the runs of the graph made only for the feature matrix."""

    def __init__(self, model) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model)
        self.transforms: list[int] = []
        transform = model.transform

        def counted(x: np.ndarray) -> np.ndarray:
            self.transforms.append(len(x))
            return transform(x)

        self.model = dataclasses.replace(model)
        self.model.transform = counted  # type: ignore[method-assign]


async def test_the_scoring_run_gives_the_explanations_their_features(model, caches: Caches) -> None:  # type: ignore[no-untyped-def]
    """Rows scored by the model keep the feature matrix of that same run (bit for bit what a separate run of
    the graph gives) and their digests: the reason codes of those rows need no second run of the graph and
    no second hashing; rows that came from the cache (no scoring run) fall back to a run of the graph."""
    scorer = TransformCounting(model)
    m = varied_rows(40, seed=31)
    rows = EncodedRows(m)
    await score_rows(scorer, rows, caches)
    assert rows.digests == matrix_digests(m)
    assert rows.features is not None and rows.features.dtype == np.float32
    np.testing.assert_array_equal(rows.features, model.transform(m))  # (NaN where a value is missing)
    for part, index in ((rows.take([9, 0, 5]), [9, 0, 5]), (rows.take(slice(2, 6)), [2, 3, 4, 5])):
        assert part.digests == [rows.digests[i] for i in index]  # (the explain threads take slices)
        np.testing.assert_array_equal(part.features, rows.features[index])
        np.testing.assert_array_equal(part.matrix, m[index])

    async def compute(s: Scorer, r: EncodedRows) -> list[list[str]]:
        return s.reason_codes(r)

    codes = await reason_rows(scorer, rows.take([0, 5, 9]), caches, compute)
    assert scorer.transforms == [] and codes == Scorer(model).reason_codes(m[[0, 5, 9]])
    await drain(caches)
    again = EncodedRows(m)  # every row from the cache now: no scoring run, no features
    await score_rows(scorer, again, caches)
    assert again.features is None
    assert await reason_rows(scorer, again.take([1, 2]), caches, compute) == Scorer(model).reason_codes(m[[1, 2]])
    assert scorer.transforms == [2]


async def test_partly_cached_rows_keep_the_features_of_the_rows_scored(model, caches: Caches) -> None:  # type: ignore[no-untyped-def]
    """When some rows come from the cache, the scoring run of the others still gives their features: the
    explanations of scored rows need no second run of the graph, and rows from the cache get theirs from one
    run over those rows alone — the same bits either way."""
    scorer = TransformCounting(model)
    old, new = varied_rows(20, seed=41), varied_rows(20, seed=42)
    await score_rows(scorer, EncodedRows(old), caches)
    await drain(caches)
    m = np.concatenate([old[:10], new[:10], old[10:], new[10:]])  # cached rows at 0-9 and 20-29
    rows = EncodedRows(m)
    pairs = await score_rows(scorer, rows, caches)
    assert [hit for _, hit in pairs] == [True] * 10 + [False] * 10 + [True] * 10 + [False] * 10
    assert rows.known is not None and rows.known.tolist() == [hit is False for _, hit in pairs]
    fresh = Scorer(model)
    scored_rows = [12, 35, 19, 30]
    assert scorer.reason_codes(rows.take(scored_rows)) == fresh.reason_codes(m[scored_rows])
    assert scorer.explain(rows.take(scored_rows)) == fresh.explain(m[scored_rows])
    assert scorer.transforms == []  # their features came from the scoring run
    mixed = [3, 12, 25, 35]  # two from the cache, two scored
    assert scorer.reason_codes(rows.take(mixed)) == fresh.reason_codes(m[mixed])
    assert scorer.explain(rows.take(mixed)) == fresh.explain(m[mixed])
    assert scorer.transforms == [2, 2]  # the graph ran for the two cached rows only
    assert rows.take([0, 21]).features is None  # from the cache alone: nothing kept


async def test_unreadable_value_is_a_miss_not_a_hit(model) -> None:  # type: ignore[no-untyped-def]
    pred = MemoryCache(10, 60)
    caches = Caches.from_backends(pred, MemoryCache(10, 60))
    m = varied_rows(1, seed=15)
    await pred.set(f"{model.version}:{matrix_digests(m)[0]}", b"\x01garbage")
    [(r, hit)] = await score_rows(Scorer(model), m, caches)
    assert not hit and r.probability == pytest.approx(float(model.predict_proba(m)[0]), abs=1e-12)
    s = caches.stats()["predictions"]
    assert (s["hits"], s["misses"], s["invalid"]) == (0, 1, 1)


async def test_disabled_caches_are_not_used(model) -> None:  # type: ignore[no-untyped-def]
    caches = open_caches(CacheSettings(enabled=False))
    m = varied_rows(3, seed=16)
    for _ in range(2):
        assert [hit for _, hit in await score_rows(Scorer(model), m, caches)] == [False] * 3
    assert caches.stats()["predictions"]["misses"] == 0 and await caches.predictions.size() == 0


async def test_batch_uses_one_mget_and_one_write(model, redis_proc) -> None:  # type: ignore[no-untyped-def]
    """Counted by a private Redis: a batch of 50 is 1 MGET (no GET) and one write command (a script that
    sets the 50 entries with their TTL)."""
    rp = redis_proc
    caches = open_caches(CacheSettings(redis_url=rp.url, timeout_seconds=2.0))
    m = varied_rows(50, seed=17)
    r = rp.client()
    await score_rows(Scorer(model), varied_rows(2, seed=18), caches)  # the first write loads the script
    await drain(caches)
    r.config_resetstat()
    await score_rows(Scorer(model), m, caches)
    await drain(caches)
    stats = r.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1 and "cmdstat_get" not in stats
    writes = stats.get("cmdstat_evalsha", {}).get("calls", 0) + stats.get("cmdstat_eval", {}).get("calls", 0)
    assert writes == 1 and stats["cmdstat_set"]["calls"] == 50  # the script's SETs
    assert r.dbsize() == 52 and 0 < r.pttl(r.keys("credscope:pred:*")[0]) <= 1800 * 1000
    before = r.info("stats")["total_connections_received"]
    assert [hit for _, hit in await score_rows(Scorer(model), m, caches)] == [True] * 50
    assert r.info("commandstats")["cmdstat_mget"]["calls"] == 2
    assert r.info("stats")["total_connections_received"] == before  # pooled: no new connections
    r.close()
    await caches.close()


def test_open_backends_prefixes_namespaces(redis_url: str) -> None:
    specs = {PREDICTIONS: CacheSpec(1, 1.0), EXPLANATIONS: CacheSpec(1, 2.0)}
    backends = open_backends(redis_url, specs, key_prefix="p:")
    assert [b.prefix for b in backends.values()] == ["p:pred:", "p:expl:"]  # type: ignore[attr-defined]


async def test_writes_behind_are_coalesced_and_bounded(model, redis_proc) -> None:  # type: ignore[no-untyped-def]
    """Concurrent Score calls share write round trips; past the bound writes are dropped and counted."""
    import asyncio

    rp = redis_proc
    caches = open_caches(CacheSettings(redis_url=rp.url, timeout_seconds=2.0))
    scorer = Scorer(model)
    await score_rows(scorer, varied_rows(2, seed=19), caches)  # loads the script
    await caches.drain(limit=5)
    r = rp.client()
    m = varied_rows(20, seed=20)
    out = await asyncio.gather(*(score_rows(scorer, m[i:i + 1], caches) for i in range(20)))
    await caches.drain(limit=5)
    assert [hit for [(_, hit)] in out] == [False] * 20
    assert [hit for [(_, hit)] in await asyncio.gather(*(score_rows(scorer, m[i:i + 1], caches)
                                                           for i in range(20)))] == [True] * 20
    # Writes put while no write has gone out yet leave together: 20 entries, one command.
    writer = caches.predictions.writer
    r.config_resetstat()
    for i in range(20):
        writer.put([(f"coalesced:{i}", b"v")])
    await caches.drain(limit=5)
    stats = r.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1 and stats["cmdstat_set"]["calls"] == 20
    # So do writes put within the gathering window after the first (calls a few milliseconds apart).
    assert writer.gather_seconds > 0
    writer.gather_seconds = 0.5  # (a wide window: the test must not depend on the host's timing)
    r.config_resetstat()
    for i in range(5):
        writer.put([(f"gathered:{i}", b"v")])
        await asyncio.sleep(0.01)
    await caches.drain(limit=5)
    stats = r.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1 and stats["cmdstat_set"]["calls"] == 5
    writer.max_pending = 3
    rp.pause()  # nothing is written while Redis does not answer: the buffer fills up
    try:
        writer.put([("a", b"1")])
        await asyncio.sleep(writer.gather_seconds * 4)  # the flush takes "a" and waits for Redis
        writer.put([(k, b"x") for k in "bcdef"])
        assert writer.pending == 3 and caches.stats()["predictions"]["dropped_writes"] == 2
    finally:
        rp.resume()
    await caches.drain(limit=5)
    r.close()
    await caches.close()
