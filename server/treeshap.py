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

For a given row the elements split into those it satisfies (``A``, ``o = 1``, ``a`` of them) and those
it does not (``B``, ``o = 0``, ``b`` of them, with ``Z_B = prod_{i in B} z_i``). Every ``f_i`` of ``B`` is
``z_i (1 - t)``, so

    phi_j = -v * Z_B * integral_0^1 (1 - t)^(b-1) prod_{i in A} f_i dt          (j in B: all equal)
    phi_j = v * (1 - z_j) * Z_B * integral_0^1 (1 - t)^b prod_{i in A, i != j} f_i dt   (j in A)

and both integrals are one Gauss-Jacobi quadrature with the weight ``(1 - t)^(b-1)`` folded in (the
integrands left are polynomials of degree ``a``): ``floor(a / 2) + 1`` points over the ``a`` elements of
``A`` only, instead of ``ceil(m / 2)`` points over all ``m`` (Gauss-Legendre when ``b = 0``). The same
number, with a fraction of the work on typical rows.

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
    (product of cover fractions). ``quad_t[alpha, n]`` / ``quad_w[alpha, n]`` hold the ``n``-point
    Gauss-Jacobi rule for ``integral_0^1 (1 - t)^alpha g(t) dt`` (padded with zero weights).
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
    """Gauss-Jacobi rules on [0, 1] for the weights ``(1 - t)^alpha``, ``alpha`` in ``0..max_m``, with
    ``1..n_max`` points: ``sum_k w[alpha, n, k] g(t[alpha, n, k]) == integral_0^1 (1 - t)^alpha g(t) dt``
    for every polynomial ``g`` of degree below ``2 n``."""
    from scipy.special import roots_jacobi

    n_max = max_m // 2 + 1
    t = np.full((max_m + 1, n_max + 1, n_max), 0.5)
    w = np.zeros((max_m + 1, n_max + 1, n_max))
    for alpha in range(max_m + 1):
        for n in range(1, n_max + 1):
            # scipy's rule is for (1 - x)^alpha on [-1, 1]; t = (x + 1) / 2 makes it (1 - t)^alpha 2^(alpha+1)
            x, wx = roots_jacobi(n, float(alpha), 0.0)
            t[alpha, n, :n] = (x + 1.0) / 2.0
            w[alpha, n, :n] = wx / 2.0 ** (alpha + 1)
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
    feat_a = np.empty(max_m + 1, dtype=np.int64)  # features of the elements the row satisfies (A)
    z_a = np.empty(max_m + 1)
    feat_b = np.empty(max_m + 1, dtype=np.int64)  # and of those it does not (B)
    before = np.empty(max_m + 1)
    acc_a = np.empty(max_m + 1)
    for r in range(x.shape[0]):
        for p in range(path_value.shape[0]):
            s = path_start[p]
            m = path_start[p + 1] - s
            a = 0
            zb = 1.0
            for i in range(m):  # branch-free: both lists are written, the counts decide what is kept
                e = s + i
                feature = elem_feature[e]
                v = x[r, feature]
                z = elem_z[e]
                # the row satisfies the element: v in (lo, hi], or v missing and NaN goes this way
                # (lo is NaN when unbounded below, then "v <= lo" is false)
                o = int(v <= elem_hi[e]) * (1 - int(v <= elem_lo[e])) + int(v != v) * int(elem_nan[e])
                feat_a[a] = feature
                z_a[a] = z
                feat_b[i - a] = feature
                a += o
                zb *= z + o * (1.0 - z)
            if zb == 0.0:
                continue  # every coalition's path to this leaf has a zero-cover branch: all zero
            b = m - a
            val = path_value[p] * zb
            # One Jacobi rule serves both integrals: weight (1-t)^(b-1) (Legendre when b = 0), n points.
            alpha = b - 1 if b > 0 else 0
            n = a // 2 + 1 if b > 0 else (a + 1) // 2
            for i in range(a):
                acc_a[i] = 0.0
            acc_b = 0.0
            for k in range(n):  # running products stay in registers; f is cheap to recompute
                t = quad_t[alpha, n, k]
                wk = quad_w[alpha, n, k]
                run = 1.0
                for i in range(a):
                    before[i] = run  # prod_{i' < i} f_i'
                    run *= z_a[i] + (1.0 - z_a[i]) * t
                acc_b += wk * run  # prod_A f, for B
                after = wk * (1.0 - t) if b > 0 else wk
                for i in range(a - 1, -1, -1):
                    acc_a[i] += before[i] * after
                    after *= z_a[i] + (1.0 - z_a[i]) * t
            if b > 0:  # j in B: -v Z_B integral (1-t)^(b-1) prod_A f, the same for all of them
                c = -val * acc_b
                for i in range(b):
                    out[r, feat_b[i]] += c
            # j in A: v (1 - z_j) Z_B integral (1-t)^b prod_{A, i != j} f  (leave-one-out products)
            for i in range(a):
                out[r, feat_a[i]] += val * (1.0 - z_a[i]) * acc_a[i]


def tree_shap(paths: PathEnsemble, x: np.ndarray) -> np.ndarray:
    """SHAP values ``[N, n_features]`` (float64) of the rows of ``x`` (float64, NaN = missing)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != paths.n_features:
        raise ValueError(f"expected a matrix [N, {paths.n_features}], got shape {x.shape}")
    out = np.zeros((x.shape[0], paths.n_features), dtype=np.float64)
    _tree_shap_kernel(x, paths.path_start, paths.path_value, paths.elem_feature, paths.elem_lo, paths.elem_hi,
                      paths.elem_nan, paths.elem_z, paths.quad_t, paths.quad_w, out)
    return out
