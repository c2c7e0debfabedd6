"""SHAP explanations: trees read from the ONNX file, TreeSHAP checked against shap, and the API end to end.

Tolerances (see server.explain):
* against shap on the scikit-learn/LightGBM model: 1e-6 (the ONNX leaves are float32, LightGBM's float64);
* the compiled kernel against shap's TreeExplainer on the same (ONNX) trees: 1e-9;
* additivity, base + sum(contributions) against the float64 sum of the same trees: 1e-9;
* against ONNX's own float32 output: the raw margin to 1e-4 (float32 accumulation over the trees,
  measured ~4e-6) and the probability to 1e-6. The logit of ONNX's float32 probability is not a usable
  1e-6 reference: onnxruntime's logistic is accurate to ~1e-7 *absolute*, so at p ~ 5e-4 the logit
  is off by ~2e-4 although the margin is right.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from client import CredScopeClient, CredScopeRpcError
from credscope.v1 import applicant_pb2, scoring_pb2
from server.convert import applicant_to_row, rows_to_matrix
from server.explain import (
    COVERS_KEY,
    Explainer,
    ExplainError,
    Explanation,
    TreeModel,
    covers_entry,
    explainer_for,
)
from server.model import load_model
from server.schema import MODEL_FEATURES
from server.scoring import Scorer
from tests.test_api import GOOD, applicant, violations_of
from tests.test_model import hard_rows
from tools.train import TrainResult

ROWS = 3_000


@pytest.fixture(scope="module")
def trained(trained_model: TrainResult) -> TrainResult:
    """The session's model (conftest), with its scikit-learn pipeline for shap's reference values."""
    return trained_model


@pytest.fixture(scope="module")
def artifact(trained: TrainResult):  # type: ignore[no-untyped-def]
    return load_model(trained.model_dir, trained.version)


@pytest.fixture(scope="module")
def explainer(artifact) -> Explainer:  # type: ignore[no-untyped-def]
    return explainer_for(artifact)


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """Raw rows with many missing values: any field, all EXT_SOURCE, DAYS_EMPLOYED 365243, everything, x/0."""
    return hard_rows(ROWS, seed=23)


@pytest.fixture(scope="module")
def scored(artifact, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    probabilities, features = artifact.predict(rows)
    return probabilities, features


@pytest.fixture(scope="module")
def phi(explainer: Explainer, scored: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return explainer.shap_values(scored[1])


def onnx_raw_margin(artifact, rows: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """ONNX's own float32 margin: the same graph with the tree node's LOGISTIC switched off (test only)."""
    model = artifact.onnx_model()
    node = next(n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier")
    next(a for a in node.attribute if a.name == "post_transform").s = b"NONE"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": rows})[0][:, 1].astype(np.float64)


# ---------------------------------------------------------------------------------------------- the file

def test_covers_live_in_the_hashed_onnx_file(trained: TrainResult, artifact) -> None:  # type: ignore[no-untyped-def]
    assert sorted(p.name for p in trained.onnx_path.parent.iterdir()) == ["metadata.json", "model.onnx"]
    model = onnx.load(trained.onnx_path)
    props = {p.key: p.value for p in model.metadata_props}
    stored = json.loads(props[COVERS_KEY])
    node = next(n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier")
    n_nodes = len(next(a for a in node.attribute if a.name == "nodes_nodeids").ints)
    assert stored["format"] == 1 and stored["node"] == node.name and len(stored["covers"]) == n_nodes
    trees = TreeModel.from_onnx(model)
    assert trees.n_trees == trained.metadata["training"]["params"]["n_estimators"]  # early stopping's count
    assert trees.n_features <= len(MODEL_FEATURES)
    # covers are sample counts: each node's is the sum of its children's, the root's the bagged rows
    inner = trees.children_left >= 0
    t, n = np.nonzero(inner)
    np.testing.assert_array_equal(trees.node_sample_weight[t, n], trees.node_sample_weight[t, trees.children_left[t, n]]
                                  + trees.node_sample_weight[t, trees.children_right[t, n]])
    assert 10_000 < trees.node_sample_weight[:, 0].min() <= 16_000  # 80% bagging of 16,000 training rows
    # no covers, no explanations (and the message says what to do)
    del model.metadata_props[:]
    with pytest.raises(ExplainError, match="retrain"):
        TreeModel.from_onnx(model)


def test_trees_reproduce_the_onnx_model(artifact, explainer: Explainer, rows: np.ndarray,  # type: ignore[no-untyped-def]
                                        scored: tuple[np.ndarray, np.ndarray]) -> None:
    probabilities, features = scored
    margin = explainer.trees.margin(features)
    assert np.max(np.abs(margin - onnx_raw_margin(artifact, rows))) < 1e-4
    assert np.max(np.abs(1 / (1 + np.exp(-margin)) - probabilities)) < 1e-6
    assert np.isnan(features).any(axis=1).mean() > 0.5 and np.isinf(features).any()


# ---------------------------------------------------------------------------------------------- the numbers

def test_contributions_match_shap_on_the_sklearn_model(trained: TrainResult, explainer: Explainer,
                                                       scored: tuple[np.ndarray, np.ndarray], phi: np.ndarray) -> None:
    import shap

    lgbm = trained.pipeline.named_steps["lgbm"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = shap.TreeExplainer(lgbm, feature_perturbation="tree_path_dependent")
        expected = np.asarray(reference.shap_values(scored[1].astype(np.float64)))
    # the scikit-learn pipeline's own features are the ONNX features output (same float32 values)
    np.testing.assert_array_equal(trained.pipeline.named_steps["features"].transform(
        hard_rows(ROWS, seed=23)).astype(np.float32), scored[1])
    assert expected.shape == phi.shape == (ROWS, len(MODEL_FEATURES))
    assert np.max(np.abs(phi - expected)) < 1e-6
    assert abs(explainer.base_value - float(np.asarray(reference.expected_value).reshape(-1)[0])) < 1e-6


def test_kernel_equals_shap_tree_explainer_on_the_onnx_trees(explainer: Explainer,
                                                             scored: tuple[np.ndarray, np.ndarray],
                                                             phi: np.ndarray) -> None:
    features = scored[1][:600]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        public = np.asarray(explainer.shap_explainer.shap_values(features.astype(np.float64), check_additivity=False))
    assert np.max(np.abs(phi[:600] - public)) < 1e-9
    np.testing.assert_array_equal(explainer.reference_shap_values(features), public)
    assert abs(explainer.base_value - float(np.asarray(explainer.shap_explainer.expected_value).reshape(-1)[0])) < 1e-9


def test_additivity(artifact, explainer: Explainer, rows: np.ndarray,  # type: ignore[no-untyped-def]
                    scored: tuple[np.ndarray, np.ndarray], phi: np.ndarray) -> None:
    probabilities, features = scored
    total = explainer.base_value + phi.sum(axis=1)
    assert np.max(np.abs(total - explainer.trees.margin(features))) < 1e-9  # the float64 trees
    assert np.max(np.abs(total - onnx_raw_margin(artifact, rows))) < 1e-4  # ONNX's float32 sum
    assert np.max(np.abs(1 / (1 + np.exp(-total)) - probabilities)) < 1e-6  # ONNX's probability
    explanations = explainer.explain(features[:200])
    np.testing.assert_allclose([e.margin for e in explanations], total[:200], rtol=0, atol=1e-9)


def test_ranking_values_and_directions(explainer: Explainer, scored: tuple[np.ndarray, np.ndarray],
                                       phi: np.ndarray) -> None:
    features = scored[1][:300]
    for i, e in enumerate(explainer.explain(features)):
        assert len(e.contributions) == len(MODEL_FEATURES)
        assert {c.feature for c in e.contributions} == set(MODEL_FEATURES)
        magnitudes = [abs(c.shap_value) for c in e.contributions]
        assert magnitudes == sorted(magnitudes, reverse=True)
        for c in e.contributions:
            j = MODEL_FEATURES.index(c.feature)
            assert c.shap_value == phi[i, j]
            assert c.value is None if np.isnan(features[i, j]) else c.value == float(features[i, j])
            assert c.direction == ("increases" if c.shap_value > 0 else "decreases")
            assert c.increases_risk == (c.shap_value > 0)
        top = e.top(10)
        assert top.contributions == e.contributions[:10] and top.base_value == e.base_value
        assert top.ranked == [(c.feature, c.value, c.shap_value) for c in e.contributions[:10]]
        assert Explanation.from_dict(json.loads(json.dumps(e.to_dict()))) == e
        assert Explanation.from_bytes(e.to_bytes()) == e == Explanation.from_cached(e.to_bytes())
        assert Explanation.from_cached(e.to_dict()) == e


def test_binary_form_is_exact_and_refuses_what_it_did_not_write() -> None:
    """Every float survives (infinities stay infinities, a missing value stays missing), names with any
    character but US (0x1F) too; anything else is a ValueError (the cache then computes the value again)."""
    from server.explain import Contribution

    e = Explanation(-2.5, (Contribution("PAYMENT_RATE", math.inf, 0.75), Contribution("AGE_YEARS", None, -0.0),
                           Contribution("CREDIT_TO_INCOME", -math.inf, 5e-324), Contribution("x é", 1e308, -1.5)))
    back = Explanation.from_bytes(e.to_bytes())
    assert back == e and math.copysign(1, back.contributions[1].shap_value) == -1
    # held by column (as explanations are made and read back): the same explanation, the same bytes
    columns = Explanation.of_columns(e.base_value, list(e.names), list(e.values), list(e.shap_values))
    assert columns == e and columns.to_bytes() == e.to_bytes() and back.to_bytes() == e.to_bytes()
    assert columns.top(2) == e.top(2) and len(columns.top(2)) == 2 and columns.top(9) is columns
    assert hash(columns) == hash(e) and columns.margin == e.margin and columns.values[1] != columns.values[1]
    assert Explanation(0.5, ()) and not Explanation(0.5, ()).contributions  # there, though empty
    assert Explanation.from_bytes(Explanation(0.5, ()).to_bytes()) == Explanation(0.5, ())
    data = e.to_bytes()
    for bad in (b"", b"E1", data[:-3] + b"\xff\xfe\xfd", data[:20], b"J1" + data[2:], b'{"base_value": 1}'):
        with pytest.raises(ValueError):
            Explanation.from_bytes(bad)


def test_engineered_features_keep_their_names(explainer: Explainer, scored: tuple[np.ndarray, np.ndarray]) -> None:
    top = {c.feature for e in explainer.explain(scored[1][:200]) for c in e.top(5).contributions}
    assert top & {"EXT_SOURCE_MEAN", "EXT_SOURCE_MIN", "EXT_SOURCE_MAX", "EXT_SOURCE_PROD", "PAYMENT_RATE",
                  "CREDIT_TO_GOODS", "AGE_YEARS", "DAYS_EMPLOYED_PERC", "EMPLOYED_YEARS", "ANNUITY_TO_INCOME"}


def test_scorer_explains_raw_rows(artifact, rows: np.ndarray, phi: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    scorer = Scorer(artifact)
    assert scorer.explain_error is None
    explanations = scorer.explain(rows[:50])
    for i, e in enumerate(explanations):
        assert e.contributions[0].shap_value == phi[i, MODEL_FEATURES.index(e.contributions[0].feature)]
    assert scorer.explain(rows[:0]) == []


# ---------------------------------------------------------------------------------------------- ONNX semantics

def _tiny_ensemble(mode: str, tracks_true: int) -> onnx.ModelProto:
    """Two stumps and a two-level tree over 2 features, with the given split mode (for exactness tests)."""
    t = np.float32(0.1)  # not exactly representable in float64 terms of decimal 0.1: a real float32 edge
    attrs = dict(
        nodes_treeids=[0, 0, 0, 1, 1, 1, 1, 1],
        nodes_nodeids=[0, 1, 2, 0, 1, 2, 3, 4],
        nodes_featureids=[0, 0, 0, 1, 0, 0, 0, 0],
        nodes_modes=[mode, "LEAF", "LEAF", mode, mode, "LEAF", "LEAF", "LEAF"],
        nodes_values=[float(t), 0.0, 0.0, -2.5, float(np.float32(3.0)), 0.0, 0.0, 0.0],
        nodes_truenodeids=[1, 0, 0, 1, 3, 0, 0, 0],
        nodes_falsenodeids=[2, 0, 0, 2, 4, 0, 0, 0],
        nodes_missing_value_tracks_true=[tracks_true, 0, 0, 1 - tracks_true, tracks_true, 0, 0, 0],
        class_treeids=[0, 0, 1, 1, 1],
        class_nodeids=[1, 2, 2, 3, 4],
        class_ids=[0, 0, 0, 0, 0],
        class_weights=[0.5, -0.25, 0.125, -1.0, 2.0],
        classlabels_int64s=[0, 1],
        post_transform="LOGISTIC",
    )
    node = helper.make_node("TreeEnsembleClassifier", ["x"], ["label", "probabilities"], domain="ai.onnx.ml",
                            name="trees", **attrs)
    graph = helper.make_graph([node], "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = covers_entry("trees", [100, 60, 40, 100, 70, 30, 50, 20])
    return model


@pytest.mark.parametrize("mode", ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GT", "BRANCH_GTE"])
@pytest.mark.parametrize("tracks_true", [0, 1])
def test_split_modes_route_every_float32_like_onnxruntime(mode: str, tracks_true: int) -> None:
    model = _tiny_ensemble(mode, tracks_true)
    t0, t1 = np.float32(0.1), np.float32(3.0)
    edges = [v for t in (t0, t1, np.float32(-2.5)) for v in (np.nextafter(t, np.float32(-np.inf)), t,
                                                               np.nextafter(t, np.float32(np.inf)))]
    values = np.array([*edges, np.nan, np.inf, -np.inf, 0.0], dtype=np.float32)
    x = np.array([[a, b] for a in values for b in values], dtype=np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    p = session.run(["probabilities"], {"x": x})[0][:, 1].astype(np.float64)
    trees = TreeModel.from_onnx(model)
    margin = trees.margin(x)
    np.testing.assert_allclose(1 / (1 + np.exp(-margin)), p, rtol=0, atol=1e-6)
    explainer = Explainer(trees, ["a", "b"])
    phi = explainer.shap_values(x)
    np.testing.assert_allclose(explainer.base_value + phi.sum(axis=1), margin, rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(phi, explainer.reference_shap_values(x), rtol=0, atol=1e-12)


def test_unsupported_trees_are_refused() -> None:
    model = _tiny_ensemble("BRANCH_EQ", 0)
    with pytest.raises(ExplainError, match="BRANCH_EQ"):
        TreeModel.from_onnx(model)
    model = _tiny_ensemble("BRANCH_LEQ", 0)
    model.metadata_props[0].value = covers_entry("trees", [100, 60, 40, 100, 70, 30, 50, 25])[1]  # 50+25 != 70
    with pytest.raises(ExplainError, match="cover"):
        TreeModel.from_onnx(model)


def test_a_model_whose_trees_disagree_with_onnx_is_not_explained(artifact, explainer: Explainer,  # type: ignore[no-untyped-def]
                                                                  scored: tuple[np.ndarray, np.ndarray]) -> None:
    probabilities, features = scored
    assert explainer.verify(features, probabilities)["additivity_gap"] < 1e-9
    with pytest.raises(ExplainError, match="do not reproduce"):
        explainer.verify(features, np.clip(probabilities + 0.01, 0, 1))


# ---------------------------------------------------------------------------------------------- end to end

def _explanation_checks(e: scoring_pb2.Explanation, probability: float, k: int) -> None:
    assert len(e.contributions) == k
    magnitudes = [abs(c.shap_value) for c in e.contributions]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert len({c.feature for c in e.contributions}) == k and {c.feature for c in e.contributions} <= set(MODEL_FEATURES)
    for c in e.contributions:
        assert c.direction == (scoring_pb2.DIRECTION_INCREASES_RISK if c.shap_value > 0
                               else scoring_pb2.DIRECTION_DECREASES_RISK)
    if k == len(MODEL_FEATURES):
        margin = e.base_value + math.fsum(c.shap_value for c in e.contributions)
        assert abs(1 / (1 + math.exp(-margin)) - probability) < 1e-6


def test_score_with_explanation(client: CredScopeClient, model) -> None:  # type: ignore[no-untyped-def]
    a = applicant()
    a.ClearField("ext_source_3")
    plain = client.score(a)
    assert not plain.HasField("explanation")
    resp = client.score(a, explain=True)
    assert resp.default_probability == plain.default_probability
    _explanation_checks(resp.explanation, resp.default_probability, 10)
    full = client.score(a, explain=True, top_k=len(MODEL_FEATURES))
    _explanation_checks(full.explanation, full.default_probability, len(MODEL_FEATURES))
    assert list(full.explanation.contributions[:10]) == list(resp.explanation.contributions)
    # the same numbers as the in-process explainer of the same model file
    row, _ = applicant_to_row(a)
    local = explainer_for(model).explain(model.transform(rows_to_matrix([row])))[0]
    assert [(c.feature, c.shap_value) for c in full.explanation.contributions] == \
        [(c.feature, c.shap_value) for c in local.contributions]
    values = {c.feature: c for c in full.explanation.contributions}
    assert values["AMT_INCOME_TOTAL"].value == GOOD["amt_income_total"]
    assert not values["EXT_SOURCE_3"].HasField("value")  # missing -> unset
    assert values["PAYMENT_RATE"].value == pytest.approx(GOOD["amt_annuity"] / GOOD["amt_credit"], rel=1e-6)
    assert values["EXT_SOURCE_MEAN"].value == pytest.approx(0.6, rel=1e-6)  # EXT_SOURCE_1 and _3 missing


def test_batch_score_with_explanations(client: CredScopeClient) -> None:
    bad = applicant_pb2.Applicant()  # missing required fields
    applicants = [applicant(), bad, applicant(ext_source_2=0.1), applicant(days_employed=365243)]
    resp = client.batch_score(applicants, explain=True, top_k=5)
    assert resp.results[1].HasField("error")
    for i in (0, 2, 3):
        prediction = resp.results[i].prediction
        _explanation_checks(prediction.explanation, prediction.default_probability, 5)
        single = client.score(applicants[i], explain=True, top_k=5)
        assert list(single.explanation.contributions) == list(prediction.explanation.contributions)
    plain = client.batch_score(applicants)
    assert not plain.results[0].prediction.HasField("explanation")


def test_top_k_validation(client: CredScopeClient) -> None:
    n = len(MODEL_FEATURES)
    for call in (lambda k: client.score(applicant(), explain=True, top_k=k),
                 lambda k: client.batch_score([applicant()], explain=True, top_k=k)):
        with pytest.raises(CredScopeRpcError) as e:
            call(n + 1)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"1 to {n}" in violations_of(e.value)["explain.top_k"]
    assert len(client.score(applicant(), explain=True, top_k=1).explanation.contributions) == 1
    # top_k without enabled asks for nothing
    assert not client.score(applicant(), explain=False, top_k=n + 5).HasField("explanation")


def test_explanations_are_refused_for_a_model_without_covers(tmp_path: Path, artifact) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    model = artifact.onnx_model()
    del model.metadata_props[:]
    stripped = replace(artifact, onnx_bytes=model.SerializeToString())
    scorer = Scorer(stripped)
    assert scorer.explain_error and "retrain" in scorer.explain_error
    assert scorer.score(hard_rows(3, seed=1))  # it still scores
    with pytest.raises(ExplainError):
        scorer.explain(hard_rows(3, seed=1))

