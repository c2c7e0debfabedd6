"""Adverse-action reasons: the catalogue, the ranking by positive SHAP of the catalogue groups, and the
reasons a real server returns (Score, BatchScore, cache hits) and records in the audit trail."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from client import CredScopeClient
from credscope.v1 import scoring_pb2
from server.convert import applicant_to_row, rows_to_matrix
from server.explain import Explanation
from server.reasons import DEFAULT, DEFAULT_CATALOGUE, MAX_REASONS, Catalogue, CatalogueError, catalogue_of
from server.schema import COLUMN_NAMES, MODEL_FEATURES
from server.scoring import Scorer
from tests.audit_helpers import eventually, fetch
from tests.test_api import applicant

GOOD_EXT = {"ext_source_1": 0.8, "ext_source_2": 0.8, "ext_source_3": 0.8}
BURDEN = {"amt_annuity": 400_000.0, "amt_income_total": 60_000.0}
CREDIT = {"amt_credit": 8_000_000.0, "amt_goods_price": 4_000_000.0, "amt_income_total": 40_000.0,
          "amt_annuity": 30_000.0}
LOW_EXT = {"ext_source_1": 0.01, "ext_source_2": 0.01, "ext_source_3": 0.01}


@pytest.fixture(scope="module")
def scorer(model) -> Scorer:  # type: ignore[no-untyped-def]
    return Scorer(model)


def matrix_of(**fields: float) -> np.ndarray:
    row, violations = applicant_to_row(applicant(**fields))
    assert not violations
    return rows_to_matrix([row])


def top_codes(scorer: Scorer, m: np.ndarray) -> list[str]:
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    return [r.code for r in catalogue.reasons_for(scorer.explain(m)[0])]


def test_default_catalogue_covers_every_model_feature_once() -> None:
    assert set(DEFAULT.group_of) == set(MODEL_FEATURES)
    assert {"EXT_SCORE_LOW", "PAYMENT_BURDEN_HIGH", "SHORT_EMPLOYMENT", "HIGH_CREDIT_TO_INCOME"} <= {
        r.code for r in DEFAULT.reasons}
    assert all(r.text.endswith(".") for r in DEFAULT.reasons)
    bad = {"version": "x", "reasons": [{"code": "A", "text": "a", "features": ["F"]},
                                       {"code": "B", "text": "b", "features": ["F"]}]}
    with pytest.raises(CatalogueError):
        Catalogue.from_dict(bad)
    with pytest.raises(CatalogueError):
        Catalogue.from_dict({"version": "x"})


def test_trained_model_ships_its_catalogue(scorer: Scorer) -> None:
    assert scorer.model.metadata["reason_catalogue"] == DEFAULT_CATALOGUE
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    assert catalogue.embedded and catalogue.version == DEFAULT_CATALOGUE["version"]
    # a model trained before the catalogue existed falls back to the default (and says so)
    legacy = catalogue_of({k: v for k, v in scorer.model.metadata.items() if k != "reason_catalogue"}, "legacy")
    assert legacy is DEFAULT and not legacy.embedded


@pytest.mark.parametrize(("fields", "code"), [
    (LOW_EXT, "EXT_SCORE_LOW"),
    ({**GOOD_EXT, **BURDEN}, "PAYMENT_BURDEN_HIGH"),
    ({**GOOD_EXT, **CREDIT}, "HIGH_CREDIT_TO_INCOME"),
])
def test_constructed_applicants_get_the_reason_that_raised_their_risk(scorer: Scorer, fields: dict, code: str
                                                                      ) -> None:
    assert top_codes(scorer, matrix_of(**fields))[0] == code
    assert code not in top_codes(scorer, matrix_of(**GOOD_EXT))[:1]


def test_short_employment_raises_its_reason(scorer: Scorer) -> None:
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    i = [r.code for r in catalogue.reasons].index("SHORT_EMPLOYMENT")
    long_job = catalogue.weights(scorer.explain(matrix_of(**GOOD_EXT, days_employed=-6000))[0])[i]
    short_job = catalogue.weights(scorer.explain(matrix_of(**GOOD_EXT, days_employed=-10))[0])[i]
    assert short_job > long_job
    assert "SHORT_EMPLOYMENT" in top_codes(scorer, matrix_of(**GOOD_EXT, days_employed=-10))


def test_codes_are_exactly_the_top_groups_by_positive_shap(scorer: Scorer) -> None:
    """Property over the model's reference sample: the codes are the (at most 4) catalogue groups with the
    largest sum of positive SHAP values, computed here independently from the raw SHAP matrix."""
    sample = scorer.model.metadata["reference"]["sample"]
    assert sample["columns"] == list(COLUMN_NAMES)
    m = np.array([[np.nan if v is None else v for v in row] for row in sample["rows"][:200]], dtype=np.float32)
    features = list(scorer.model.features)
    shap = scorer.explainer.shap_values(scorer.model.transform(m))  # type: ignore[union-attr]
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    groups = {r["code"]: [features.index(f) for f in r["features"]] for r in DEFAULT_CATALOGUE["reasons"]}
    for row_shap, explanation in zip(shap, scorer.explain(m), strict=True):
        positive = np.clip(row_shap, 0, None)
        weight = {code: float(positive[idx].sum()) for code, idx in groups.items()}
        expected = sorted((c for c, w in weight.items() if w > 0), key=lambda c: (-weight[c], c))[:MAX_REASONS]
        got = [r.code for r in catalogue.reasons_for(explanation)]
        assert got[:len(expected)] == expected[:len(got)] and len(got) == len(expected)


def test_fast_reason_codes_equal_the_codes_of_the_explanation(scorer: Scorer) -> None:
    """``Scorer.reason_codes`` (the SHAP matrix straight to codes, what Score and BatchScore use when no
    explanation is asked for) gives exactly the codes of the full explanation, row by row, for a batch or
    one row at a time, missing values included; and the weights are the same bits either way."""
    sample = scorer.model.metadata["reference"]["sample"]
    m = np.array([[np.nan if v is None else v for v in row] for row in sample["rows"][:300]], dtype=np.float32)
    assert np.isnan(m).any(axis=1).sum() > 10  # rows with missing values are in the sample
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    explanations = scorer.explain(m)
    slow = [[r.code for r in catalogue.reasons_for(e)] for e in explanations]
    batch = scorer.reason_codes(m)
    assert batch == slow
    assert [scorer.reason_codes(m[i:i + 1])[0] for i in range(0, 300, 7)] == slow[::7]
    assert sum(1 for c in batch if c) > 250 and all(len(c) <= MAX_REASONS for c in batch)
    phi = scorer.explainer.shap_values(scorer.model.transform(m))  # type: ignore[union-attr]
    fast = catalogue.weight_matrix(phi, scorer.explainer.feature_names)  # type: ignore[union-attr]
    for i in range(0, 300, 13):
        assert fast[i].tolist() == catalogue.weights(explanations[i])  # identical, not just close
    for i in range(300):  # also through the explanation's contributions (its other form)
        assert fast[i].tolist() == catalogue.weights(Explanation(explanations[i].base_value,
                                                                 explanations[i].contributions))


def test_reasons_of_many_explanations_keep_no_state_per_applicant(scorer: Scorer) -> None:
    """Each explanation ranks the features its own way; the catalogue once kept a column map per ranking
    (one entry per explained applicant, never freed). Now: one map, for the explainer's feature order."""
    sample = scorer.model.metadata["reference"]["sample"]
    m = np.array([[np.nan if v is None else v for v in row] for row in sample["rows"][:500]], dtype=np.float32)
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    explanations = scorer.explain(m)
    assert len({tuple(e.names[:10]) for e in explanations}) > 100  # many rankings
    for e in explanations:
        catalogue.reasons_for(e)
    scorer.reason_codes(m)
    assert len(catalogue._column_cache) <= 1  # noqa: SLF001


def test_server_returns_and_audits_reasons(server, client: CredScopeClient, scorer: Scorer) -> None:  # type: ignore[no-untyped-def]
    rejected = client.score(applicant(**LOW_EXT))
    assert rejected.decision in (scoring_pb2.DECISION_REVIEW, scoring_pb2.DECISION_REJECT)
    codes = [r.code for r in rejected.reasons]
    assert codes[0] == "EXT_SCORE_LOW" and 1 <= len(codes) <= MAX_REASONS
    assert codes == top_codes(scorer, matrix_of(**LOW_EXT))
    texts = {r.code: r.text for r in DEFAULT.reasons}
    assert all(r.text == texts[r.code] for r in rejected.reasons)
    assert not rejected.HasField("explanation")  # reasons without an explanation asked for

    again = client.score(applicant(**LOW_EXT))  # a cache hit gives the same reasons
    assert again.from_cache and [r.code for r in again.reasons] == codes

    approved = client.score(applicant(**GOOD_EXT))
    assert approved.decision == scoring_pb2.DECISION_APPROVE and not approved.reasons

    review = {**CREDIT, "ext_source_2": 0.3, "ext_source_3": 0.3}
    batch = client.call(client.scoring.BatchScore, scoring_pb2.BatchScoreRequest(
        applicants=[applicant(**GOOD_EXT), applicant(**review), applicant(**LOW_EXT)]))
    preds = [r.prediction for r in batch.results]
    assert not preds[0].reasons
    assert [r.code for r in preds[2].reasons] == codes
    if preds[1].decision != scoring_pb2.DECISION_APPROVE:
        assert [r.code for r in preds[1].reasons] == top_codes(scorer, matrix_of(**review))

    url = f"sqlite:///{Path(server.cwd) / 'credscope.db'}"
    ids = [rejected.request_id, approved.request_id, preds[2].request_id]

    async def rows() -> dict[str, list[str]] | None:
        found = await fetch(url, "SELECT request_id, reason_codes FROM predictions WHERE request_id IN ("
                            + ", ".join(f"'{i}'" for i in ids) + ")")
        return {r: json.loads(c) for r, c in found} if len(found) == len(ids) else None

    audited = asyncio.run(eventually(rows))
    assert audited == {rejected.request_id: codes, approved.request_id: [], preds[2].request_id: codes}


def test_ranking_many_rows_at_once_equals_ranking_each_row(scorer: Scorer) -> None:
    """``codes_for`` ranks a batch with numpy: the same codes as :meth:`Catalogue.ranked` row by row, ties
    (broken by code), zero and negative weights (never a reason) and rows with fewer than 4 reasons included."""
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    rng = np.random.default_rng(7)
    weights = np.round(rng.random((3000, len(catalogue.reasons))) * 4) / 4 - 0.5  # many ties, zeros, negatives
    weights[::5] = -1.0  # no reason at all
    weights[1::7, 2:] = 0.0  # at most two

    class Fixed(Catalogue):
        def weight_matrix(self, phi: np.ndarray, feature_names: object) -> np.ndarray:  # type: ignore[override]
            return weights[: len(phi)]

    fixed = Fixed(catalogue.version, catalogue.reasons, catalogue.features, catalogue.embedded)
    for n in (3000, 9, 3):  # numpy from 8 rows on, Python below
        got = fixed.codes_for(np.zeros((n, 1)), ())
        assert got == [[r.code for r in fixed.ranked(w)] for w in weights[:n].tolist()]
    assert {len(c) for c in fixed.codes_for(np.zeros((3000, 1)), ())} == {0, 1, 2, 3, 4}


def test_a_nan_shap_value_weighs_the_same_from_an_explanation_and_from_the_matrix(scorer: Scorer) -> None:
    """Both ways keep a NaN (no reason of NaN weight is given), so Score, BatchScore and replay agree."""
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    names = list(scorer.model.features)
    phi = np.linspace(-0.5, 0.5, len(names))
    phi[names.index(catalogue.features[0][0])] = np.nan
    explanation = Explanation.of_columns(0.0, names, [0.0] * len(names), phi.tolist())
    from_matrix = catalogue.weight_matrix(phi[None, :], names)[0].tolist()
    assert repr(catalogue.weights(explanation)) == repr(from_matrix) and np.isnan(from_matrix[0])
    assert catalogue.codes_for(np.repeat(phi[None, :], 9, axis=0), names)[0] == [
        r.code for r in catalogue.reasons_for(explanation)]
