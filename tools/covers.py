"""Node covers for TreeSHAP, written into the exported ONNX file (used by :func:`tools.train.export_onnx`).

Path-dependent TreeSHAP weighs each branch by the share of training samples that went down it. The
ONNX ``TreeEnsembleClassifier`` holds no such counts, so at export the LightGBM booster's per-node
counts (``internal_count`` / ``leaf_count``, the same covers shap and LightGBM's own ``pred_contrib``
use) are matched to the ONNX nodes by walking both trees from the root, checking at every node that
the split (feature, float32 threshold, leaf value) is the same, and stored in ``model.metadata_props``
(see :mod:`server.explain` for the format). The serving side reads them back from the same file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server.explain import ExplainError, covers_entry, node_attributes

__all__ = ["add_tree_covers", "lightgbm_covers"]


def lightgbm_covers(node: Any, booster: Any) -> list[float]:
    """Covers of the ONNX tree ``node``'s nodes (in its attribute order) from the LightGBM ``booster``."""
    a = node_attributes(node)
    tree_ids = np.asarray(a["nodes_treeids"], dtype=np.int64)
    node_ids = np.asarray(a["nodes_nodeids"], dtype=np.int64)
    modes = [m.decode() if isinstance(m, bytes) else str(m) for m in a["nodes_modes"]]
    features = np.asarray(a["nodes_featureids"], dtype=np.int64)
    thresholds = np.asarray(a["nodes_values"], dtype=np.float32)
    true_ids = np.asarray(a["nodes_truenodeids"], dtype=np.int64)
    false_ids = np.asarray(a["nodes_falsenodeids"], dtype=np.int64)
    leaf_weight = {(int(t), int(n)): w for t, n, w in zip(a["class_treeids"], a["class_nodeids"],
                                                          np.asarray(a["class_weights"], dtype=np.float32),
                                                          strict=True)}
    index = {(int(t), int(n)): i for i, (t, n) in enumerate(zip(tree_ids, node_ids, strict=True))}
    trees = booster.dump_model()["tree_info"]
    if len(trees) != int(tree_ids.max()) + 1:
        raise ExplainError(f"the booster has {len(trees)} trees, the ONNX node {int(tree_ids.max()) + 1}")
    covers = [float("nan")] * len(node_ids)
    with np.errstate(over="ignore"):  # a threshold beyond float32's range is +-inf in ONNX too
        _match(trees, tree_ids, node_ids, modes, features, thresholds, true_ids, false_ids, leaf_weight, index, covers)
    if any(np.isnan(covers)):
        raise ExplainError("some ONNX tree nodes have no LightGBM counterpart")
    return covers


def _match(trees: list[Any], tree_ids: np.ndarray, node_ids: np.ndarray, modes: list[str], features: np.ndarray,
           thresholds: np.ndarray, true_ids: np.ndarray, false_ids: np.ndarray,
           leaf_weight: dict[tuple[int, int], Any], index: dict[tuple[int, int], int], covers: list[float]) -> None:
    """Walk each LightGBM tree and its ONNX counterpart from the root, filling ``covers``."""
    for t, info in enumerate(trees):
        children = {int(c) for i in np.flatnonzero(tree_ids == t) if modes[i] != "LEAF"
                    for c in (true_ids[i], false_ids[i])}
        roots = [int(n) for n in node_ids[tree_ids == t] if int(n) not in children]
        if len(roots) != 1:
            raise ExplainError(f"tree {t}: {len(roots)} roots in the ONNX node")
        stack = [(roots[0], info["tree_structure"])]
        while stack:
            onnx_id, lgb = stack.pop()
            i = index[(t, onnx_id)]
            if "split_index" in lgb:
                if (modes[i] != "BRANCH_LEQ" or lgb.get("decision_type") != "<=" or features[i] != lgb["split_feature"]
                        or thresholds[i] != np.float32(lgb["threshold"])):
                    raise ExplainError(f"tree {t} node {onnx_id}: the ONNX split differs from LightGBM's")
                covers[i] = float(lgb["internal_count"])
                stack.append((int(true_ids[i]), lgb["left_child"]))
                stack.append((int(false_ids[i]), lgb["right_child"]))
            else:
                if modes[i] != "LEAF" or leaf_weight.get((t, onnx_id)) != np.float32(lgb["leaf_value"]):
                    raise ExplainError(f"tree {t} node {onnx_id}: the ONNX leaf differs from LightGBM's")
                # a single-leaf tree has no count in LightGBM's dump; its cover does not matter
                covers[i] = float(lgb.get("leaf_count", 1))


def add_tree_covers(model: Any, booster: Any) -> None:
    """Store the covers of ``model``'s (an ``onnx.ModelProto``) tree node in its ``metadata_props``."""
    nodes = [n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(nodes) != 1:
        raise ExplainError(f"expected one TreeEnsembleClassifier, found {len(nodes)}")
    key, value = covers_entry(nodes[0].name, lightgbm_covers(nodes[0], booster))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value
