"""Train the CredScope model and export it as one ONNX graph plus its metadata.

The exported graph takes ONE float32 tensor ``input`` of shape ``[N, len(COLUMNS)]``, the raw
applicant columns of :data:`server.schema.COLUMNS` in schema order (categorical = index into
``Column.categories``, flags 1/0, missing = NaN). Inside the graph:

1. :class:`FeatureEngineer` appends :data:`server.schema.ENGINEERED` (EXT_SOURCE mean/min/max/
   product, payment rate, ...), built from plain ONNX operators by a converter registered with
   skl2onnx, so serving holds no feature code;
2. a LightGBM ``LGBMClassifier`` (exported through onnxmltools' converter, registered with
   skl2onnx's ``update_registered_converter``) scores the :data:`server.schema.MODEL_FEATURES`.

How many trees: boosting stops early on a validation split of the training rows (never the holdout):
it is fitted on 80% of them up to ``n_estimators`` rounds, the round after which the validation
log-loss stopped improving for :data:`EARLY_STOPPING_ROUNDS` rounds is kept, and the model is refitted
on all the training rows with that many trees. The metadata records both (``training.params`` is the
final fit, ``training.early_stopping`` how its size was chosen).

Outputs: ``probabilities`` (float32 ``[N, 2]``; P(default) is column 1), ``label`` (int64 ``[N]``)
and ``features`` (float32 ``[N, len(MODEL_FEATURES)]``, what the trees see; for explanations and
drift).

The model store written by :func:`train`::

    <model-dir>/<version>/model.onnx      version = sha256(model.onnx)[:16]
    <model-dir>/<version>/metadata.json
    <model-dir>/ACTIVE                    the active version (replaced atomically)

Command line: ``credscope-train`` / ``python -m tools.train --help``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightgbm import LGBMClassifier
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from server.reasons import DEFAULT_CATALOGUE
from server.schema import (
    BY_NAME,
    COLUMN_NAMES,
    COLUMNS,
    DAYS_EMPLOYED_UNEMPLOYED,
    ENGINEERED,
    MODEL_FEATURES,
)
from tools.covers import add_tree_covers

__all__ = [
    "DECISION_POLICY",
    "DEFAULT_PARAMS",
    "FeatureEngineer",
    "TrainResult",
    "build_pipeline",
    "encode_frame",
    "engineer_features",
    "export_onnx",
    "fit_pipeline",
    "float32_thresholds",
    "load_frame",
    "main",
    "reference_profile",
    "register_converters",
    "train",
    "version_of",
]

FORMAT_VERSION = 1
INPUT_NAME = "input"
PROBA_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
FEATURES_OUTPUT = "features"
PROBA_COLUMN = 1
#: Opsets that convert and run (onnxmltools' LightGBM converter refuses main opset 17).
TARGET_OPSET: dict[str, int] = {"": 15, "ai.onnx.ml": 3}
HOLDOUT_FRACTION = 0.2
VALIDATION_FRACTION = 0.2
"""Share of the training rows that early stopping validates on (the model is then refitted on all)."""
EARLY_STOPPING_ROUNDS = 50
"""Boosting stops when the validation log-loss has not improved for this many rounds (0: no early stop)."""
MIN_CLASS_ROWS_FOR_EARLY_STOPPING = 20
"""Fewer training rows than this of either class: no validation split, all ``n_estimators`` rounds."""
REFERENCE_SAMPLE_ROWS = 2000
ONNX_TOLERANCE = 1e-4
"""Training fails if ONNX and scikit-learn probabilities differ by more than this on the holdout."""

DECISION_POLICY: dict[str, Any] = {
    "approve_below": 0.20,
    "review_below": 0.50,
    "risk_levels": [["VERY_LOW", 0.10], ["LOW", 0.20], ["MEDIUM", 0.35], ["HIGH", 0.50], ["VERY_HIGH", 1.0]],
}

#: LightGBM hyper-parameters; ``n_estimators``, ``num_leaves`` and ``learning_rate`` are CLI options.
#: ``n_estimators`` is the most boosting rounds: early stopping picks the count (see the module doc).
#: Small trees: on the synthetic data (100,000 rows, seed 42) 7 leaves at 0.1 with 200 rows a leaf
#: stop at 99 trees, with a holdout ROC-AUC of 0.7897 against 0.7837 for the fixed 300 trees of 31
#: leaves at 0.05 used before (past their best there: their validation log-loss bottoms out near 100).
DEFAULT_PARAMS: dict[str, Any] = {
    "n_estimators": 1000,
    "num_leaves": 7,
    "learning_rate": 0.1,
    "min_child_samples": 200,
    "subsample": 0.8,
    "subsample_freq": 1,
    "colsample_bytree": 0.8,
    "reg_lambda": 1.0,
}
_FIXED_PARAMS: dict[str, Any] = {"n_jobs": 2, "deterministic": True, "force_row_wise": True, "verbose": -1}

_IDX = {name: i for i, name in enumerate(COLUMN_NAMES)}
_EXT = ("EXT_SOURCE_1", "EXT_SOURCE_2", "EXT_SOURCE_3")
_F32 = np.float32
_DAYS_PER_YEAR = _F32(365.25)

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Encoding: Home Credit-shaped DataFrame -> the model's raw float32 matrix
# --------------------------------------------------------------------------------------------

_FLAG_VALUES = {"Y": 1.0, "N": 0.0, "y": 1.0, "n": 0.0, "1": 1.0, "0": 0.0, "True": 1.0, "False": 0.0,
                "true": 1.0, "false": 0.0, 1: 1.0, 0: 0.0}  # 1 == 1.0 == True as dict keys


def encode_frame(df: pd.DataFrame) -> np.ndarray:
    """Encode a Home Credit-shaped frame as the model input matrix (float32 ``[N, len(COLUMNS)]``).

    Columns follow :data:`server.schema.COLUMNS`: numbers as they are, flags ``Y``/``N`` as 1/0,
    categoricals as the index of their string in ``Column.categories``. Extra columns are ignored;
    absent columns, unknown category strings and unparsable values become NaN.
    """
    n = len(df)
    out = np.full((n, len(COLUMNS)), np.nan, dtype=np.float32)
    for j, col in enumerate(COLUMNS):
        if col.name not in df.columns:
            continue
        s = df[col.name]
        if col.kind == "numeric":
            values = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        elif col.kind == "flag":
            values = s.map(lambda v: _FLAG_VALUES.get(v, np.nan)).to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            codes = {name: float(k) for k, name in enumerate(col.categories)}
            values = s.map(lambda v, c=codes: c.get(v, np.nan)).to_numpy(dtype=np.float64, na_value=np.nan)
        out[:, j] = values
    return out


def load_frame(path: Path) -> pd.DataFrame:
    """Read a training CSV (real ``application_train.csv`` or datagen output), keeping only what is used.

    Requires ``TARGET`` and the required schema columns; other schema columns may be absent (NaN).
    Rows without a TARGET are dropped.
    """
    header = pd.read_csv(path, nrows=0).columns
    missing = [c.name for c in COLUMNS if c.required and c.name not in header]
    if "TARGET" not in header:
        missing.insert(0, "TARGET")
    if missing:
        raise ValueError(f"{path}: required column(s) missing: {', '.join(missing)}")
    wanted = {"TARGET", *COLUMN_NAMES}
    text_cols = {c.name: str for c in COLUMNS if c.kind != "numeric" and c.name in header}
    frame = pd.read_csv(path, usecols=lambda c: c in wanted, dtype=text_cols, low_memory=False)
    frame = frame[frame["TARGET"].notna()].reset_index(drop=True)
    bad = ~frame["TARGET"].isin([0, 1])
    if bad.any():
        raise ValueError(f"{path}: TARGET must be 0 or 1 ({int(bad.sum())} rows are not)")
    return frame


# --------------------------------------------------------------------------------------------
# Feature engineering: numpy reference and scikit-learn transformer
# --------------------------------------------------------------------------------------------

#: Engineered ratios, in ENGINEERED order: (name, numerator column, denominator column or constant).
#: AGE_YEARS = -DAYS_BIRTH / 365.25 is computed as DAYS_BIRTH / -365.25 (bit-identical in IEEE).
_RATIOS: tuple[tuple[str, str, str | float], ...] = (
    ("PAYMENT_RATE", "AMT_ANNUITY", "AMT_CREDIT"),
    ("CREDIT_TO_INCOME", "AMT_CREDIT", "AMT_INCOME_TOTAL"),
    ("ANNUITY_TO_INCOME", "AMT_ANNUITY", "AMT_INCOME_TOTAL"),
    ("CREDIT_TO_GOODS", "AMT_CREDIT", "AMT_GOODS_PRICE"),
    ("DAYS_EMPLOYED_PERC", "DAYS_EMPLOYED", "DAYS_BIRTH"),
    ("INCOME_PER_PERSON", "AMT_INCOME_TOTAL", "CNT_FAM_MEMBERS"),
    ("AGE_YEARS", "DAYS_BIRTH", -365.25),
    ("EMPLOYED_YEARS", "DAYS_EMPLOYED", -365.25),
)
_EXT_IDX = np.array([_IDX[name] for name in _EXT], dtype=np.int64)
_NUM_IDX = np.array([_IDX[num] for _, num, _ in _RATIOS], dtype=np.int64)
_DEN_IS_COLUMN = np.array([isinstance(den, str) for _, _, den in _RATIOS])
_DEN_IDX = np.array([_IDX[den] if isinstance(den, str) else 0 for _, _, den in _RATIOS], dtype=np.int64)
_DEN_CONST = np.array([np.nan if isinstance(den, str) else den for _, _, den in _RATIOS], dtype=_F32)
#: NaN everywhere except the DAYS_EMPLOYED column, which holds the "not employed" code (NaN never compares equal).
_CODE_ROW = np.full(len(COLUMNS), np.nan, dtype=_F32)
_CODE_ROW[_IDX["DAYS_EMPLOYED"]] = DAYS_EMPLOYED_UNEMPLOYED
assert ENGINEERED == ("EXT_SOURCE_MEAN", "EXT_SOURCE_MIN", "EXT_SOURCE_MAX", "EXT_SOURCE_PROD",
                      *(name for name, _, _ in _RATIOS))


def engineer_features(x: np.ndarray) -> np.ndarray:
    """Append :data:`server.schema.ENGINEERED` to the raw matrix (numpy, float32).

    This is the reference for the ONNX converter below, which performs the same float32 operations
    in the same order, so the two agree exactly. Returns ``[N, len(MODEL_FEATURES)]``.

    * EXT_SOURCE_MEAN/MIN/MAX: over the present EXT_SOURCE_1..3, NaN if all three are missing;
      EXT_SOURCE_PROD: their product, NaN if any is missing.
    * the ratios of :data:`_RATIOS`; DAYS_EMPLOYED's 365243 code counts as missing; any missing
      input makes the feature NaN.
    """
    x = np.asarray(x, dtype=_F32)
    if x.ndim != 2 or x.shape[1] != len(COLUMNS):
        raise ValueError(f"expected a matrix with {len(COLUMNS)} columns, got shape {x.shape}")
    nan, inf = _F32(np.nan), _F32(np.inf)
    with np.errstate(all="ignore"):
        ext = x[:, _EXT_IDX]
        missing = np.isnan(ext)
        filled = np.where(missing, _F32(0.0), ext)
        present = np.where(missing, _F32(0.0), _F32(1.0))
        total = (filled[:, 0:1] + filled[:, 1:2]) + filled[:, 2:3]  # left to right, like ReduceSum
        count = (present[:, 0:1] + present[:, 1:2]) + present[:, 2:3]
        stats = np.concatenate([total / count,
                                np.where(missing, inf, ext).min(axis=1, keepdims=True),
                                np.where(missing, -inf, ext).max(axis=1, keepdims=True)], axis=1)
        stats = np.where(count == _F32(0.0), nan, stats)
        product = (ext[:, 0:1] * ext[:, 1:2]) * ext[:, 2:3]  # left to right, like ReduceProd
        cleaned = np.where(x == _CODE_ROW, nan, x)
        denominators = np.where(_DEN_IS_COLUMN, cleaned[:, _DEN_IDX], _DEN_CONST)
        ratios = cleaned[:, _NUM_IDX] / denominators
    return np.concatenate([x, stats, product, ratios], axis=1).astype(_F32, copy=False)



class FeatureEngineer(TransformerMixin, BaseEstimator):
    """Stateless transformer: raw schema matrix -> raw columns + :data:`server.schema.ENGINEERED`.

    Exported to ONNX by the converter that :func:`register_converters` registers with skl2onnx.
    """

    def fit(self, X: np.ndarray, y: Any = None) -> FeatureEngineer:
        """Check the width of ``X``; there is nothing to learn."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != len(COLUMNS):
            raise ValueError(f"expected {len(COLUMNS)} columns, got shape {X.shape}")
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Return ``[N, len(MODEL_FEATURES)]`` float32 (see :func:`engineer_features`)."""
        check_is_fitted(self, "n_features_in_")
        return engineer_features(X)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names of the output columns: :data:`server.schema.MODEL_FEATURES`."""
        return np.array(MODEL_FEATURES, dtype=object)


# --------------------------------------------------------------------------------------------
# ONNX conversion
# --------------------------------------------------------------------------------------------

def _feature_engineer_shape(operator: Any) -> None:
    """skl2onnx shape calculator: ``[N, len(COLUMNS)]`` -> ``[N, len(MODEL_FEATURES)]`` float."""
    from skl2onnx.common.data_types import FloatTensorType

    n = operator.inputs[0].get_first_dimension()
    operator.outputs[0].type = FloatTensorType([n, len(MODEL_FEATURES)])


def _feature_engineer_converter(scope: Any, operator: Any, container: Any) -> None:
    """skl2onnx converter: the float32 computation of :func:`engineer_features` in ONNX operators.

    Vectorised over column blocks (about twenty nodes), because onnxruntime's cost for one row is
    mostly per node.
    """
    from skl2onnx.algebra.onnx_ops import (
        OnnxConcat,
        OnnxDiv,
        OnnxEqual,
        OnnxGather,
        OnnxIsNaN,
        OnnxReduceMax,
        OnnxReduceMin,
        OnnxReduceProd,
        OnnxReduceSumApi11,
        OnnxWhere,
    )

    opv = container.target_opset
    X = operator.inputs[0]
    nan, zero, one, inf = (np.array([v], dtype=_F32) for v in (np.nan, 0.0, 1.0, np.inf))

    def cols(source: Any, indices: np.ndarray) -> Any:
        return OnnxGather(source, indices.astype(np.int64), axis=1, op_version=opv)

    def reduce(op: Any, source: Any) -> Any:
        # onnxruntime reduces a row left to right, (t0 + t1) + t2 like engineer_features (tested)
        return op(source, axes=[1], keepdims=1, op_version=opv)

    ext = cols(X, _EXT_IDX)
    missing = OnnxIsNaN(ext, op_version=opv)
    count = reduce(OnnxReduceSumApi11, OnnxWhere(missing, zero, one, op_version=opv))
    mean = OnnxDiv(reduce(OnnxReduceSumApi11, OnnxWhere(missing, zero, ext, op_version=opv)), count,
                   op_version=opv)
    low = reduce(OnnxReduceMin, OnnxWhere(missing, inf, ext, op_version=opv))
    high = reduce(OnnxReduceMax, OnnxWhere(missing, -inf, ext, op_version=opv))
    stats = OnnxWhere(OnnxEqual(count, zero, op_version=opv), nan,
                      OnnxConcat(mean, low, high, axis=1, op_version=opv), op_version=opv)
    product = reduce(OnnxReduceProd, ext)
    cleaned = OnnxWhere(OnnxEqual(X, _CODE_ROW, op_version=opv), nan, X, op_version=opv)
    denominators = OnnxWhere(_DEN_IS_COLUMN, cols(cleaned, _DEN_IDX), _DEN_CONST, op_version=opv)
    ratios = OnnxDiv(cols(cleaned, _NUM_IDX), denominators, op_version=opv)
    result = OnnxConcat(X, stats, product, ratios, axis=1, op_version=opv, output_names=[operator.outputs[0]])
    result.add_to(scope, container)



_REGISTERED = False


def register_converters() -> None:
    """Register the FeatureEngineer and LightGBM converters with skl2onnx (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes

    update_registered_converter(FeatureEngineer, "CredScopeFeatureEngineer", _feature_engineer_shape,
                                _feature_engineer_converter)
    update_registered_converter(LGBMClassifier, "LightGbmLGBMClassifier",
                                calculate_linear_classifier_output_shapes, convert_lightgbm,
                                options={"nocl": [True, False], "zipmap": [True, False, "columns"]})
    _REGISTERED = True


def export_onnx(pipeline: Pipeline) -> bytes:
    """Convert the fitted pipeline to ONNX bytes (deterministic for the same fitted pipeline).

    The graph gets a third output, ``features``: the matrix the trees see, and the trees' node covers
    (for TreeSHAP explanations) in ``metadata_props`` (:func:`tools.covers.add_tree_covers`).
    """
    import onnx
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    register_converters()
    model = to_onnx(pipeline, initial_types=[(INPUT_NAME, FloatTensorType([None, len(COLUMNS)]))],
                    target_opset=dict(TARGET_OPSET), options={LGBMClassifier: {"zipmap": False}})
    graph = model.graph
    trees = [node for node in graph.node if node.op_type == "TreeEnsembleClassifier"]
    if len(trees) != 1:
        raise RuntimeError(f"expected one TreeEnsembleClassifier in the graph, found {len(trees)}")
    graph.node.append(onnx.helper.make_node("Identity", [trees[0].input[0]], [FEATURES_OUTPUT],
                                            name="features_output"))
    graph.output.append(onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT,
                                                           [None, len(MODEL_FEATURES)]))
    outputs = [o.name for o in graph.output]
    if outputs != [LABEL_OUTPUT, PROBA_OUTPUT, FEATURES_OUTPUT]:
        raise RuntimeError(f"unexpected ONNX outputs {outputs}")
    model.doc_string = "CredScope credit-risk model: raw applicant matrix -> P(default) in probabilities[:, 1]"
    # node covers for TreeSHAP, in the same file (see server.explain / tools.covers)
    add_tree_covers(model, pipeline.named_steps["lgbm"].booster_)
    # skl2onnx lists the opsets in set order, which follows the process's hash seed: the same model would get
    # another version from run to run (and the bench's refitted peer another model). One order: by domain.
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets)
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


# --------------------------------------------------------------------------------------------
# Pipeline, metrics and reference profile
# --------------------------------------------------------------------------------------------

def build_pipeline(params: dict[str, Any] | None = None, seed: int = 42) -> Pipeline:
    """The unfitted pipeline: :class:`FeatureEngineer` then ``LGBMClassifier``."""
    merged = {**DEFAULT_PARAMS, **(params or {}), **_FIXED_PARAMS, "random_state": seed}
    return Pipeline([("features", FeatureEngineer()), ("lgbm", LGBMClassifier(**merged))])


def float32_thresholds(model: LGBMClassifier) -> int:
    """Round every split threshold of a fitted LightGBM model down to a float32; return how many changed.

    LightGBM keeps float64 thresholds, ONNX tree ensembles compare in float32. A float64 threshold
    ``t`` that rounds *up* to the float32 ``f`` sends an input equal to ``f`` left in ONNX and right in
    LightGBM. Replacing ``t`` by the largest float32 ``<= t`` changes no decision for float32 inputs
    (no float32 lies between the two) and makes the ONNX thresholds exact.
    """
    import lightgbm

    lines = model.booster_.model_to_string().split("\n")
    changed = 0
    for i, line in enumerate(lines):
        if line.startswith("num_cat=") and line != "num_cat=0":
            raise ValueError("categorical splits are not supported by float32_thresholds")
        if not line.startswith("threshold="):
            continue
        exact = np.array(line[len("threshold="):].split(), dtype=np.float64)
        rounded = exact.astype(_F32)
        up = rounded.astype(np.float64) > exact
        rounded[up] = np.nextafter(rounded[up], _F32(-np.inf))
        changed += int(np.count_nonzero(rounded.astype(np.float64) != exact))
        lines[i] = "threshold=" + " ".join(repr(float(v)) for v in rounded)
    # tree_sizes holds byte offsets of the trees, which the edit invalidates; without it LightGBM
    # parses the trees sequentially.
    lines = [line for line in lines if not line.startswith("tree_sizes=")]
    model._Booster = lightgbm.Booster(model_str="\n".join(lines))
    return changed


def fit_pipeline(x: np.ndarray, y: np.ndarray, params: dict[str, Any] | None = None, seed: int = 42) -> Pipeline:
    """Build and fit the pipeline on the raw matrix ``x``, with float32-exact tree thresholds."""
    pipeline = build_pipeline(params, seed)
    pipeline.fit(np.asarray(x, dtype=_F32), y)
    float32_thresholds(pipeline.named_steps["lgbm"])
    return pipeline


@dataclass(frozen=True)
class EarlyStop:
    """How the number of trees was chosen: ``trees`` of at most ``max_trees`` rounds (``rounds`` 0: not chosen)."""

    trees: int
    max_trees: int
    rounds: int
    validation_rows: int = 0
    validation_log_loss: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "max_estimators": self.max_trees, "best_iteration": self.trees,
                "validation_fraction": VALIDATION_FRACTION if self.validation_rows else 0.0,
                "validation_rows": self.validation_rows, "validation_log_loss": self.validation_log_loss}


def choose_trees(x: np.ndarray, y: np.ndarray, params: dict[str, Any] | None = None, seed: int = 42,
                 rounds: int = EARLY_STOPPING_ROUNDS) -> EarlyStop:
    """Pick the number of boosting rounds by early stopping on a stratified validation split of ``x``.

    Fits up to ``params["n_estimators"]`` rounds on the rest and keeps the round of the lowest
    validation log-loss once ``rounds`` rounds in a row have not improved it. ``rounds`` 0, or fewer
    than :data:`MIN_CLASS_ROWS_FOR_EARLY_STOPPING` rows of a class, keeps all the rounds.
    """
    import lightgbm

    pipeline = build_pipeline(params, seed)
    max_trees = int(pipeline.named_steps["lgbm"].n_estimators)
    if rounds <= 0 or np.bincount(y, minlength=2).min() < MIN_CLASS_ROWS_FOR_EARLY_STOPPING:
        return EarlyStop(max_trees, max_trees, 0)
    x_fit, x_val, y_fit, y_val = train_test_split(np.asarray(x, dtype=_F32), y, test_size=VALIDATION_FRACTION,
                                                  stratify=y, random_state=seed)
    pipeline.fit(x_fit, y_fit, lgbm__eval_X=engineer_features(x_val), lgbm__eval_y=y_val,
                 lgbm__eval_metric="binary_logloss",
                 lgbm__callbacks=[lightgbm.early_stopping(rounds, first_metric_only=True, verbose=False)])
    booster = pipeline.named_steps["lgbm"].booster_
    best = int(booster.best_iteration) or max_trees
    loss = float(booster.best_score["valid_0"]["binary_logloss"])
    return EarlyStop(best, max_trees, rounds, int(len(y_val)), loss)


def _json_number(value: float) -> float | None:
    """A float32 value as the shortest JSON number that reads back to the same float32 (None for NaN)."""
    v = _F32(value)
    return None if np.isnan(v) else float(str(v))


def reference_profile(features: np.ndarray, raw: np.ndarray, seed: int,
                      sample_rows: int = REFERENCE_SAMPLE_ROWS) -> dict[str, Any]:
    """Drift reference for every model feature, plus a sample of raw rows for KS tests.

    ``features`` is ``[N, len(MODEL_FEATURES)]`` (raw + engineered), ``raw`` the raw matrix.
    Numeric features get decile edges (deduplicated); bins are right-closed:
    bin 0 = (-inf, e0], bin i = (e[i-1], e[i]], last bin = (e[-1], +inf), i.e. the bin of ``v`` is
    ``numpy.searchsorted(edges, v, side="left")``. Categorical/flag features get one bin per category
    code. Proportions are over non-missing values; ``missing_rate`` is the share of NaN.
    """
    profile: dict[str, Any] = {}
    for j, name in enumerate(MODEL_FEATURES):
        values = features[:, j].astype(np.float64)
        present = values[~np.isnan(values)]
        entry: dict[str, Any] = {"missing_rate": float(1.0 - present.size / max(values.size, 1))}
        column = BY_NAME.get(name)
        if column is not None and column.kind in ("categorical", "flag"):
            categories = list(column.categories) if column.kind == "categorical" else ["N", "Y"]
            counts = np.bincount(present.astype(np.int64).clip(0, len(categories) - 1), minlength=len(categories))
            entry.update(kind=column.kind, categories=categories,
                         proportions=(counts / max(present.size, 1)).tolist())
        else:
            finite = present[np.isfinite(present)]
            if finite.size:
                edges = np.unique(np.quantile(finite, np.linspace(0.1, 0.9, 9), method="inverted_cdf"))
                counts = np.bincount(np.searchsorted(edges, present, side="left"), minlength=edges.size + 1)
                entry.update(kind="numeric", edges=[_json_number(e) for e in edges],
                             proportions=(counts / present.size).tolist(),
                             mean=float(finite.mean()), std=float(finite.std()),
                             min=float(finite.min()), max=float(finite.max()))
            else:
                entry.update(kind="numeric", edges=[], proportions=[1.0] if present.size else [])
        profile[name] = entry
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(raw.shape[0], size=min(sample_rows, raw.shape[0]), replace=False))
    rows = [[_json_number(v) for v in row] for row in raw[take]]
    return {
        "source": "training split",
        "n_rows": int(features.shape[0]),
        "binning": "right-closed bins: (-inf, e0], (e0, e1], ..., (e_last, +inf) = "
                   "numpy.searchsorted(edges, value, side='left'); proportions over non-missing values",
        "features": profile,
        "sample": {"columns": list(COLUMN_NAMES), "rows": rows},
    }


def _package_versions() -> dict[str, str]:
    names = ["numpy", "pandas", "scikit-learn", "scipy", "lightgbm", "skl2onnx", "onnxmltools", "onnx",
             "onnxruntime"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _onnx_proba(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return session.run([PROBA_OUTPUT], {INPUT_NAME: x})[0][:, PROBA_COLUMN].astype(np.float64)


# --------------------------------------------------------------------------------------------
# The model store
# --------------------------------------------------------------------------------------------

def _metadata_json(metadata: dict[str, Any]) -> str:
    """Indented JSON, except the reference sample, which gets one compact line per row."""
    sample = metadata["reference"]["sample"]
    placeholder = "@@SAMPLE_ROWS@@"
    shallow = {**metadata, "reference": {**metadata["reference"], "sample": {**sample, "rows": placeholder}}}
    text = json.dumps(shallow, indent=1, allow_nan=False)
    rows = ",\n".join(json.dumps(row, separators=(",", ":"), allow_nan=False) for row in sample["rows"])
    return text.replace(json.dumps(placeholder), "[\n" + rows + "\n]", 1) + "\n"


def version_of(onnx_bytes: bytes) -> str:
    """The model version: the first 16 hex digits of the SHA-256 of the ONNX bytes."""
    return hashlib.sha256(onnx_bytes).hexdigest()[:16]


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    version: str
    model_dir: Path
    onnx_path: Path
    metadata_path: Path
    metadata: dict[str, Any]
    activated: bool
    pipeline: Pipeline = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)


def _progress_to_stderr(message: str) -> None:
    """The command line's progress output."""
    print(message, file=sys.stderr, flush=True)


def train(data: Path | None = None, *, rows: int = 100_000, seed: int = 42, model_dir: Path = Path("models"),
          params: dict[str, Any] | None = None, n_estimators: int | None = None, num_leaves: int | None = None,
          learning_rate: float | None = None, early_stopping_rounds: int = EARLY_STOPPING_ROUNDS,
          activate: bool = True, quiet: bool = True, log: Log | None = None) -> TrainResult:
    """Train, export, evaluate and store a model; return where it went.

    ``data`` is a CSV shaped like Home Credit's ``application_train.csv`` (the real file or datagen
    output); without it ``rows`` synthetic rows are generated with ``seed``. ``params`` override
    :data:`DEFAULT_PARAMS`, and ``n_estimators`` / ``num_leaves`` / ``learning_rate`` override
    ``params``; ``n_estimators`` is the most rounds when ``early_stopping_rounds`` > 0 (see
    :func:`choose_trees`), the exact count when it is 0. Progress lines go to ``log`` if given, else to
    stderr unless ``quiet``. With
    ``activate`` the new version is written to ``<model_dir>/ACTIVE``.
    """
    params = dict(params or {})
    for key, value in (("n_estimators", n_estimators), ("num_leaves", num_leaves), ("learning_rate", learning_rate)):
        if value is not None:
            params[key] = value
    say = log or ((lambda _msg: None) if quiet else _progress_to_stderr)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    clock = [started]

    def stage(name: str, detail: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 3)
        clock[0] = now
        say(f"[{now - started:6.1f}s] {name:<9} {detail} ({timings[name]:.1f}s)")

    if data is None:
        from tools.datagen import generate

        frame = generate(rows, seed)
        source = "synthetic"
        stage("data", f"generated {len(frame):,} synthetic rows (seed {seed})")
    else:
        frame = load_frame(Path(data))
        source = Path(data).name
        stage("data", f"read {len(frame):,} rows from {data}")
    if len(frame) < 100:
        raise ValueError(f"too few rows to train on: {len(frame)}")

    x = encode_frame(frame)
    y = frame["TARGET"].to_numpy(dtype=np.int64)
    if y.min() == y.max():
        raise ValueError("TARGET has a single class; cannot train")
    x_train, x_hold, y_train, y_hold = train_test_split(x, y, test_size=HOLDOUT_FRACTION, stratify=y,
                                                        random_state=seed)
    stage("encode", f"{x.shape[1]} columns, {y.mean():.2%} defaults, {len(y_train):,} train / {len(y_hold):,} holdout")

    stop = choose_trees(x_train, y_train, params, seed, early_stopping_rounds)
    if stop.rounds:
        stage("validate", f"early stopping kept {stop.trees} of at most {stop.max_trees} trees "
                          f"(validation log-loss {stop.validation_log_loss:.4f} on {stop.validation_rows:,} rows)"
                          + ("; it was still improving at the last round: a larger --n-estimators may do better"
                             if stop.trees == stop.max_trees else ""))
    elif early_stopping_rounds > 0:
        stage("validate", f"too few rows of a class (< {MIN_CLASS_ROWS_FOR_EARLY_STOPPING}) to hold some out: "
                          f"no early stopping, all {stop.trees} rounds")
    pipeline = fit_pipeline(x_train, y_train, {**params, "n_estimators": stop.trees}, seed)
    lgbm_params = {k: v for k, v in pipeline.named_steps["lgbm"].get_params().items()
                   if k in DEFAULT_PARAMS or k == "random_state"}
    stage("fit", f"LightGBM {lgbm_params['n_estimators']} trees x {lgbm_params['num_leaves']} leaves")

    onnx_bytes = export_onnx(pipeline)
    version = version_of(onnx_bytes)
    stage("export", f"ONNX {len(onnx_bytes) / 1e6:.1f} MB, version {version}")

    p_onnx = _onnx_proba(onnx_bytes, x_hold)
    p_sklearn = pipeline.predict_proba(x_hold)[:, 1]
    max_diff = float(np.max(np.abs(p_onnx - p_sklearn)))
    if max_diff > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX and scikit-learn probabilities differ by {max_diff:.2e} on the holdout")
    metrics = {
        "roc_auc": float(roc_auc_score(y_hold, p_onnx)),
        "log_loss": float(log_loss(y_hold, p_onnx, labels=[0, 1])),
        "brier": float(brier_score_loss(y_hold, p_onnx)),
        "default_rate": float(y.mean()),
        "n_train": int(len(y_train)),
        "n_holdout": int(len(y_hold)),
        "onnx_max_abs_diff": max_diff,
    }
    stage("evaluate", f"holdout ROC-AUC {metrics['roc_auc']:.4f}, log-loss {metrics['log_loss']:.4f}, "
                      f"Brier {metrics['brier']:.4f}, ONNX vs sklearn max diff {max_diff:.1e}")

    reference = reference_profile(engineer_features(x_train), x_train, seed)
    metadata: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "onnx": {
            "file": "model.onnx",
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "input_name": INPUT_NAME,
            "input_shape": [None, len(COLUMNS)],
            "output_name": PROBA_OUTPUT,
            "probability_column": PROBA_COLUMN,
            "label_output_name": LABEL_OUTPUT,
            "features_output_name": FEATURES_OUTPUT,
            "opset": dict(TARGET_OPSET),
        },
        "explanations": {
            "method": "TreeSHAP (path-dependent) over the trees of model.onnx",
            "covers": "node covers in model.onnx metadata_props 'credscope.tree_covers' (see server.explain)",
        },
        "columns": [{"name": c.name, "field": c.field, "kind": c.kind, "categories": list(c.categories),
                     "required": c.required} for c in COLUMNS],
        "engineered": list(ENGINEERED),
        "features": list(MODEL_FEATURES),
        "policy": DECISION_POLICY,
        "reason_catalogue": DEFAULT_CATALOGUE,
        "metrics": metrics,
        "training": {
            "source": source,
            "rows": int(len(frame)),
            "seed": seed,
            "holdout_fraction": HOLDOUT_FRACTION,
            "params": {**lgbm_params, **_FIXED_PARAMS},
            "early_stopping": stop.as_json(),
            "packages": _package_versions(),
        },
        "reference": reference,
    }

    model_dir = Path(model_dir)
    version_dir = model_dir / version
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / "model.onnx"
    metadata_path = version_dir / "metadata.json"
    # Imported here: MLServer's venv unpickles the pipeline (this module) without onnxruntime.
    from server.model import set_active, write_atomic

    write_atomic(onnx_path, onnx_bytes)
    metadata["training"]["duration_seconds"] = round(time.perf_counter() - started, 2)
    write_atomic(metadata_path, _metadata_json(metadata).encode())
    if activate:
        set_active(model_dir, version)
    stage("store", f"{version_dir}{' (active)' if activate else ' (not activated)'}")
    return TrainResult(version=version, model_dir=model_dir, onnx_path=onnx_path, metadata_path=metadata_path,
                       metadata=metadata, activated=activate, pipeline=pipeline, timings=timings)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credscope-train",
        description="Train the CredScope credit-risk model (feature engineering + LightGBM in one ONNX graph) "
                    "and add it to the model store <model-dir>/<version>/{model.onnx,metadata.json}.")
    parser.add_argument("--data", type=Path, default=None,
                        help="training CSV shaped like Home Credit's application_train.csv (the real Kaggle "
                             "file or tools.datagen output); default: generate synthetic data")
    parser.add_argument("--rows", type=int, default=100_000,
                        help="synthetic rows to generate when --data is not given (default %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed for data, split and model (default %(default)s)")
    parser.add_argument("--model-dir", type=Path, default=Path("models"), help="model store (default %(default)s)")
    parser.add_argument("--n-estimators", type=int, default=DEFAULT_PARAMS["n_estimators"],
                        help="most boosting rounds; early stopping keeps fewer (default %(default)s)")
    parser.add_argument("--early-stopping-rounds", type=int, default=EARLY_STOPPING_ROUNDS,
                        help="stop when the log-loss on a validation split of the training rows has not "
                             "improved for this many rounds, then refit on all of them with the best "
                             "count; 0 trains exactly --n-estimators (default %(default)s)")
    parser.add_argument("--num-leaves", type=int, default=DEFAULT_PARAMS["num_leaves"],
                        help="leaves per tree (default %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_PARAMS["learning_rate"],
                        help="learning rate (default %(default)s)")
    parser.add_argument("--no-activate", action="store_true", help="store the model without making it ACTIVE")
    parser.add_argument("--quiet", action="store_true", help="print only the new version")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``credscope-train``."""
    args = _parser().parse_args(argv)
    if (args.rows < 100 or args.n_estimators < 1 or args.num_leaves < 2 or args.learning_rate <= 0
            or args.early_stopping_rounds < 0):
        _parser().error("need --rows >= 100, --n-estimators >= 1, --num-leaves >= 2, --learning-rate > 0, "
                        "--early-stopping-rounds >= 0")
    try:
        result = train(args.data, rows=args.rows, seed=args.seed, model_dir=args.model_dir,
                       n_estimators=args.n_estimators, num_leaves=args.num_leaves, learning_rate=args.learning_rate,
                       early_stopping_rounds=args.early_stopping_rounds,
                       activate=not args.no_activate, quiet=args.quiet)
    except (OSError, ValueError) as exc:
        print(f"credscope-train: error: {exc}", file=sys.stderr)
        return 2
    print(result.version)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
