"""SHAP explanations from the trees the ONNX model runs (TreeSHAP, path-dependent).

There is no second model file: the tree ensemble is read out of the ``TreeEnsembleClassifier`` node
of the served ``model.onnx`` itself, and turned into shap's tree format. Path-dependent TreeSHAP also
needs each node's *cover* (training samples that reached it), which the ONNX operator does not hold;
``credscope-train`` writes them into the same ONNX file, in ``model.metadata_props`` under
:data:`COVERS_KEY` (so the file hashed into the model version carries them):

    {"format": 1, "node": "<tree node name>", "covers": [c_0, c_1, ...]}

``covers[i]`` is the cover of the node described by entry ``i`` of the node's ``nodes_*`` attributes
(``nodes_treeids[i]``, ``nodes_nodeids[i]``).

Exactness of the conversion (ONNX float32 semantics -> shap's ``x <= threshold`` on float64):

* the features the trees see are the ONNX graph's ``features`` output (float32); widening a float32
  to float64 is exact, so comparisons against float32 thresholds are the same in both precisions;
* ``BRANCH_LEQ`` (``x <= t``): threshold ``t``, left = true branch; ``BRANCH_LT`` (``x < t``): for a
  float32 ``x`` that is ``x <= nextafter32(t, -inf)``; ``BRANCH_GT`` / ``BRANCH_GTE`` are the
  negations of ``LEQ`` / ``LT`` (left = false branch);
* a missing value (NaN) follows ``nodes_missing_value_tracks_true`` (true branch if set, else the
  false branch, where onnxruntime's comparison with NaN sends it); shap sends it to
  ``children_default``;
* leaf values are the ONNX float32 ``class_weights`` widened to float64; an internal node's value is
  the cover-weighted mean of its children (what shap uses for the base value).

:meth:`Explainer.verify` checks at load time, on the model's reference sample, that the float64 sum
of the leaves reached by each row reproduces the ONNX probability, and that the SHAP values add up to
that sum; a model that fails is not explained (never explained wrongly).

The SHAP values are path-dependent TreeSHAP (shap's ``TreeExplainer`` with
``feature_perturbation="tree_path_dependent"``) over these trees. :meth:`Explainer.shap_values`
computes them with the exact compiled kernel of :mod:`server.treeshap` (about 2.5x faster than shap's
C routine here, and it releases the GIL); :meth:`Explainer.reference_shap_values` runs shap's own C
routine on the same trees. The tests hold the two to 1e-9 of each other, and both to shap run on
the scikit-learn/LightGBM model to 1e-6 (the ONNX leaves are float32).

This module imports nothing from grpc.
"""

from __future__ import annotations

import json
import math
import struct
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "COVERS_FORMAT",
    "COVERS_KEY",
    "DEFAULT_TOP_K",
    "Contribution",
    "ExplainError",
    "Explainer",
    "Explanation",
    "TreeModel",
    "covers_entry",
    "explainer_for",
    "node_attributes",
    "read_covers",
]

COVERS_KEY = "credscope.tree_covers"
COVERS_FORMAT = 1
DEFAULT_TOP_K = 10
#: Rows per call into shap's C routine (reference path only); it holds the GIL while it runs.
CHUNK_ROWS = 4
#: At load, sigmoid(float64 tree sum) must match the ONNX probability to this (float32 + onnxruntime's
#: logistic approximation give ~3e-7; a mis-read split moves it by ~1e-3).
CHECK_TOLERANCE = 1e-5
#: At load, base value + the sum of the SHAP values must equal the float64 tree margin to this.
VERIFY_TOLERANCE = 1e-9

_TREE_OPS = ("TreeEnsembleClassifier", "TreeEnsembleRegressor")
_F32 = np.float32


class ExplainError(Exception):
    """The model's trees cannot be explained (no covers, unsupported operator, or failed self-check)."""


# --------------------------------------------------------------------------------------------
# The explanation (domain object)
# --------------------------------------------------------------------------------------------

class Contribution(NamedTuple):
    """One feature's SHAP value for one applicant (a named tuple: an explanation holds one per feature, and a
    named tuple is built in less than half the time of a frozen dataclass)."""

    feature: str
    """Model feature name (raw Home Credit column or engineered feature, e.g. PAYMENT_RATE)."""
    value: float | None
    """The feature's value for this applicant, as the trees saw it (None when missing)."""
    shap_value: float
    """Contribution in log-odds of default."""

    @property
    def increases_risk(self) -> bool:
        """True when the value pushes the default risk up (positive SHAP value)."""
        return self.shap_value > 0.0

    @property
    def direction(self) -> str:
        """``"increases"`` (positive SHAP value) or ``"decreases"`` (negative or zero)."""
        return "increases" if self.shap_value > 0.0 else "decreases"


class Explanation:
    """Base value plus contributions, largest absolute SHAP value first.

    ``base_value + sum(c.shap_value for c in contributions)`` is the model's margin (log-odds) when
    ``contributions`` holds every feature (as :meth:`Explainer.explain` returns it); :meth:`top`
    keeps the first k. Treat it as immutable.

    It is held by column — :attr:`names`, :attr:`values` (NaN = missing), :attr:`shap_values`, in rank order
    — and makes its :class:`Contribution` objects only when :attr:`contributions` is read: a served
    explanation sends its top 5 of 40, its reasons and its cache entry read the columns, so 35 of the 40
    named tuples a call used to build were never looked at.
    """

    __slots__ = ("_contributions", "_names", "_shaps", "_values", "base_value")

    def __init__(self, base_value: float, contributions: Sequence[Contribution] = ()) -> None:
        self.base_value = base_value
        self._contributions: tuple[Contribution, ...] | None = tuple(contributions)
        self._names: Sequence[str] | None = None
        self._values: list[float] | None = None
        self._shaps: list[float] | None = None

    @classmethod
    def of_columns(cls, base_value: float, names: Sequence[str], values: list[float], shaps: list[float]
                   ) -> Explanation:
        """An explanation from its columns in rank order (``values``: NaN for a missing value)."""
        e = cls.__new__(cls)
        e.base_value = base_value
        e._contributions = None
        e._names, e._values, e._shaps = names, values, shaps
        return e

    def _columns(self) -> tuple[Sequence[str], list[float], list[float]]:
        if self._names is None or self._values is None or self._shaps is None:
            c = self._contributions or ()
            self._names = [x.feature for x in c]
            self._values = [math.nan if x.value is None else x.value for x in c]
            self._shaps = [x.shap_value for x in c]
        return self._names, self._values, self._shaps

    @property
    def contributions(self) -> tuple[Contribution, ...]:
        if self._contributions is None:
            names, values, shaps = self._columns()
            self._contributions = tuple(Contribution(f, None if v != v else v, s)
                                        for f, v, s in zip(names, values, shaps, strict=True))
        return self._contributions

    @property
    def names(self) -> Sequence[str]:
        """The features, in rank order."""
        return self._columns()[0]

    @property
    def values(self) -> list[float]:
        """The features' values as the trees saw them, in rank order (NaN = missing)."""
        return self._columns()[1]

    @property
    def shap_values(self) -> list[float]:
        """The SHAP values, in rank order."""
        return self._columns()[2]

    def __len__(self) -> int:
        return len(self._names) if self._names is not None else len(self._contributions or ())

    def __bool__(self) -> bool:  # an explanation is there even when it holds no contribution
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Explanation):
            return NotImplemented
        return self.base_value == other.base_value and self.contributions == other.contributions

    def __hash__(self) -> int:
        return hash((self.base_value, self.contributions))

    def __repr__(self) -> str:
        return f"Explanation(base_value={self.base_value!r}, contributions={self.contributions!r})"

    def top(self, k: int) -> Explanation:
        """The same explanation with only the ``k`` largest contributions."""
        if k >= len(self):
            return self
        if self._contributions is not None:
            return Explanation(self.base_value, self._contributions[:k])
        names, values, shaps = self._columns()
        return Explanation.of_columns(self.base_value, names[:k], values[:k], shaps[:k])

    @property
    def margin(self) -> float:
        """base value + the sum of the contributions held (the margin when all are held)."""
        return self.base_value + math.fsum(self.shap_values)

    @property
    def ranked(self) -> list[tuple[str, float | None, float]]:
        """``(feature, value or None, shap_value)`` in rank order (what the audit trail records)."""
        return [(c.feature, c.value, c.shap_value) for c in self.contributions]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for the explanation cache); :meth:`from_dict` reads it back exactly."""
        return {"base_value": self.base_value,
                "contributions": [[c.feature, c.value, c.shap_value] for c in self.contributions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Explanation:
        """Inverse of :meth:`to_dict`."""
        return cls(float(data["base_value"]),
                   tuple(Contribution(str(f), None if v is None else float(v), float(s))
                         for f, v, s in data["contributions"]))

    def to_bytes(self) -> bytes:
        """A compact binary form (for the explanation cache; ~5x cheaper to make than JSON, and exact for
        every float, infinities included); :meth:`from_bytes` reads it back. Layout: ``E1``, base value and
        count (``<dI``), the values (float64, NaN = missing), the SHAP values (float64), the feature names
        (UTF-8, separated by US, 0x1F)."""
        names, values, shaps = self._columns()
        return (_BYTES_MAGIC + _BYTES_HEAD.pack(self.base_value, len(names)) + array("d", values).tobytes()
                + array("d", shaps).tobytes() + "\x1f".join(names).encode())

    @classmethod
    def from_bytes(cls, data: bytes) -> Explanation:
        """Inverse of :meth:`to_bytes`; ValueError for anything else."""
        if data[:2] != _BYTES_MAGIC or len(data) < 2 + _BYTES_HEAD.size:
            raise ValueError("not an explanation in binary form")
        base, n = _BYTES_HEAD.unpack_from(data, 2)
        start = 2 + _BYTES_HEAD.size
        end = start + 16 * n
        if len(data) < end:
            raise ValueError("truncated explanation")
        values = array("d")
        values.frombytes(data[start:start + 8 * n])
        shaps = array("d")
        shaps.frombytes(data[start + 8 * n:end])
        names = data[end:].decode().split("\x1f") if n else []
        if len(names) != n:
            raise ValueError("explanation names do not match its values")
        return cls.of_columns(base, names, values.tolist(), shaps.tolist())

    @classmethod
    def from_cached(cls, data: Any) -> Explanation:
        """An explanation from the cache: binary (:meth:`to_bytes`), or a dict (:meth:`to_dict`, what
        entries written before the binary form hold)."""
        return cls.from_bytes(bytes(data)) if isinstance(data, bytes | bytearray) else cls.from_dict(data)


_BYTES_MAGIC = b"E1"
_BYTES_HEAD = struct.Struct("<dI")


# --------------------------------------------------------------------------------------------
# Covers in the ONNX file
# --------------------------------------------------------------------------------------------

def covers_entry(node_name: str, covers: Sequence[float]) -> tuple[str, str]:
    """The ``(key, value)`` metadata_props entry that stores the covers of the tree node."""
    values = [int(c) if float(c).is_integer() else float(c) for c in covers]
    return COVERS_KEY, json.dumps({"format": COVERS_FORMAT, "node": node_name, "covers": values},
                                  separators=(",", ":"), allow_nan=False)


def read_covers(model: Any, node: Any) -> np.ndarray:
    """The covers stored in ``model`` (an ``onnx.ModelProto``) for the tree ``node``, aligned with its nodes."""
    props = {p.key: p.value for p in model.metadata_props}
    if COVERS_KEY not in props:
        raise ExplainError(f"the ONNX model has no {COVERS_KEY!r} metadata (node covers for TreeSHAP); "
                           "retrain it with this version of credscope-train")
    try:
        data = json.loads(props[COVERS_KEY])
        fmt, name, covers = data["format"], data["node"], np.asarray(data["covers"], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as exc:
        raise ExplainError(f"unreadable {COVERS_KEY!r} metadata: {exc}") from exc
    if fmt != COVERS_FORMAT:
        raise ExplainError(f"{COVERS_KEY!r} has format {fmt!r}, this code reads {COVERS_FORMAT}")
    if name != node.name:
        raise ExplainError(f"{COVERS_KEY!r} describes node {name!r}, the tree node is {node.name!r}")
    return covers


# --------------------------------------------------------------------------------------------
# ONNX tree ensemble -> shap's tree format
# --------------------------------------------------------------------------------------------

def node_attributes(node: Any) -> dict[str, Any]:
    """The attributes of an ONNX node as Python values (tensor attributes as numpy arrays)."""
    import onnx

    attrs: dict[str, Any] = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if a.type == onnx.AttributeProto.TENSOR:
            value = onnx.numpy_helper.to_array(value)
        attrs[a.name] = value
    return attrs


def _prev_float32(t: np.ndarray) -> np.ndarray:
    """The largest float32 below each float32 ``t`` (so ``x < t`` == ``x <= prev(t)`` for float32 x)."""
    if np.any(np.isneginf(t)):
        raise ExplainError("a BRANCH_LT/GTE split at -inf cannot be written as x <= threshold")
    return np.nextafter(t, _F32(-np.inf))


@dataclass(frozen=True)
class TreeModel:
    """A tree ensemble in shap's dense format (float64), with the margin it computes.

    Arrays are ``[n_trees, max_nodes]`` (padding: ``-1`` children, zero covers); ``values`` is
    ``[n_trees, max_nodes, 1]``. The margin of a row is ``base_offset + sum`` of the values of the
    leaves it reaches.
    """

    children_left: np.ndarray
    children_right: np.ndarray
    children_default: np.ndarray
    features: np.ndarray
    thresholds: np.ndarray
    values: np.ndarray
    node_sample_weight: np.ndarray
    max_depth: int
    base_offset: float
    n_features: int
    node_counts: np.ndarray = field(repr=False)

    @property
    def n_trees(self) -> int:
        return int(self.children_left.shape[0])

    def shap_dict(self) -> dict[str, Any]:
        """The dict model that ``shap.TreeExplainer`` accepts (``{"trees": [...], "base_offset": ...}``)."""
        trees = []
        for t in range(self.n_trees):
            n = int(self.node_counts[t])
            trees.append({"children_left": self.children_left[t, :n].copy(),
                          "children_right": self.children_right[t, :n].copy(),
                          "children_default": self.children_default[t, :n].copy(),
                          "features": self.features[t, :n].copy(),
                          "thresholds": self.thresholds[t, :n].copy(),
                          "values": self.values[t, :n].copy(),
                          "node_sample_weight": self.node_sample_weight[t, :n].copy()})
        return {"trees": trees, "base_offset": self.base_offset, "tree_output": "log_odds",
                "objective": "binary_crossentropy", "input_dtype": np.float64, "internal_dtype": np.float64}

    def margin(self, x: np.ndarray) -> np.ndarray:
        """float64 margin (log-odds) of each row of the feature matrix ``x`` (NaN = missing)."""
        x = np.asarray(x, dtype=np.float64)
        n = x.shape[0]
        total = np.full(n, self.base_offset, dtype=np.float64)
        rows = np.arange(n)
        for t in range(self.n_trees):
            node = np.zeros(n, dtype=np.int64)
            left, right, default = self.children_left[t], self.children_right[t], self.children_default[t]
            feats, thr = self.features[t], self.thresholds[t]
            for _ in range(self.max_depth + 1):
                inner = left[node] >= 0
                if not inner.any():
                    break
                v = x[rows, np.where(inner, feats[node], 0)]
                nxt = np.where(np.isnan(v), default[node], np.where(v <= thr[node], left[node], right[node]))
                node = np.where(inner, nxt, node)
            total += self.values[t, node, 0]
        return total

    @classmethod
    def from_onnx(cls, model: Any) -> TreeModel:
        """Read the tree ensemble (and its covers) out of an ``onnx.ModelProto``."""
        nodes = [n for n in model.graph.node if n.op_type in _TREE_OPS]
        if len(nodes) != 1:
            raise ExplainError(f"expected one tree ensemble node in the ONNX graph, found {len(nodes)}")
        node = nodes[0]
        a = node_attributes(node)
        if node.op_type == "TreeEnsembleClassifier":
            labels = a.get("classlabels_int64s", a.get("classlabels_strings", []))
            if len(labels) != 2:
                raise ExplainError(f"only binary classifiers are explained ({len(labels)} classes)")
            if a.get("post_transform", b"NONE") not in (b"LOGISTIC", "LOGISTIC"):
                raise ExplainError(f"expected post_transform LOGISTIC, got {a.get('post_transform')!r}")
            prefix = "class"
        else:
            prefix = "target"
        weights = a.get(f"{prefix}_weights_as_tensor", a.get(f"{prefix}_weights"))
        ids = np.asarray(a[f"{prefix}_ids"], dtype=np.int64)
        if np.any(ids != ids[0]):
            raise ExplainError("the trees score more than one output; only a single margin is explained")
        base_values = np.asarray(a.get("base_values_as_tensor", a.get("base_values", [0.0])), dtype=np.float64)
        if base_values.size > 1:
            raise ExplainError("per-class base values are not supported")
        leaf_tree = np.asarray(a[f"{prefix}_treeids"], dtype=np.int64)
        leaf_node = np.asarray(a[f"{prefix}_nodeids"], dtype=np.int64)
        leaf_weight = np.asarray(weights).astype(np.float64)

        tree_ids = np.asarray(a["nodes_treeids"], dtype=np.int64)
        node_ids = np.asarray(a["nodes_nodeids"], dtype=np.int64)
        feature_ids = np.asarray(a["nodes_featureids"], dtype=np.int64)
        modes = [m.decode() if isinstance(m, bytes) else str(m) for m in a["nodes_modes"]]
        thresholds32 = np.asarray(a.get("nodes_values_as_tensor", a.get("nodes_values")), dtype=_F32)
        true_ids = np.asarray(a["nodes_truenodeids"], dtype=np.int64)
        false_ids = np.asarray(a["nodes_falsenodeids"], dtype=np.int64)
        tracks = np.asarray(a.get("nodes_missing_value_tracks_true", [0] * len(node_ids)), dtype=np.int64)
        covers = read_covers(model, node)
        if covers.shape != node_ids.shape:
            raise ExplainError(f"{covers.size} covers for {node_ids.size} tree nodes")

        trees = np.unique(tree_ids)
        if not np.array_equal(trees, np.arange(trees.size)):
            raise ExplainError("tree ids are not 0..n-1")
        counts = np.bincount(tree_ids, minlength=trees.size)
        width = int(counts.max())
        shape = (trees.size, width)
        left = np.full(shape, -1, dtype=np.int32)
        right = np.full(shape, -1, dtype=np.int32)
        default = np.full(shape, -1, dtype=np.int32)
        feats = np.full(shape, -1, dtype=np.int32)
        thr = np.zeros(shape, dtype=np.float64)
        values = np.zeros((*shape, 1), dtype=np.float64)
        cover = np.zeros(shape, dtype=np.float64)
        seen = np.zeros(shape, dtype=bool)
        is_leaf = np.zeros(shape, dtype=bool)
        for i in range(node_ids.size):
            t, n = tree_ids[i], node_ids[i]
            if not 0 <= n < counts[t] or seen[t, n]:
                raise ExplainError(f"tree {t}: node ids are not 0..n-1 (node {n})")
            seen[t, n] = True
            cover[t, n] = covers[i]
            mode = modes[i]
            if mode == "LEAF":
                is_leaf[t, n] = True
                continue
            if mode not in ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GT", "BRANCH_GTE"):
                raise ExplainError(f"tree {t} node {n}: split mode {mode} is not supported")
            tn, fn = true_ids[i], false_ids[i]
            t32 = thresholds32[i:i + 1]
            cut = t32 if mode in ("BRANCH_LEQ", "BRANCH_GT") else _prev_float32(t32)
            thr[t, n] = float(cut[0])  # x <= cut  <=>  the ONNX comparison (LEQ/LT) or its negation (GT/GTE)
            if mode in ("BRANCH_LEQ", "BRANCH_LT"):
                left[t, n], right[t, n] = tn, fn
            else:
                left[t, n], right[t, n] = fn, tn
            default[t, n] = tn if tracks[i] else fn
            feats[t, n] = feature_ids[i]
        for t, n, w in zip(leaf_tree, leaf_node, leaf_weight, strict=True):
            if not is_leaf[t, n]:
                raise ExplainError(f"tree {t}: a weight is attached to non-leaf node {n}")
            values[t, n, 0] += w
        if not seen[np.arange(width)[None, :] < counts[:, None]].all():
            raise ExplainError("missing tree nodes")

        max_depth = 0
        for t in range(trees.size):
            max_depth = max(max_depth, _finish_tree(t, left[t], right[t], values[t, :, 0], cover[t], is_leaf[t]))
        n_features = int(feats.max()) + 1 if (feats >= 0).any() else 0
        return cls(left, right, default, feats, thr, values, cover, max_depth, float(base_values.sum()),
                   n_features, counts)

    def check_against(self, features: np.ndarray, probabilities: np.ndarray,
                      tolerance: float = CHECK_TOLERANCE) -> float:
        """Check that these trees reproduce the ONNX probabilities of ``features`` rows; return the worst gap."""
        if len(features) == 0:
            return 0.0
        p = 1.0 / (1.0 + np.exp(-self.margin(features)))
        gap = float(np.max(np.abs(p - np.asarray(probabilities, dtype=np.float64))))
        if not gap <= tolerance:
            raise ExplainError(f"the trees read from the ONNX graph do not reproduce its probabilities "
                               f"(gap {gap:.2e} > {tolerance:.0e}); refusing to explain this model")
        return gap


def _finish_tree(t: int, left: np.ndarray, right: np.ndarray, values: np.ndarray, cover: np.ndarray,
                 is_leaf: np.ndarray) -> int:
    """Fill internal values (cover-weighted means), check covers and reachability; return the depth."""
    order: list[int] = []
    depth = np.full(left.size, -1, dtype=np.int64)
    depth[0] = 0
    stack = [0]
    while stack:
        n = stack.pop()
        order.append(n)
        if is_leaf[n]:
            continue
        for c in (left[n], right[n]):
            if not 0 <= c < left.size or depth[c] >= 0:
                raise ExplainError(f"tree {t}: node {n} has a bad or shared child {c}")
            depth[c] = depth[n] + 1
            stack.append(int(c))
    if len(order) != int(np.count_nonzero(is_leaf | (left >= 0))):
        raise ExplainError(f"tree {t}: unreachable nodes")
    for n in reversed(order):
        if is_leaf[n]:
            if not cover[n] > 0 and len(order) > 1:
                raise ExplainError(f"tree {t}: leaf {n} has cover {cover[n]}")
            if len(order) == 1:
                cover[n] = max(cover[n], 1.0)
            continue
        lc, rc = cover[left[n]], cover[right[n]]
        if not math.isclose(cover[n], lc + rc, rel_tol=1e-9):
            raise ExplainError(f"tree {t}: cover of node {n} ({cover[n]}) is not the sum of its children's")
        values[n] = (values[left[n]] * lc + values[right[n]] * rc) / (lc + rc)
    return int(depth.max())


# --------------------------------------------------------------------------------------------
# TreeSHAP
# --------------------------------------------------------------------------------------------

class Explainer:
    """Path-dependent TreeSHAP over a :class:`TreeModel`, with the feature names of the model.

    :meth:`shap_values` runs the compiled kernel of :mod:`server.treeshap` (exact, GIL released);
    :meth:`reference_shap_values` runs shap's ``TreeExplainer`` on the same trees (tests, benchmark);
    :meth:`verify` checks the trees against the ONNX probabilities and the SHAP values' additivity.
    """

    def __init__(self, trees: TreeModel, feature_names: Sequence[str]) -> None:
        from server.treeshap import paths_from_trees

        if trees.n_features > len(feature_names):
            raise ExplainError(f"the trees use {trees.n_features} features, the model names {len(feature_names)}")
        self.trees = trees
        self.feature_names = tuple(feature_names)
        self.n_features = len(self.feature_names)
        self.paths = paths_from_trees(trees.children_left, trees.children_right, trees.children_default,
                                      trees.features, trees.thresholds, trees.values[:, :, 0],
                                      trees.node_sample_weight, trees.base_offset, self.n_features)
        self.base_value = self.paths.base_value
        self._shap: Any = None

    @classmethod
    def from_onnx(cls, model: Any, feature_names: Sequence[str]) -> Explainer:
        """Build from an ``onnx.ModelProto`` (its tree node and covers) and the model's feature names."""
        return cls(TreeModel.from_onnx(model), feature_names)

    def _matrix(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected a feature matrix [N, {self.n_features}], got shape {x.shape}")
        return np.ascontiguousarray(x, dtype=np.float64)

    def shap_values(self, features: np.ndarray) -> np.ndarray:
        """SHAP values (log-odds) ``[N, n_features]`` float64 of the feature matrix (float32, NaN = missing).

        Row ``i`` satisfies ``base_value + phi[i].sum() == trees.margin(features)[i]`` (to ~1e-12).
        """
        from server.treeshap import tree_shap

        return tree_shap(self.paths, self._matrix(features))

    @property
    def shap_explainer(self) -> Any:
        """shap's ``TreeExplainer`` (tree_path_dependent) over the same trees, built on first use."""
        if self._shap is None:
            import shap

            self._shap = shap.TreeExplainer(self.trees.shap_dict(), feature_perturbation="tree_path_dependent")
        return self._shap

    def reference_shap_values(self, features: np.ndarray) -> np.ndarray:
        """The same SHAP values from shap's C implementation (``TreeExplainer``), for checks and benchmarks.

        Calls the routine ``TreeExplainer.shap_values`` calls, on the arrays it prepared, a few rows at a
        time (it holds the GIL while it runs).
        """
        from shap import _cext
        from shap.explainers._tree import feature_perturbation_codes, output_transform_codes

        x = self._matrix(features)
        e = self.shap_explainer.model
        missing = np.isnan(x)
        out = np.empty((x.shape[0], self.n_features), dtype=np.float64)
        for start in range(0, x.shape[0], CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, x.shape[0])
            phi = np.zeros((stop - start, self.n_features + 1, 1), dtype=np.float64)
            _cext.dense_tree_shap(
                e.children_left, e.children_right, e.children_default, e.features, e.thresholds,
                e.threshold_types, e.values, e.node_sample_weight, e.max_depth, x[start:stop],
                missing[start:stop], None, None, None, int(e.values.shape[0]), e.base_offset, phi,
                feature_perturbation_codes["tree_path_dependent"], output_transform_codes["identity"], False)
            out[start:stop] = phi[:, :-1, 0]
        return out

    def verify(self, features: np.ndarray, probabilities: np.ndarray, shap_rows: int = 64,
               tolerance: float = VERIFY_TOLERANCE) -> dict[str, float]:
        """Load-time self-check on reference rows (the ONNX ``features`` and probabilities).

        The trees must reproduce the ONNX probabilities of every row (:meth:`TreeModel.check_against`),
        and on the first ``shap_rows`` rows the SHAP values must add up to the trees' float64 margin.
        (Equality with shap's ``TreeExplainer`` is a property of the code, held by the tests; shap
        itself is not imported at serving, it takes seconds.) Raises :class:`ExplainError`; returns
        the gaps.
        """
        gap = self.trees.check_against(features, probabilities)
        x = np.asarray(features)[:shap_rows]
        additivity = 0.0
        if len(x):
            phi = self.shap_values(x)
            additivity = float(np.max(np.abs(self.base_value + phi.sum(axis=1) - self.trees.margin(x))))
            if not additivity <= tolerance:
                raise ExplainError(f"SHAP values miss the trees' margin by {additivity:.2e}")
        return {"probability_gap": gap, "additivity_gap": additivity}

    def explain(self, features: np.ndarray) -> list[Explanation]:
        """One :class:`Explanation` per row, every feature, largest absolute contribution first."""
        x = np.asarray(features)
        phi = self.shap_values(x)
        return [self._explanation(x[i], phi[i]) for i in range(phi.shape[0])]

    def _explanation(self, values: np.ndarray, phi: np.ndarray) -> Explanation:
        order = np.argsort(-np.abs(phi), kind="stable")
        names = self.feature_names
        return Explanation.of_columns(self.base_value, [names[j] for j in order.tolist()],
                                      values.astype(np.float64)[order].tolist(), phi[order].tolist())


def explainer_for(model: Any, reference_rows: int = 2000) -> Explainer:
    """The verified :class:`Explainer` of a loaded :class:`server.model.ModelArtifact`.

    Reads the trees and covers from the artifact's own ONNX bytes and runs :meth:`Explainer.verify`
    on its reference sample (metadata ``reference.sample``, raw rows) scored by the ONNX graph.
    Raises :class:`ExplainError` when the model cannot be explained.
    """
    try:
        onnx_model = model.onnx_model()
    except Exception as exc:  # noqa: BLE001 - ModelError or a protobuf decode error
        raise ExplainError(f"cannot read the ONNX graph of model {model.version}: {exc}") from exc
    explainer = Explainer.from_onnx(onnx_model, model.features)
    rows = model.metadata.get("reference", {}).get("sample", {}).get("rows", [])[:reference_rows]
    if rows:
        raw = np.asarray([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float32)
        probabilities, features = model.predict(raw)
        explainer.verify(features, probabilities)
    return explainer
