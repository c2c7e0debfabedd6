"""The TreeSHAP kernel itself (server.treeshap): exact on trees deeper than the served model's, the
same bits for a row alone or in a batch, and the generated kernel module kept only where it is safe.

The served model's paths are at most ~14 features long; here LightGBM grows leaf-wise trees with paths
of 20+ distinct features and missing values routed both ways, and shap's TreeExplainer (C) on the same
LightGBM model is the reference.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

from server import treeshap
from server.treeshap import kernel_source, paths_from_trees, tree_shap

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def deep() -> tuple[Any, np.ndarray, Any, treeshap.PathEnsemble]:
    """A LightGBM model with long paths, rows with missing values, shap's explainer and our paths."""
    import shap

    rng = np.random.default_rng(7)
    x = rng.normal(size=(4_000, 30))
    x[rng.random(x.shape) < 0.1] = np.nan
    y = (np.sin(3 * np.nan_to_num(x[:, :20])).sum(axis=1) + rng.normal(size=4_000) > 0).astype(int)
    model = lgb.LGBMClassifier(n_estimators=12, num_leaves=400, min_child_samples=2, max_depth=-1,
                               learning_rate=0.3, verbose=-1, random_state=0).fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = shap.TreeExplainer(model, feature_perturbation="tree_path_dependent")
    e = explainer.model
    paths = paths_from_trees(e.children_left, e.children_right, e.children_default, e.features, e.thresholds,
                             e.values[:, :, 0], e.node_sample_weight, float(np.asarray(e.base_offset).ravel()[0]),
                             x.shape[1])
    return model, x[:200], explainer, paths


def test_deep_paths_match_shap(deep: tuple[Any, np.ndarray, Any, treeshap.PathEnsemble]) -> None:
    model, rows, explainer, paths = deep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = np.asarray(explainer.shap_values(rows, check_additivity=False)).reshape(rows.shape)
    assert max(paths.lengths) >= 16, paths.lengths  # longer than any path of the served model
    assert paths.lengths == tuple(sorted(set(paths.lengths)))
    phi = tree_shap(paths, rows)
    assert np.max(np.abs(phi - reference)) < 1e-9
    expected = float(np.asarray(explainer.expected_value).reshape(-1)[0])
    assert abs(paths.base_value - expected) < 1e-9
    margin = model.predict(rows, raw_score=True)
    assert np.max(np.abs(paths.base_value + phi.sum(axis=1) - margin)) < 1e-9


def test_each_element_is_tested_through_its_own_condition(deep: tuple[Any, np.ndarray, Any, treeshap.PathEnsemble]
                                                          ) -> None:
    """The kernel tests a row once per distinct condition; every element's condition is its own (feature,
    bounds, where a missing value goes), and shared conditions are shared."""
    _, _, _, paths = deep
    feature, lo, hi, nan_ok, index = paths.conditions
    assert index.shape == paths.elem_feature.shape and feature.size < paths.elem_feature.size
    np.testing.assert_array_equal(feature[index], paths.elem_feature)
    np.testing.assert_array_equal(lo[index], paths.elem_lo)  # (NaN where unbounded below, on both sides)
    np.testing.assert_array_equal(hi[index], paths.elem_hi)
    np.testing.assert_array_equal(nan_ok[index], paths.elem_nan)
    assert len({(int(f), float(a), float(b), bool(k)) for f, a, b, k in zip(feature, np.nan_to_num(lo, nan=-np.inf),
                                                                         hi, nan_ok, strict=True)}) == feature.size


def test_a_row_gets_the_same_bits_alone_or_in_a_batch(deep: tuple[Any, np.ndarray, Any, treeshap.PathEnsemble]) -> None:
    _, rows, _, paths = deep
    batch = tree_shap(paths, rows[:40])
    for i in (0, 17, 39):
        np.testing.assert_array_equal(tree_shap(paths, rows[i:i + 1])[0], batch[i])


def test_input_shape_is_checked(deep: tuple[Any, np.ndarray, Any, treeshap.PathEnsemble]) -> None:
    _, rows, _, paths = deep
    with pytest.raises(ValueError, match=r"expected a matrix \[N, 30\]"):
        tree_shap(paths, rows[:, :5])
    with pytest.raises(ValueError, match="path lengths must be positive"):
        kernel_source(())


def test_generated_module_is_written_once_to_a_private_directory(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    source = kernel_source((1, 2, 5))
    private = tmp_path / "private"
    monkeypatch.setattr(treeshap, "_kernel_dirs", lambda: [private])
    first = treeshap._module_file(source, "k")
    assert first == private / "k.py" and first.read_text() == source
    assert private.stat().st_mode & 0o777 == 0o700
    mtime = first.stat().st_mtime_ns
    assert treeshap._module_file(source, "k") == first
    assert first.stat().st_mtime_ns == mtime  # unchanged text: untouched, numba's cache stays valid
    first.write_text("tampered")
    assert treeshap._module_file(source, "k") == first and first.read_text() == source


def test_a_directory_others_can_write_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(treeshap, "_kernel_dirs", lambda: [shared])
    assert treeshap._module_file(kernel_source((3,)), "k") is None
    assert not (shared / "k.py").exists()


def test_kernel_compiles_in_memory_when_there_is_no_private_directory(tmp_path: Path) -> None:
    """A process whose every candidate directory is unusable still explains (compiled in memory)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    code = f"""
import numpy as np
from server import treeshap
treeshap._kernel_dirs = lambda: [__import__('pathlib').Path({str(shared)!r})]
from server.treeshap import paths_from_trees, tree_shap
# one tree: x0 <= 0.5 goes left (cover 3), else right (cover 1); NaN goes left
paths = paths_from_trees(np.array([[1, -1, -1]]), np.array([[2, -1, -1]]), np.array([[1, -1, -1]]),
                         np.array([[0, 0, 0]]), np.array([[0.5, 0, 0]]), np.array([[0.0, 1.0, 5.0]]),
                         np.array([[4.0, 3.0, 1.0]]), 0.0, 1)
print(tree_shap(paths, np.array([[0.0], [1.0], [np.nan]])).ravel().tolist(), paths.base_value)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout.split()
    # E[f] = 0.75 * 1 + 0.25 * 5 = 2; phi = f(x) - E[f]
    assert out[:3] == ["[-1.0,", "3.0,", "-1.0]"], out
    assert float(out[3]) == 2.0
    assert os.listdir(shared) == []


def _small_ensemble() -> treeshap.PathEnsemble:
    """One tree: x0 <= 0.5 ? (x1 <= 0.5 ? (x2 <= 0.5 ? 1 : 2) : 3) : 4, covers 8/6/4/2/2/2/2."""
    left = np.array([[1, 2, 3, -1, -1, -1, -1]])
    right = np.array([[6, 5, 4, -1, -1, -1, -1]])
    return paths_from_trees(left, right, left.copy(), np.array([[0, 1, 2, 0, 0, 0, 0]]),
                            np.full((1, 7), 0.5), np.array([[0, 0, 0, 1.0, 2.0, 3.0, 4.0]]),
                            np.array([[8.0, 6.0, 4.0, 2.0, 2.0, 2.0, 2.0]]), 0.0, 3)


@pytest.mark.parametrize("numba_cache_dir", [False, True], ids=["cache beside the module", "NUMBA_CACHE_DIR"])
def test_first_compile_runs_in_a_child_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               numba_cache_dir: bool) -> None:
    """A new kernel compiles in a child process (the serving process only loads it from numba's cache, so
    a model loading in a thread does not stall the event loop); a compiled one starts no child, wherever
    numba keeps its cache (beside the module, or under ``NUMBA_CACHE_DIR`` as in the container image)."""
    from numba.core import config

    paths = _small_ensemble()
    assert paths.lengths == (1, 2, 3)
    monkeypatch.setattr(treeshap, "_kernel_dirs", lambda: [tmp_path / "kernels"])
    numba_dir = tmp_path / "numba-cache"
    if numba_cache_dir:  # for the child (its environment) and for this process (numba read it at import)
        monkeypatch.setenv("NUMBA_CACHE_DIR", str(numba_dir))
        monkeypatch.setattr(config, "CACHE_DIR", str(numba_dir))
    # a measured parent's coverage tracer is not handed down (it would only slow numba's compiler)
    monkeypatch.setenv("COVERAGE_PROCESS_START", str(tmp_path / "no-such-coveragerc"))
    monkeypatch.setenv("COVERAGE_PROCESS_CONFIG", "{}")
    children: list[list[str]] = []
    real_run = subprocess.run

    def spy(args: list[str], **kwargs: Any) -> Any:
        children.append(args)
        assert not {"COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG"} & set(kwargs["env"])
        return real_run(args, **kwargs)

    monkeypatch.setattr(treeshap.subprocess, "run", spy)
    for _ in range(2):  # the second time, as in a new worker: nothing loaded in this process yet
        treeshap._compiled_kernel.cache_clear()
        for name in [n for n in sys.modules if n.startswith("credscope_treeshap_")]:
            monkeypatch.delitem(sys.modules, name)
        fresh = _small_ensemble()
        phi = tree_shap(fresh, np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
        np.testing.assert_allclose(phi.sum(axis=1) + fresh.base_value, [1.0, 4.0], atol=1e-12)
    assert len(children) == 1 and children[0][0] == sys.executable
    beside = list((tmp_path / "kernels" / "__pycache__").glob("credscope_treeshap_*.nbi"))
    under = list(numba_dir.rglob("credscope_treeshap_*.nbi"))
    assert (under and not beside) if numba_cache_dir else (beside and not under)
    assert len(list((tmp_path / "kernels").glob("credscope_treeshap_*.compiled"))) == 1
    treeshap._compiled_kernel.cache_clear()


def _kernel_module(directory: Path) -> tuple[Path, str]:
    """The generated module of :func:`_small_ensemble`'s kernel in ``directory`` (private), and its name."""
    source = kernel_source((1, 2, 3))
    name = treeshap.kernel_name(source)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(source)
    return directory / f"{name}.py", name


def test_processes_starting_at_once_compile_the_kernel_once(tmp_path: Path) -> None:
    """The workers of a first start all need the new kernel: one compiles it, the others wait on its lock
    file and load what it compiled (every one of them explains correctly). The test holds the lock until
    each of the three has said it waits there (no sleep: the three meet at the lock on any host)."""
    kernels = tmp_path / "kernels"
    module, _ = _kernel_module(kernels)
    code = f"""
import json, logging, sys
import numba, numpy as np
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from server import treeshap
treeshap._kernel_dirs = lambda: [__import__('pathlib').Path({str(kernels)!r})]
from tests.test_treeshap import _small_ensemble
paths = _small_ensemble()
print("ready", flush=True)
phi = treeshap.tree_shap(paths, np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
print("sums", json.dumps((phi.sum(axis=1) + paths.base_value).tolist()))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with module.with_suffix(".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env) for _ in range(3)]
        heads = []
        for proc in procs:  # each says so when it finds the lock taken (it does: this test holds it)
            assert proc.stdout is not None
            head = ""
            for line in proc.stdout:  # up to that line (or the end, if it failed)
                head += line
                if "another process is compiling it; waiting" in line:
                    break
            heads.append(head)
        fcntl.flock(lock, fcntl.LOCK_UN)  # all three wait at the lock: one takes it and compiles
    outs = []
    for proc, head in zip(procs, heads, strict=True):
        out, _ = proc.communicate(timeout=300)
        out = head + out
        assert proc.returncode == 0, out
        outs.append(out)
    assert sum(out.count("TreeSHAP kernel: compiling it") for out in outs) == 1, outs
    assert all(out.count("another process is compiling it; waiting") == 1 for out in outs), outs
    for out in outs:
        sums = [line for line in out.splitlines() if line.startswith("sums ")]
        assert sums and np.allclose(json.loads(sums[0][5:]), [1.0, 4.0], atol=1e-12), out


def test_a_failed_compile_lets_go_of_the_lock_and_leaves_no_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A child that fails is reported (the process then compiles on first use); the lock is free again for
    the next process, and nothing claims the kernel is compiled. A lock that cannot be taken is reported too,
    and the compile goes on without it."""
    module, name = _kernel_module(tmp_path / "kernels")
    monkeypatch.setattr(treeshap, "_WARM", "import sys; sys.exit(3)")
    caplog.set_level(logging.INFO, logger="server.treeshap")
    for _ in range(2):  # the second call would hang on a lock left held
        assert treeshap._compiled_in_child(module, name, "uint16", "float32", "uint16") is False
    assert caplog.text.count("failed (exit 3)") == 2
    assert not list(module.parent.glob("*.compiled"))

    def no_lock(*args: Any) -> None:
        raise OSError("no locks here")

    monkeypatch.setattr(treeshap.fcntl, "flock", no_lock)
    caplog.clear()
    assert treeshap._compiled_in_child(module, name, "uint16", "float32", "uint16") is False
    assert "cannot lock" in caplog.text and "failed (exit 3)" in caplog.text


def test_processes_that_waited_on_a_failed_compile_do_not_try_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The workers of a first start wait on one compile; when its child fails, they do not each run a failing
    child in turn (N workers, N failures): they go on as the first did. A later start tries again."""
    module, name = _kernel_module(tmp_path / "kernels")
    caplog.set_level(logging.INFO, logger="server.treeshap")
    started = threading.Event()
    release = threading.Event()
    children: list[str] = []
    real_run = subprocess.run

    def failing_child(*args: Any, **kwargs: Any) -> Any:
        children.append(threading.current_thread().name)
        started.set()
        assert release.wait(60)
        return real_run([sys.executable, "-c", "import sys; sys.stderr.write('numba says no'); sys.exit(3)"],
                        capture_output=True, text=True, timeout=60, check=False)

    monkeypatch.setattr(treeshap.subprocess, "run", failing_child)
    results: dict[str, bool] = {}

    def compile_(who: str) -> None:
        results[who] = treeshap._compiled_in_child(module, name, "uint16", "float32", "uint16")

    first = threading.Thread(target=compile_, args=("first",), name="first")
    first.start()
    assert started.wait(60)
    waiters = [threading.Thread(target=compile_, args=(f"w{i}",), name=f"w{i}") for i in range(2)]
    for t in waiters:
        t.start()
    deadline = time.monotonic() + 60
    while caplog.text.count("another process is compiling it") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert caplog.text.count("another process is compiling it") == 2
    release.set()
    for t in (first, *waiters):
        t.join(60)
    assert results == {"first": False, "w0": False, "w1": False}
    assert children == ["first"]  # one failing child, not three
    assert caplog.text.count("failed to compile it (exit 3: numba says no)") == 2
    assert not list(module.parent.glob("*.compiled"))
    # a later start (nobody compiling now) tries again, and a success clears the failure
    monkeypatch.setattr(treeshap.subprocess, "run", real_run)
    monkeypatch.setattr(treeshap, "_WARM", "pass")
    assert treeshap._compiled_in_child(module, name, "uint16", "float32", "uint16") is True
    assert list(module.parent.glob("*.compiled")) and not list(module.parent.glob("*.failed"))
