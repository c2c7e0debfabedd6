"""The fast paths of the Score path give exactly what the straightforward code gave.

``applicant_to_row`` walks only the set fields with a range pre-check, and the policy decides whole
batches with numpy; each is compared here with the plain per-field / per-row code it replaced, on random
applicants and probabilities that include every edge (zero, -0.0, NaN, infinities, bounds, special
codes, unknown enum values).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from credscope.v1 import applicant_pb2
from server.convert import _SPECS, applicant_to_row
from server.errors import Violation
from server.policy import DECISIONS, RISK_LEVELS, Policy
from server.schema import COLUMNS
from server.scoring import Scorer


def reference_applicant_to_row(applicant: applicant_pb2.Applicant,
                               path: str = "applicant") -> tuple[list[float], list[Violation]]:
    """The original per-column implementation."""
    row: list[float] = []
    violations: list[Violation] = []
    for field, kind, has_presence, col in _SPECS:
        if has_presence:
            if not applicant.HasField(field):
                row.append(math.nan)
                continue
            value = float(getattr(applicant, field))
        else:
            raw = getattr(applicant, field)
            if kind == "categorical":
                if raw == 0:
                    row.append(math.nan)
                    continue
                value = float(raw - 1)
            elif raw == 0:
                if col.required:
                    violations.append(Violation(f"{path}.{field}", f"is required: {col.description}"))
                row.append(math.nan)
                continue
            else:
                value = float(raw)
        problem = col.check(value)
        if problem:
            violations.append(Violation(f"{path}.{field}", problem))
        row.append(value)
    return row, violations


_FIELDS = {f.name: f for f in applicant_pb2.Applicant.DESCRIPTOR.fields}


def _edge_values(col) -> list[float]:  # type: ignore[no-untyped-def]
    vals = [0.0, -0.0, math.nan, math.inf, -math.inf, 1.0, -1.0, 0.5, 1e-300, -1e9, 1e12, *col.special]
    for b in (col.minimum, col.maximum):
        if b is not None:
            vals += [b, math.nextafter(b, math.inf), math.nextafter(b, -math.inf), b + 1, b - 1]
    return vals


def _random_applicant(rng: random.Random) -> applicant_pb2.Applicant:
    a = applicant_pb2.Applicant()
    for col in COLUMNS:
        if rng.random() < 0.2:
            continue  # unset
        fd = _FIELDS[col.field]
        if col.kind == "categorical":
            setattr(a, col.field, rng.choice([0, 1, 2, len(col.categories), len(col.categories) + 1, 99, -3]))
        elif col.kind == "flag":
            setattr(a, col.field, rng.random() < 0.5)
        else:
            lo = col.minimum if col.minimum is not None else -1000.0
            hi = col.maximum if col.maximum is not None else 1000.0
            v = rng.choice(_edge_values(col)) if rng.random() < 0.4 else rng.uniform(lo, hi)
            if fd.type in (fd.TYPE_INT32, fd.TYPE_INT64):
                if not math.isfinite(v) or abs(v) >= 2**31:
                    continue
                v = int(v)
            setattr(a, col.field, v)
    return a


def _same(x: list[float], y: list[float]) -> bool:
    return all((math.isnan(p) and math.isnan(q)) or (p == q and math.copysign(1, p) == math.copysign(1, q))
               for p, q in zip(x, y, strict=True))


def test_applicant_to_row_equals_the_reference_on_random_and_edge_applicants() -> None:
    rng = random.Random(1234)
    checked = invalid = 0
    for _ in range(4000):
        a = _random_applicant(rng)
        # the applicant as it arrives: parsed from its bytes
        a = applicant_pb2.Applicant.FromString(a.SerializeToString())
        row, violations = applicant_to_row(a, "applicants[3]")
        ref_row, ref_violations = reference_applicant_to_row(a, "applicants[3]")
        assert _same(row, ref_row), (a, row, ref_row)
        assert violations == ref_violations, a
        checked += 1
        invalid += bool(violations)
    assert checked == 4000 and 200 < invalid < 4000  # both valid and invalid applicants were covered


def test_applicant_to_row_empty_and_zero_required_fields() -> None:
    empty = applicant_pb2.Applicant()
    row, violations = applicant_to_row(empty)
    ref_row, ref_violations = reference_applicant_to_row(empty)
    assert _same(row, ref_row) and violations == ref_violations
    assert [v.field for v in violations] == ["applicant.amt_income_total", "applicant.amt_credit",
                                             "applicant.days_birth"]
    assert all(math.isnan(x) for x in row)
    neg_zero = applicant_pb2.Applicant.FromString(applicant_pb2.Applicant(amt_credit=-0.0).SerializeToString())
    assert applicant_to_row(neg_zero)[1] == reference_applicant_to_row(neg_zero)[1]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000])
def test_policy_decide_array_equals_decide(n: int) -> None:
    policy = Policy()
    rng = np.random.default_rng(n)
    edges = np.array([0.0, 0.1, 0.2, 0.35, 0.5, 1.0, np.nextafter(0.2, 0), np.nextafter(0.5, 1), np.nan])
    probs = np.concatenate([rng.random(n), edges])
    decision, risk, confidence = policy.decide_array(probs)
    for p, d, r, c in zip(probs, decision, risk, confidence, strict=True):
        want = policy.decide(float(p))
        assert (DECISIONS[d], RISK_LEVELS[r]) == want[:2]
        assert c == want[2], (p, c, want)


def test_scorer_batches_equal_single_rows(model) -> None:  # type: ignore[no-untyped-def]
    scorer = Scorer(model)
    rows = [applicant_to_row(_random_applicant(random.Random(i)))[0] for i in range(300)]
    x = np.asarray(rows, dtype=np.float32)
    x[:, [4, 5]] = np.abs(x[:, [4, 5]]) + 1000  # amounts: keep the rows scorable
    batch = scorer.score(x)
    singles = [scorer.score(x[i:i + 1])[0] for i in range(len(x))]
    assert len(batch) == 300
    for b, s in zip(batch, singles, strict=True):
        assert (b.decision, b.risk_level, b.model_version) == (s.decision, s.risk_level, s.model_version)
        assert b.probability == pytest.approx(s.probability, abs=1e-6)
        assert b.confidence == pytest.approx(s.confidence, abs=1e-5)


async def test_interceptors_build_each_methods_handler_once() -> None:
    import grpc

    from server.interceptors.base import AroundInterceptor

    seen: list[str] = []

    class Recording(AroundInterceptor):
        async def around(self, method, behavior, request, context):  # type: ignore[no-untyped-def]
            seen.append(method)
            return await behavior(request, context)

    async def behaviour(request, context):  # type: ignore[no-untyped-def]
        return request * 2

    class Details:
        def __init__(self, method: str) -> None:
            self.method = method

    servicer = grpc.unary_unary_rpc_method_handler(behaviour)
    inner = {"current": servicer}

    async def continuation(details):  # type: ignore[no-untyped-def]
        return inner["current"] if details.method.startswith("/credscope") else None

    icpt = Recording()
    score = Details("/credscope.v1.ScoringService/Score")
    first = await icpt.intercept_service(continuation, score)
    assert await icpt.intercept_service(continuation, score) is first  # reused
    assert await first.unary_unary(21, None) == 42 and seen == ["/credscope.v1.ScoringService/Score"]
    other = await icpt.intercept_service(continuation, Details("/credscope.v1.ScoringService/BatchScore"))
    assert other is not first
    inner["current"] = grpc.unary_unary_rpc_method_handler(behaviour)  # the inner handler changed: rebuilt
    assert await icpt.intercept_service(continuation, score) is not first
    health = Details("/grpc.health.v1.Health/Check")
    assert await icpt.intercept_service(continuation, health) is None
    inner["current"] = servicer
    infra = await Recording().intercept_service(lambda d: _const(servicer), health)
    assert infra is servicer  # health and reflection pass through unwrapped


async def _const(value):  # type: ignore[no-untyped-def]
    return value


def test_batch_session_scores_large_matrices_like_the_single_row_session(model_dir) -> None:  # type: ignore[no-untyped-def]
    from server.model import load_model

    plain = load_model(model_dir)
    two = load_model(model_dir, batch_intra_op_threads=2)
    assert plain.batch_session is None and two.batch_session is not None
    rows = [applicant_to_row(_random_applicant(random.Random(i)))[0] for i in range(400)]
    x = np.asarray(rows, dtype=np.float32)
    x[:, [4, 5]] = np.abs(x[:, [4, 5]]) + 1000
    big = two.predict_proba(x)  # 400 rows >= batch_rows: the two-thread session
    assert len(x) >= two.batch_rows
    np.testing.assert_allclose(big, plain.predict_proba(x), rtol=0, atol=1e-6)
    small = x[: two.batch_rows - 1]  # below batch_rows: the one-thread session, bit for bit
    assert (two.predict_proba(small) == plain.predict_proba(small)).all()
    # the features a batch's scoring run gives (what its explanations start from): those of one thread
    proba, features = two.predict(x)
    assert (proba == big).all()
    np.testing.assert_array_equal(features, plain.transform(x))


async def test_one_applicants_shap_work_runs_inline_a_batchs_in_the_explain_threads(model_dir) -> None:  # type: ignore[no-untyped-def]
    """One row's explanation runs on the event loop (a thread hop cost more CPU than the work); a batch's is
    split over the explain threads, in order; ``inline_explain_rows=0`` sends even one row to a thread.
    Reason codes alone (~6 us a row) run on the loop for up to ``inline_reason_rows`` rows (a BatchScore's
    ~100 adverse applicants: the hop to the threads took longer than the work)."""
    import threading

    from server.runtime import Runtime
    from server.scoring import EncodedRows
    from server.services.scoring import ScoringService
    from server.settings import Settings

    settings = Settings()
    settings.model.model_dir = model_dir
    runtime = Runtime(settings)
    scorer = runtime.load()
    seen: list[tuple[str, int]] = []
    loop_thread = threading.current_thread().name

    def codes(rows: np.ndarray) -> list[list[str]]:
        seen.append((threading.current_thread().name, len(rows)))
        return scorer.reason_codes(rows)

    matrix = np.asarray(scorer.model.metadata["reference"]["sample"]["rows"][:40], dtype=np.float32)
    service = ScoringService(runtime, settings)
    one = await service._shap_work(scorer, codes, matrix[:1], "explanation", service._inline_rows)
    assert seen == [(loop_thread, 1)]
    seen.clear()
    many = await service._shap_work(scorer, codes, matrix, "explanation", service._inline_rows)
    assert sorted(n for _, n in seen) == [20, 20] and all(name.startswith("explain") for name, _ in seen)
    assert many == scorer.reason_codes(matrix) and one == many[:1]
    settings.model.inline_explain_rows = 0
    seen.clear()
    service = ScoringService(runtime, settings)
    await service._shap_work(scorer, codes, matrix[:1], "explanation", service._inline_rows)
    assert seen[0][0].startswith("explain")

    where: list[str] = []
    reason_codes = scorer.reason_codes

    def spy(rows):  # type: ignore[no-untyped-def]
        where.append(threading.current_thread().name)
        return reason_codes(rows)

    scorer.reason_codes = spy  # type: ignore[method-assign]
    try:
        assert await service._compute_reasons(scorer, EncodedRows(matrix)) == many
        assert where == [loop_thread]  # 40 rows <= inline_reason_rows (128)
        settings.model.inline_reason_rows = 16
        where.clear()
        assert await ScoringService(runtime, settings)._compute_reasons(scorer, EncodedRows(matrix)) == many
        assert len(where) == 2 and all(name.startswith("explain") for name in where)
    finally:
        del scorer.reason_codes
