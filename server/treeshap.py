"""Exact path-dependent TreeSHAP, compiled with numba, equal to shap's ``TreeExplainer``.

Why it is the same quantity: under ``feature_perturbation="tree_path_dependent"`` a tree's value for
a coalition ``S`` is the sum over its leaves of ``v_leaf * prod_i (o_i if i in S else z_i)``, where
``i`` runs over the distinct features on the leaf's path, ``o_i`` (0/1) says whether the row
satisfies every split on feature ``i`` along the path, and ``z_i`` is the product of the cover
fractions ``cover(child) / cover(parent)`` of those splits. The Shapley value of that game for a
leaf with ``m`` distinct features is, for feature ``j`` on the path,

    phi_j = v * (o_j - z_j) * sum_{S subset of others} |S|! (m-1-|S|)! / m! * prod_{i in S} o_i
                                                                   * prod_{i not in S} z_i
          = v * (o_j - z_j) * integral_0^1 prod_{i != j} (z_i (1 - t) + o_i t) dt,

because ``k! (m-1-k)! / m!`` is the Beta integral of ``t^k (1-t)^(m-1-k)``. The integrand is a
polynomial of degree ``m - 1``, which Gauss-Legendre quadrature with ``ceil(m / 2)`` points
integrates exactly, so the result is exact up to floating-point rounding (the tests hold it to
shap's C implementation within 1e-9). Features not on a path are null players of that leaf's game;
SHAP values add over leaves and trees. (This is the path-wise form GPUTreeShap uses, with the
combinatorial weights evaluated by quadrature, as in Linear TreeSHAP.)

The kernel runs without the GIL (``nogil``), so a thread can explain while the event loop serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = ["PathEnsemble", "paths_from_trees", "tree_shap"]


@dataclass(frozen=True)
class PathEnsemble:
    """Every root-to-leaf path of an ensemble, with its distinct features merged.

    Path ``p`` owns elements ``path_start[p]:path_start[p + 1]``; element ``e`` is feature
    ``elem_feature[e]`` with the interval ``(elem_lo[e], elem_hi[e]]`` its splits allow,
    (``elem_lo`` is NaN when no split bounds it from below, so ``-inf`` stays inside),
    ``elem_nan[e]`` (whether a missing value goes the path's way at all of them) and ``elem_z[e]``
    (product of cover fractions). ``quad_t[m]`` / ``quad_w[m]`` hold the Gauss-Legendre points for
    a path of ``m`` elements on [0, 1] (padded with zero weights).
    """

    path_start: np.ndarray
    path_value: np.ndarray
    elem_feature: np.ndarray
    elem_lo: np.ndarray
    elem_hi: np.ndarray
    elem_nan: np.ndarray
    elem_z: np.ndarray
    quad_t: np.ndarray
    quad_w: np.ndarray
    base_value: float
    n_features: int

    @property
    def n_paths(self) -> int:
        return int(self.path_value.size)


def _quadrature(max_m: int) -> tuple[np.ndarray, np.ndarray]:
    q_max = max(1, (max_m + 1) // 2)
    t = np.full((max_m + 1, q_max), 0.5)
    w = np.zeros((max_m + 1, q_max))
    for m in range(1, max_m + 1):
        q = (m + 1) // 2
        nodes, weights = np.polynomial.legendre.leggauss(q)
        t[m, :q] = (nodes + 1.0) / 2.0
        w[m, :q] = weights / 2.0
    return t, w


def paths_from_trees(children_left: np.ndarray, children_right: np.ndarray, children_default: np.ndarray,
                     features: np.ndarray, thresholds: np.ndarray, values: np.ndarray, covers: np.ndarray,
                     base_offset: float, n_features: int) -> PathEnsemble:
    """Enumerate the paths of trees in shap's dense format (``[n_trees, max_nodes]`` arrays, split
    ``x <= threshold`` goes left, NaN goes to ``children_default``; ``values`` ``[n_trees, max_nodes]``)."""
    starts = [0]
    path_values: list[float] = []
    feat: list[int] = []
    lo: list[float] = []
    hi: list[float] = []
    nan_ok: list[bool] = []
    z: list[float] = []
    base = float(base_offset)
    for t in range(children_left.shape[0]):
        left, right, default = children_left[t], children_right[t], children_default[t]
        # stack of (node, {feature: [lo, hi, nan_ok, z]} in first-seen order)
        stack: list[tuple[int, dict[int, list[float]]]] = [(0, {})]
        while stack:
            n, elems = stack.pop()
            if left[n] < 0:
                if not elems:  # a single-leaf tree: a constant, part of the base value
                    base += float(values[t, n])
                    continue
                path_values.append(float(values[t, n]))
                for f, (a, b, ok, zz) in elems.items():
                    feat.append(f)
                    lo.append(a)
                    hi.append(b)
                    nan_ok.append(bool(ok))
                    z.append(zz)
                starts.append(len(feat))
                continue
            f, thr = int(features[t, n]), float(thresholds[t, n])
            for child, goes_left in ((int(left[n]), True), (int(right[n]), False)):
                a, b, ok, zz = elems.get(f, [np.nan, np.inf, True, 1.0])
                if goes_left:
                    b = min(b, thr)
                else:
                    a = thr if np.isnan(a) else max(a, thr)
                ok = ok and default[n] == child
                zz = zz * float(covers[t, child]) / float(covers[t, n])
                new = dict(elems)
                new[f] = [a, b, ok, zz]
                stack.append((child, new))
    start = np.asarray(starts, dtype=np.int64)
    lengths = np.diff(start)
    # the expected value: every leaf weighted by the share of the training samples that reach it
    z_all = np.asarray(z, dtype=np.float64)
    reach = np.multiply.reduceat(z_all, start[:-1]) if lengths.size else np.zeros(0)
    base += float(np.dot(np.asarray(path_values, dtype=np.float64), reach))
    quad_t, quad_w = _quadrature(int(lengths.max()) if lengths.size else 1)
    return PathEnsemble(start, np.asarray(path_values, dtype=np.float64), np.asarray(feat, dtype=np.int64),
                        np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64),
                        np.asarray(nan_ok, dtype=np.bool_), np.asarray(z, dtype=np.float64), quad_t, quad_w,
                        base, int(n_features))


def _jit(fn):  # type: ignore[no-untyped-def]
    """Compile without the GIL, cached on disk when there is a writable place for numba's cache."""
    try:
        return njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # no cache locator (read-only install, no home): compile once per process
        return njit(nogil=True)(fn)


@_jit
def _tree_shap_kernel(x: np.ndarray, path_start: np.ndarray, path_value: np.ndarray, elem_feature: np.ndarray,
                      elem_lo: np.ndarray, elem_hi: np.ndarray, elem_nan: np.ndarray, elem_z: np.ndarray,
                      quad_t: np.ndarray, quad_w: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    max_m = quad_t.shape[0] - 1
    q_max = quad_t.shape[1]
    o = np.empty(max_m)
    f = np.empty((max_m, q_max))
    prefix = np.empty((max_m + 1, q_max))
    suffix = np.empty(q_max)
    for r in range(x.shape[0]):
        for p in range(path_value.shape[0]):
            s = path_start[p]
            m = path_start[p + 1] - s
            nq = (m + 1) // 2
            tt = quad_t[m]
            ww = quad_w[m]
            for q in range(nq):
                prefix[0, q] = 1.0
            for i in range(m):
                e = s + i
                v = x[r, elem_feature[e]]
                # o = 1 if the row satisfies the element: v in (lo, hi], or v missing and NaN goes this way.
                # lo is NaN when unbounded below (then "v <= lo" is false). Branch-free on purpose.
                oi = (np.float64(v <= elem_hi[e]) * (1.0 - np.float64(v <= elem_lo[e]))
                      + np.float64(v != v) * np.float64(elem_nan[e]))
                o[i] = oi
                z = elem_z[e]
                d = oi - z
                for q in range(nq):
                    fi = z + d * tt[q]  # z (1 - t) + o t
                    f[i, q] = fi
                    prefix[i + 1, q] = prefix[i, q] * fi
            for q in range(nq):
                suffix[q] = ww[q]
            val = path_value[p]
            for i in range(m - 1, -1, -1):
                acc = 0.0  # quadrature of prod_{k != i} f_k = prefix[i] * suffix
                for q in range(nq):
                    acc += prefix[i, q] * suffix[q]
                    suffix[q] *= f[i, q]
                e = s + i
                out[r, elem_feature[e]] += val * (o[i] - elem_z[e]) * acc


def tree_shap(paths: PathEnsemble, x: np.ndarray) -> np.ndarray:
    """SHAP values ``[N, n_features]`` (float64) of the rows of ``x`` (float64, NaN = missing)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != paths.n_features:
        raise ValueError(f"expected a matrix [N, {paths.n_features}], got shape {x.shape}")
    out = np.zeros((x.shape[0], paths.n_features), dtype=np.float64)
    _tree_shap_kernel(x, paths.path_start, paths.path_value, paths.elem_feature, paths.elem_lo, paths.elem_hi,
                      paths.elem_nan, paths.elem_z, paths.quad_t, paths.quad_w, out)
    return out
