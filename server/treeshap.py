"""Exact path-dependent TreeSHAP, compiled with numba, equal to shap's ``TreeExplainer``.

Why it is the same quantity: under ``feature_perturbation="tree_path_dependent"`` a tree's value for
a coalition ``S`` is the sum over its leaves of ``v_leaf * prod_i (o_i if i in S else z_i)``, where
``i`` runs over the distinct features on the leaf's path, ``o_i`` (0/1) says whether the row
satisfies every split on feature ``i`` along the path, and ``z_i`` is the product of the cover
fractions ``cover(child) / cover(parent)`` of those splits. The Shapley value of that game for a
leaf with ``m`` distinct features is, for feature ``j`` on the path,

    phi_j = v * (o_j - z_j) * sum_{S subset of others} |S|! (m-1-|S|)! / m! * prod_{i in S} o_i
                                                                   * prod_{i not in S} z_i
          = v * (o_j - z_j) * integral_0^1 prod_{i != j} (z_i + (o_i - z_i) t) dt,

because ``k! (m-1-k)! / m!`` is the Beta integral of ``t^k (1-t)^(m-1-k)``. The integrand is a
polynomial of degree ``m - 1``, which Gauss-Legendre quadrature with ``ceil(m / 2)`` points
integrates exactly, so the result is exact up to floating-point rounding (the tests hold it to
shap's C implementation within 1e-9). Features not on a path are null players of that leaf's game;
SHAP values add over leaves and trees. (This is the path-wise form GPUTreeShap uses, with the
combinatorial weights evaluated by quadrature, as in Linear TreeSHAP.)

How it runs fast: every path of the same length ``m`` does the same arithmetic, so the paths are
grouped by length and each group is laid out element-major (element ``i`` of all its paths is one
contiguous run). For each length present in the model, a function with the quadrature fully unrolled
(``m`` leave-one-out products at ``ceil(m / 2)`` points, every value a local) is generated and
compiled; its loop over the group's paths has no branches and no inner loops, so the compiler runs
it on SIMD lanes, several paths at a time (AVX-512 / AVX2 where the CPU has them). A row costs:
one pass deciding which distinct conditions (feature, bounds, where a missing value goes) the row meets (a
lookup of its value and two comparisons, no branches; ~10,000 conditions for the ~55,000 elements of the
served model, since the first splits of a tree lie on most of its paths), one pass giving each element its
condition's result, the unrolled group loops, and one pass adding each element's share to its feature
(into four interleaved partial sums, so consecutive adds do not wait on each other, summed in a fixed
order). No fused multiply-add contraction and no fast-math: the same row gives the same bits on any
x86-64 host.

The generated source is written to a module in a private cache directory (numba's disk cache
needs a file), named by the hash of its text, so workers and restarts load the compiled code
instead of compiling again. The first compile (~0.5-1.5 s per length, ~7 s for the served
model, mostly holding the GIL) runs in a child process, so a model version loading in a thread of a
serving process does not stall its event loop, and one process at a time (a lock file), so the
workers of a first start compile it once; they then load the compiled code. The kernel runs without the GIL
(``nogil``), so a thread can explain while the event loop serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import stat
import subprocess  # nosec B404 - runs our own interpreter on our generated module
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PathEnsemble", "kernel_source", "paths_from_trees", "tree_shap"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PathEnsemble:
    """Every root-to-leaf path of an ensemble, with its distinct features merged, grouped by length.

    ``groups[g] = (m, count, first_element, first_path)``: group ``g`` holds ``count`` paths of ``m``
    elements; element ``i`` of its path ``p`` is at ``first_element + i * count + p`` in the element
    arrays, and the path's leaf value at ``first_path + p`` in ``path_value``. Element ``e`` is feature
    ``elem_feature[e]`` with the interval ``(elem_lo[e], elem_hi[e]]`` its splits allow (``elem_lo``
    is NaN when no split bounds it from below, so ``-inf`` stays inside; float32 when every bound is a
    float32 value, as in ONNX), ``elem_nan[e]`` (whether a missing value goes the path's way at all of
    them) and ``elem_z[e]`` (product of cover fractions). Many elements share one condition (the
    first splits of a tree lie on most of its paths): :attr:`conditions` holds each distinct one once.
    """

    groups: np.ndarray
    path_value: np.ndarray
    elem_feature: np.ndarray
    elem_lo: np.ndarray
    elem_hi: np.ndarray
    elem_nan: np.ndarray
    elem_z: np.ndarray
    base_value: float
    n_features: int

    @property
    def n_paths(self) -> int:
        return int(self.path_value.size)

    @property
    def lengths(self) -> tuple[int, ...]:
        """The path lengths present, ascending."""
        return tuple(int(m) for m in self.groups[:, 0])

    @functools.cached_property
    def conditions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The distinct conditions ``(feature, lo, hi, nan_ok)`` of the elements (each array one entry per
        condition), and for each element the index of its condition: a row is tested once per condition
        (~10,000 for the served model's ~55,000 elements), and each element looks its result up."""
        lo = self.elem_lo.astype(np.float64)
        keys = np.rec.fromarrays([self.elem_feature.astype(np.int64), np.where(np.isnan(lo), -np.inf, lo),
                                  self.elem_hi.astype(np.float64), self.elem_nan.astype(np.int64)])
        _, first, index = np.unique(keys, return_index=True, return_inverse=True)
        index_type = np.uint16 if first.size <= np.iinfo(np.uint16).max + 1 else np.int64
        return (self.elem_feature[first], self.elem_lo[first], self.elem_hi[first], self.elem_nan[first],
                index.reshape(-1).astype(index_type))

    @functools.cached_property
    def kernel(self) -> Callable[..., None]:
        """The compiled kernel for this ensemble's path lengths and dtypes (compiled or loaded on first use)."""
        return _compiled_kernel(self.lengths, self.elem_feature.dtype.name, self.elem_lo.dtype.name,
                                self.conditions[4].dtype.name)


def paths_from_trees(children_left: np.ndarray, children_right: np.ndarray, children_default: np.ndarray,
                     features: np.ndarray, thresholds: np.ndarray, values: np.ndarray, covers: np.ndarray,
                     base_offset: float, n_features: int) -> PathEnsemble:
    """Enumerate the paths of trees in shap's dense format (``[n_trees, max_nodes]`` arrays, split
    ``x <= threshold`` goes left, NaN goes to ``children_default``; ``values`` ``[n_trees, max_nodes]``)."""
    paths: list[tuple[float, list[tuple[int, float, float, bool, float]]]] = []
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
                paths.append((float(values[t, n]), [(f, a, b, bool(ok), zz) for f, (a, b, ok, zz) in elems.items()]))
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
    # the expected value: every leaf weighted by the share of the training samples that reach it
    for leaf_value, path_elems in paths:
        base += leaf_value * float(np.prod([e[4] for e in path_elems]))
    groups: list[tuple[int, int, int, int]] = []
    columns: list[list[Any]] = [[], [], [], [], []]  # feature, lo, hi, nan_ok, z
    path_values: list[float] = []
    by_length: dict[int, list[tuple[float, list[tuple[int, float, float, bool, float]]]]] = {}
    for path in paths:
        by_length.setdefault(len(path[1]), []).append(path)
    n_elements = 0
    for m in sorted(by_length):
        group = by_length[m]
        groups.append((m, len(group), n_elements, len(path_values)))
        for i in range(m):  # element-major: element i of every path of the group, then element i + 1
            for _, path_elems in group:
                for column, item in zip(columns, path_elems[i], strict=True):
                    column.append(item)
        path_values.extend(leaf_value for leaf_value, _ in group)
        n_elements += m * len(group)
    # The kernel streams these arrays once per row, so they are as narrow as exactness allows: the
    # thresholds of an ONNX tree ensemble are float32 values (kept as float32), others stay float64.
    bounds = [np.asarray(columns[k], dtype=np.float64) for k in (1, 2)]
    if all(np.array_equal(b.astype(np.float32), b, equal_nan=True) for b in bounds):
        bounds = [b.astype(np.float32) for b in bounds]
    feature_type = np.uint16 if n_features <= np.iinfo(np.uint16).max + 1 else np.int64
    return PathEnsemble(np.asarray(groups, dtype=np.int64).reshape(-1, 4),
                        np.asarray(path_values, dtype=np.float64),
                        np.asarray(columns[0], dtype=feature_type), bounds[0], bounds[1],
                        np.asarray(columns[3], dtype=np.bool_), np.asarray(columns[4], dtype=np.float64),
                        base, int(n_features))


_KERNEL_HEAD = '''\
"""Generated by server.treeshap.kernel_source for the path lengths {lengths}: do not edit."""
import numpy as np
from numba import njit

_OPTIONS = dict(nogil=True, error_model="numpy", cache={cache})


@njit(**_OPTIONS)
def _elements(xr, feature, lo, hi, nan_ok, met):  # pragma: no cover
    # met[e] = 1 when the row satisfies element e: v in (lo, hi], or v missing and NaN goes this way
    # (lo is NaN when unbounded below, then "v <= lo" is false); no branches (rows differ, branches mispredict)
    for e in range(feature.size):
        v = xr[feature[e]]
        met[e] = ((v <= hi[e]) & ((v <= lo[e]) ^ True)) | ((v != v) & nan_ok[e])


@njit(**_OPTIONS)
def _lookup(tested, index, met):  # pragma: no cover
    # each element's result is its condition's
    for e in range(index.size):
        met[e] = tested[index[e]]
'''

_KERNEL_DRIVER = '''

@njit(**_OPTIONS)
def shap_rows(x, groups, feature, cfeature, lo, hi, nan_ok, index, z, value, out):  # pragma: no cover
    tested = np.empty(cfeature.size, dtype=np.uint8)
    met = np.empty(feature.size, dtype=np.uint8)
    share = np.empty(feature.size)
    for r in range(x.shape[0]):
        _elements(x[r], cfeature, lo, hi, nan_ok, tested)
        _lookup(tested, index, met)
        for g in range(groups.shape[0]):
            m = groups[g, 0]
            count = groups[g, 1]
            first = groups[g, 2]
            path = groups[g, 3]
{dispatch}
        acc = np.zeros((4, out.shape[1]))
        for e in range(feature.size):
            acc[e & 3, feature[e]] += share[e]
        row = out[r]
        for f in range(out.shape[1]):
            row[f] += (acc[0, f] + acc[1, f]) + (acc[2, f] + acc[3, f])


def warm(feature_dtype, bound_dtype, index_dtype):
    """Compile shap_rows for these element dtypes (run in a child process: numba's cache keeps the result)."""
    x = np.zeros((1, 1))
    bounds = np.zeros(0, dtype=bound_dtype)
    features = np.zeros(0, dtype=feature_dtype)
    shap_rows(x, np.zeros((0, 4), dtype=np.int64), features, features, bounds, bounds,
              np.zeros(0, dtype=np.bool_), np.zeros(0, dtype=index_dtype), np.zeros(0), np.zeros(0),
              np.zeros((1, 1)))
'''


def _group_source(m: int) -> str:
    """The unrolled function for paths of ``m`` elements: ``share[e] = v (o - z) integral prod_{i != j} f_i``
    over the Gauss-Legendre rule of ``ceil(m / 2)`` points, one path per loop iteration."""
    n = (m + 1) // 2
    x, w = np.polynomial.legendre.leggauss(n)
    points = [(repr(float((xk + 1.0) / 2.0)), repr(float(wk / 2.0))) for xk, wk in zip(x, w, strict=True)]
    span = [f"first + {i} * count:first + {i + 1} * count" for i in range(m)]
    lines = ["", "", "@njit(**_OPTIONS)",
             f"def _length_{m}(met, z, value, first, count, path, share):  # pragma: no cover",
             "    v = value[path:path + count]"]
    lines += [f"    o{i}, z{i}, s{i} = met[{span[i]}], z[{span[i]}], share[{span[i]}]" for i in range(m)]
    lines.append("    for p in range(count):")
    for i in range(m):
        lines.append(f"        a{i} = z{i}[p]")
        lines.append(f"        b{i} = o{i}[p] - a{i}")
        lines.append(f"        phi{i} = 0.0")
    for t, wk in points:
        for i in range(m):
            lines.append(f"        f{i} = a{i} + b{i} * {t}")
        lines.append(f"        pre0 = {wk}")  # prefix products, the quadrature weight folded in
        lines += [f"        pre{i} = pre{i - 1} * f{i - 1}" for i in range(1, m)]
        lines.append("        suf = 1.0")
        for i in range(m - 1, -1, -1):
            lines.append(f"        phi{i} += pre{i} * suf")
            if i:
                lines.append(f"        suf *= f{i}")
    lines.append("        vp = v[p]")
    lines += [f"        s{i}[p] = vp * b{i} * phi{i}" for i in range(m)]
    return "\n".join(lines) + "\n"


def kernel_source(lengths: tuple[int, ...], cache: bool = True) -> str:
    """The Python source of the kernel for paths of the given lengths (numba-compiled on import)."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"path lengths must be positive, got {lengths}")
    dispatch = "\n".join(
        f"            {'if' if k == 0 else 'elif'} m == {m}:\n"
        f"                _length_{m}(met, z, value, first, count, path, share)" for k, m in enumerate(lengths))
    return (_KERNEL_HEAD.format(lengths=list(lengths), cache=cache)
            + "".join(_group_source(m) for m in lengths)
            + _KERNEL_DRIVER.format(dispatch=dispatch))


def _private_dir(path: Path) -> bool:
    """Create ``path`` (mode 0700) if needed; true when it is a directory of ours nobody else can write."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _kernel_dirs() -> list[Path]:
    """Where the generated kernel may live, in order: beside this module (as numba's own cache), then
    the user's cache directory (numba's ``NUMBA_CACHE_DIR`` when set)."""
    from numba.core import config
    from numba.misc.appdirs import AppDirs

    numba_dir = getattr(config, "CACHE_DIR", "")
    user = Path(numba_dir) if numba_dir else Path(AppDirs("credscope").user_cache_dir)
    return [Path(__file__).parent / "__pycache__" / "treeshap_kernels", user / "credscope-treeshap"]


def _module_file(source: str, name: str) -> Path | None:
    """Write ``source`` to ``<private dir>/<name>.py`` unless it is there already with that text (an
    unchanged file keeps numba's cache valid); None when no private, writable directory is at hand."""
    for directory in _kernel_dirs():
        if not _private_dir(directory):
            continue
        target = directory / f"{name}.py"
        try:
            if target.is_file() and target.read_text() == source:
                return target
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                fh.write(source)
            os.replace(tmp, target)
            return target
        except OSError:
            continue
    return None


#: Run in a child process: load the generated module and compile its kernel into numba's disk cache.
_WARM = """\
import importlib.util, sys
path, name, feature_dtype, bound_dtype, index_dtype = sys.argv[1:6]
spec = importlib.util.spec_from_file_location(name, path)
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
module.warm(feature_dtype, bound_dtype, index_dtype)
"""


def kernel_name(source: str) -> str:
    """The generated module's name: named by its text, so that a changed kernel is a new module."""
    return "credscope_treeshap_" + hashlib.sha256(source.encode()).hexdigest()[:16]


def _compiled_marker(path: Path, name: str, *dtypes: str) -> Path:
    """The file that says numba's disk cache holds this kernel for these argument types, this Python, this
    numba and this cache directory (numba keeps its cache beside the module or under ``NUMBA_CACHE_DIR``)."""
    import numba
    from numba.core import config

    key = repr((dtypes, sys.version, numba.__version__, getattr(config, "CACHE_DIR", "")))
    return path.parent / f"{name}.{hashlib.sha256(key.encode()).hexdigest()[:16]}.compiled"


def _compiled_in_child(path: Path, name: str, feature_dtype: str, bound_dtype: str, index_dtype: str) -> bool:
    """Compile the kernel of the module at ``path`` in a child process, unless it was compiled before.

    Compiling takes seconds of CPU (~7 s for the served model, ~15-20 s for 300 trees of 31 leaves), most
    of it holding the GIL: in this process, while a new model version loads in a thread, the event loop
    would stall that long. The child fills numba's disk cache and this
    process then loads the compiled code (~0.1-1 s); a marker file beside the module records that it did.
    Processes compiling the same kernel at once (the workers of a first start) take turns on a lock file
    beside it: one compiles, the others wait and then load. The lock is passed to the child, so it lasts
    while the child runs even if this process dies. False when the child failed (then this process compiles
    on first use). A process that waited while another's child failed does not try again (a first start
    of N workers would otherwise fail N times in turn); a later start does."""
    marker = _compiled_marker(path, name, feature_dtype, bound_dtype, index_dtype)
    if marker.exists():
        return True
    lock_file = path.with_suffix(".lock")
    failed = marker.with_suffix(".failed")
    with contextlib.ExitStack() as stack:
        fds: tuple[int, ...] = ()
        failure_before: tuple[int, int] | None = None
        waited = False
        try:  # released when every holder of the file (this process, the child) has closed it or died
            lock = stack.enter_context(lock_file.open("a"))
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waited, failure_before = True, _file_state(failed)
                log.info("TreeSHAP kernel: another process is compiling it; waiting for it (%s)", lock_file)
                fcntl.flock(lock, fcntl.LOCK_EX)
            fds = (lock.fileno(),)
        except OSError as exc:  # (the directory is ours and writable; should it fail all the same, go on unlocked)
            log.warning("TreeSHAP kernel: cannot lock %s (%s); compiling without the lock", lock_file, exc)
        if marker.exists():  # another process compiled it while this one waited
            return True
        if waited and _file_state(failed) not in (None, failure_before):  # written while this one waited
            with contextlib.suppress(OSError):
                log.warning("TreeSHAP kernel: the process this one waited for failed to compile it (%s); "
                            "not trying again here", failed.read_text(errors="replace").strip()[-300:])
            return False
        log.info("TreeSHAP kernel: compiling it for this model's path lengths (once per model shape and "
                 "Python/numba version, about 1 s per path length; later starts load it)")
        started = time.monotonic()
        # The child runs only the generated module and numba: a coverage tracer inherited from a measured
        # parent (`make test COVERAGE=1`) would measure nothing of ours and slow numba's compiler 2-3x. (The
        # environment is handed on, not read: settings still come from server.settings alone.)
        env = {k: v for k, v in os.environ.items() if k not in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START")}
        try:
            args = [str(path), name, feature_dtype, bound_dtype, index_dtype]
            done = subprocess.run([sys.executable, "-c", _WARM, *args],  # noqa: S603  # nosec B603 - our interpreter, our generated module
                                  capture_output=True, text=True, timeout=900, check=False, env=env, pass_fds=fds)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("TreeSHAP kernel: compiling in a child process failed (%s); compiling here", exc)
            _note_failure(failed, str(exc))
            return False
        if done.returncode != 0:
            log.warning("TreeSHAP kernel: compiling in a child process failed (exit %s): %s; compiling here",
                        done.returncode, done.stderr.strip()[-2000:])
            _note_failure(failed, f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
            return False
        with contextlib.suppress(OSError):
            failed.unlink(missing_ok=True)
        try:
            marker.touch()
        except OSError as exc:
            log.warning("TreeSHAP kernel: cannot write %s (%s); the next start will check numba's cache again",
                        marker, exc)
        log.info("TreeSHAP kernel: compiled in %.1f s", time.monotonic() - started)
    return True


def _file_state(path: Path) -> tuple[int, int] | None:
    """(inode, modification time) of ``path``, None when it is not there: a new write is a new state."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _note_failure(path: Path, why: str) -> None:
    """Say in ``path`` (written anew: a new inode) that the compile failed, for the processes waiting on it."""
    with contextlib.suppress(OSError):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(why + "\n")
        os.replace(tmp, path)


@functools.cache
def _compiled_kernel(lengths: tuple[int, ...], feature_dtype: str, bound_dtype: str,
                     index_dtype: str) -> Callable[..., None]:
    source = kernel_source(lengths)
    name = kernel_name(source)
    module = sys.modules.get(name)
    if module is None:
        path = _module_file(source, name)
        if path is None:  # nowhere to keep it: compile in memory, once per process
            namespace: dict[str, Any] = {"__name__": name}
            exec(compile(kernel_source(lengths, cache=False), f"<{name}>", "exec"), namespace)  # noqa: S102  # nosec B102 - our own generated text
            return namespace["shap_rows"]  # type: ignore[no-any-return]
        _compiled_in_child(path, name, feature_dtype, bound_dtype, index_dtype)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module.shap_rows  # type: ignore[no-any-return]


def tree_shap(paths: PathEnsemble, x: np.ndarray) -> np.ndarray:
    """SHAP values ``[N, n_features]`` (float64) of the rows of ``x`` (float64, NaN = missing)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != paths.n_features:
        raise ValueError(f"expected a matrix [N, {paths.n_features}], got shape {x.shape}")
    out = np.zeros((x.shape[0], paths.n_features), dtype=np.float64)
    if paths.n_paths:
        feature, lo, hi, nan_ok, index = paths.conditions
        paths.kernel(x, paths.groups, paths.elem_feature, feature, lo, hi, nan_ok, index, paths.elem_z,
                     paths.path_value, out)
    return out
