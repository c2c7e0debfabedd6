"""Benchmark SHAP explanations: cost per applicant and how long they stall an event loop.

Prints, for the served model (``--model-dir``, ACTIVE version by default):

* microseconds per applicant for one applicant and for a batch of ``--batch`` applicants, for
  - ``scorer.explain``: what a Score/BatchScore with explanation pays (ONNX features + TreeSHAP
    kernel + ranked Explanation objects),
  - the TreeSHAP kernel alone (``server.treeshap``),
  - shap's own C routine (``TreeExplainer``, tree_path_dependent) on the same trees, for comparison;
  - the plain score (ONNX only), for scale;
* the longest gap an asyncio loop sees between 1 ms ticks while another thread explains the batch
  (the kernel releases the GIL; shap's C routine does not).

Runs a few seconds. Command line: ``credscope-bench-explain --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _per_call_seconds(fn: Callable[[], object], budget: float, max_reps: int) -> tuple[float, float]:
    """Median (CPU seconds of this thread, wall seconds) per call of ``fn`` over at most ``max_reps``
    calls or ``budget`` seconds. CPU time is the steadier figure on a shared machine."""
    fn()  # warm-up
    cpu: list[float] = []
    wall: list[float] = []
    deadline = time.perf_counter() + budget
    while len(cpu) < max_reps and (not cpu or time.perf_counter() < deadline):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return float(np.median(cpu)), float(np.median(wall))


def _loop_stall(work: Callable[[], object]) -> float:
    """Longest gap (seconds) between 1 ms ticks of an asyncio loop while ``work`` runs in a thread."""

    async def main() -> float:
        done = threading.Event()
        worst = 0.0

        def run() -> None:
            try:
                work()
            finally:
                done.set()

        thread = threading.Thread(target=run)
        last = time.perf_counter()
        thread.start()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now
        thread.join()
        return worst

    return asyncio.run(main())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credscope-bench-explain",
        description="Measure the cost of SHAP explanations per applicant (1 applicant and a batch) for the "
                    "model in the store, against shap's own TreeExplainer, and the event-loop stall they cause.")
    parser.add_argument("--model-dir", type=Path, default=Path("models"), help="model store (default %(default)s)")
    parser.add_argument("--version", default=None, help="model version (default: the ACTIVE one)")
    parser.add_argument("--batch", type=int, default=100, help="batch size (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="time budget per measurement (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic applicants (default %(default)s)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="also write the figures as a bar chart to this PNG file (e.g. reports/explain.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``credscope-bench-explain``."""
    args = _parser().parse_args(argv)
    if args.batch < 1 or args.seconds <= 0:
        _parser().error("need --batch >= 1 and --seconds > 0")
    from server.model import ModelError, load_model
    from server.scoring import Scorer
    from server.treeshap import tree_shap
    from tools.datagen import generate
    from tools.train import encode_frame

    try:
        model = load_model(args.model_dir, args.version)
    except ModelError as exc:
        print(f"credscope-bench-explain: {exc}", file=sys.stderr)
        return 2
    print(f"loading model {model.version} and its explainer ...", file=sys.stderr, flush=True)
    scorer = Scorer(model)
    if scorer.explainer is None:
        print(f"credscope-bench-explain: model {model.version} cannot be explained: {scorer.explain_error}",
              file=sys.stderr)
        return 2
    explainer = scorer.explainer
    trees = explainer.trees
    rows = encode_frame(generate(max(args.batch, 2), args.seed))[: args.batch]
    one = rows[:1]
    features = model.transform(rows)
    x = features.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer.reference_shap_values(features[:1])  # import shap and build its explainer outside the timings
    print(f"model {model.version}: {trees.n_trees} trees, {explainer.paths.n_paths} leaves, max depth {trees.max_depth}; "
          f"batch of {args.batch}", flush=True)
    budget = args.seconds
    cases: list[tuple[str, Callable[[np.ndarray], object], Callable[[np.ndarray], object]]] = [
        ("score only (onnxruntime)", lambda r: scorer.score(r), lambda r: scorer.score(r)),
        ("scorer.explain (served path)", lambda r: scorer.explain(r), lambda r: scorer.explain(r)),
        ("TreeSHAP kernel alone", lambda r: tree_shap(explainer.paths, x[: len(r)]),
         lambda r: tree_shap(explainer.paths, x[: len(r)])),
        ("shap TreeExplainer C routine", lambda r: explainer.reference_shap_values(features[: len(r)]),
         lambda r: explainer.reference_shap_values(features[: len(r)])),
    ]
    print(f"{'µs per applicant, CPU (wall)':<32}{'1 applicant':>18}{f'batch of {args.batch}':>20}")
    figures: list[tuple[str, float, float]] = []
    for name, single, batch in cases:
        c1, w1 = _per_call_seconds(lambda s=single: s(one), budget, 2000)
        cb, wb = _per_call_seconds(lambda b=batch: b(rows), budget, 50)
        n = len(rows)
        figures.append((name, c1 * 1e6, cb / n * 1e6))
        print(f"{name:<32}{c1 * 1e6:>9.0f} ({w1 * 1e6:>5.0f}){cb / n * 1e6:>12.0f} ({wb / n * 1e6:>5.0f})", flush=True)
    stall_kernel = _loop_stall(lambda: scorer.explain(rows))
    stall_shap = _loop_stall(lambda: explainer.reference_shap_values(features))
    print(f"event-loop stall while a thread explains {args.batch} applicants: "
          f"kernel {stall_kernel * 1e3:.1f} ms, shap C routine {stall_shap * 1e3:.1f} ms")
    if args.plot:
        _plot(args.plot, figures, f"model {model.version}: {trees.n_trees} trees", args.batch)
        print(f"wrote {args.plot}")
    return 0


def _plot(path: Path, figures: list[tuple[str, float, float]], title: str, batch: int) -> None:
    """Bar chart of CPU µs per applicant, 1 applicant and a batch, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f[0] for f in figures]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.barh(y - 0.2, [f[1] for f in figures], height=0.4, label="1 applicant")
    ax.barh(y + 0.2, [f[2] for f in figures], height=0.4, label=f"batch of {batch} (per applicant)")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("CPU µs per applicant")
    ax.set_title(f"SHAP explanation cost — {title}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
