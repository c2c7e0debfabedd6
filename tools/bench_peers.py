"""The bench's two references, run on the same machine as CredScope.

* ``echo``: an empty grpc.aio server (one generic unary method that returns the request bytes) with the
  same worker model as ``credscope-server`` (N forked workers on one SO_REUSEPORT port, the same server
  options): the floor that no gRPC Python service can beat.
* MLServer (``mlserver`` + ``mlserver-sklearn`` from PyPI) serving the same model over its V2 gRPC
  inference protocol: the scikit-learn pipeline (feature engineering + LightGBM) whose ONNX export is
  the served CredScope version, saved with joblib; the requests are the same applicants as raw FP32
  tensors asking for ``predict_proba``. MLServer's dependencies conflict with CredScope's, so it lives
  in its own virtualenv (``.venv-bench``, made by ``make bench``); the subcommands ``mlserver-requests``
  and ``mlserver-check`` run with that virtualenv's Python and the repository on ``PYTHONPATH``.

Subcommands (``python -m tools.bench_peers --help``): ``echo``, ``peer-model``, ``mlserver-requests``,
``mlserver-check``. This module imports only the standard library at the top, so that it runs in
either virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ECHO_METHOD = "/credscope.bench.EchoService/Echo"
MLSERVER_INFER = "/inference.GRPCInferenceService/ModelInfer"
MLSERVER_MODEL = "credscope"
PEER_MODEL_FILE = "model-1thread.joblib"


# --------------------------------------------------------------------------------------------
# Echo server (CredScope's venv)
# --------------------------------------------------------------------------------------------

async def _serve_echo(settings: Any, on_ready: Callable[[int, str], None] | None) -> None:
    import asyncio

    import grpc

    from server.app import server_options

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server(options=server_options(settings))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "credscope.bench.EchoService", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port(f"{settings.server.host}:{settings.server.port}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    if on_ready is not None:
        on_ready(port, "echo")
    else:
        print(f"Echo listening on {settings.server.host}:{port}", flush=True)
    await stopping.wait()
    await server.stop(1.0)


def _run_echo(settings: Any, on_ready: Callable[[int, str], None] | None = None) -> int:
    import asyncio

    asyncio.run(_serve_echo(settings, on_ready))
    return 0


def echo_main(args: argparse.Namespace) -> int:
    import logging

    from server.settings import Settings
    from server.workers import run_workers

    logging.basicConfig(level="WARNING")
    settings = Settings()
    settings.server.host = args.host
    settings.server.port = args.port
    settings.server.workers = args.workers
    if args.workers > 1:
        return run_workers(settings, _run_echo)
    return _run_echo(settings)


# --------------------------------------------------------------------------------------------
# The peer's model: the fitted scikit-learn pipeline of the served version (CredScope's venv)
# --------------------------------------------------------------------------------------------

def peer_model(model_dir: Path, version: str | None, out: Path, log: Callable[[str], None] = print) -> Path:
    """Refit the pipeline of ``version`` from its metadata's recipe (synthetic data, seed, parameters),
    check that its ONNX export *is* that version (same bytes, same hash), and save it with joblib.

    A model trained on a real CSV cannot be refitted without that file: give the bench a synthetic
    model (``--model-dir``). NB: this process must not import onnxruntime before it trains: on this
    machine a LightGBM fit after ``import onnxruntime`` gives other trees (another version)."""
    import joblib

    from tools.train import train  # before anything imports onnxruntime: that import changes the fit

    model_dir = Path(model_dir)
    active = model_dir / "ACTIVE"
    version = version or (active.read_text().strip() if active.is_file() else None)
    if version is None:
        raise ValueError(f"no active model in {model_dir}")
    meta = json.loads((model_dir / version / "metadata.json").read_text(encoding="utf-8"))
    recipe = meta.get("training", {})
    if recipe.get("source") != "synthetic":
        raise ValueError(f"model {version} was trained on {recipe.get('source')!r}, not synthetic data: "
                         "the bench cannot refit it; give the bench a synthetic model (make model)")
    target = out / version / PEER_MODEL_FILE
    if target.is_file():
        return target
    params = {k: v for k, v in recipe.get("params", {}).items()
              if k not in ("random_state", "n_jobs", "deterministic", "force_row_wise", "verbose")}
    log(f"refitting the scikit-learn pipeline of model {version} for MLServer "
        f"({recipe.get('rows')} rows, seed {recipe.get('seed')}; about a minute, once)")
    with tempfile.TemporaryDirectory(prefix="credscope-peer-") as tmp:
        result = train(rows=int(recipe["rows"]), seed=int(recipe["seed"]), model_dir=Path(tmp), params=params,
                       early_stopping_rounds=0, activate=False, quiet=True)
    if result.version != version:
        raise RuntimeError(f"refitting model {version} gave version {result.version}: training is not "
                           "reproducible here, so MLServer would not serve the same model")
    # One thread per prediction, like each CredScope worker's onnxruntime session: LightGBM's OpenMP
    # threads only slow single-row predictions down (the trees and their outputs are unchanged).
    result.pipeline.named_steps["lgbm"].set_params(n_jobs=1)
    target.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(result.pipeline, target.with_suffix(".tmp"))
    os.replace(target.with_suffix(".tmp"), target)
    return target


def peer_model_main(args: argparse.Namespace) -> int:
    path = peer_model(args.model_dir, args.version, args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(path)
    return 0


# --------------------------------------------------------------------------------------------
# MLServer requests and checks (run with .venv-bench's Python)
# --------------------------------------------------------------------------------------------

def _infer_request(row: Any, version: str) -> Any:
    from mlserver.grpc import dataplane_pb2 as pb

    req = pb.ModelInferRequest(model_name=MLSERVER_MODEL, model_version=version)
    req.inputs.add(name="input-0", datatype="FP32", shape=list(row.shape))
    req.outputs.add(name="predict_proba")
    req.raw_input_contents.append(row.astype("<f4").tobytes())
    return req


def write_frames(path: Path, frames: list[bytes]) -> None:
    with open(path, "wb") as f:
        for b in frames:
            f.write(struct.pack("<I", len(b)))
            f.write(b)


def read_frames(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        out.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return out


def mlserver_requests_main(args: argparse.Namespace) -> int:
    """Turn a float32 [N, C] .npy of applicant rows into N serialized ModelInferRequests (1 row each)."""
    import numpy as np

    rows = np.load(args.rows)
    write_frames(args.out, [_infer_request(rows[i:i + 1], args.version).SerializeToString()
                            for i in range(len(rows))])
    return 0


def mlserver_check_main(args: argparse.Namespace) -> int:
    """Send rows to MLServer; print {"probabilities": [...]} (P(default) of each row) as JSON."""
    import grpc
    import numpy as np
    from mlserver.grpc import dataplane_pb2 as pb
    from mlserver.grpc import dataplane_pb2_grpc as pbg

    rows = np.load(args.rows)
    with grpc.insecure_channel(args.target) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        deadline = time.monotonic() + args.wait
        while True:
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=MLSERVER_MODEL), timeout=2).ready:
                    break
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    print(json.dumps({"error": f"MLServer not ready: {e.code().name} {e.details()}"}))
                    return 1
            if time.monotonic() > deadline:
                print(json.dumps({"error": "MLServer did not report the model ready"}))
                return 1
            time.sleep(0.3)
        probs = []
        for i in range(len(rows)):
            resp = stub.ModelInfer(_infer_request(rows[i:i + 1], args.version), timeout=10)
            out = np.frombuffer(resp.raw_output_contents[0], dtype="<f8" if resp.outputs[0].datatype == "FP64"
                                else "<f4") if resp.raw_output_contents else np.asarray(
                resp.outputs[0].contents.fp64_contents or resp.outputs[0].contents.fp32_contents)
            probs.append(float(out.reshape(-1, 2)[0, 1]))
    print(json.dumps({"probabilities": probs}))
    return 0


# --------------------------------------------------------------------------------------------
# Starting MLServer (CredScope's venv starts .venv-bench's mlserver)
# --------------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def peer_env() -> dict[str, str]:
    """The environment of MLServer and of this module's subcommands under .venv-bench."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSERVER_", "CREDSCOPE_"))}
    env["PYTHONPATH"] = str(ROOT)  # the pickled pipeline's FeatureEngineer is tools.train's
    env["OMP_NUM_THREADS"] = "1"
    return env


def venv_python(venv: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tools.bench_peers ARGS`` with another virtualenv's Python (MLServer's)."""
    return subprocess.run([str(Path(venv) / "bin" / "python"), "-m", "tools.bench_peers", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=peer_env())


class MLServerProcess:
    """``mlserver start`` in a folder of its own; stop() by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, venv: Path, model_file: Path, version: str, workdir: Path, parallel_workers: int) -> None:
        self.venv = Path(venv)
        self.version = version
        self.workdir = Path(workdir)
        self.grpc_port = free_port()
        repo = self.workdir / "repo"
        model_dir = repo / MLSERVER_MODEL
        model_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(model_file, model_dir / PEER_MODEL_FILE)
        (repo / "settings.json").write_text(json.dumps({
            "debug": False, "host": "127.0.0.1", "grpc_port": self.grpc_port, "http_port": free_port(),
            "metrics_port": free_port(), "metrics_endpoint": None, "parallel_workers": parallel_workers,
            "grpc_max_message_length": 64 << 20, "load_models_at_startup": True}))
        (model_dir / "model-settings.json").write_text(json.dumps({
            "name": MLSERVER_MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": f"./{PEER_MODEL_FILE}", "version": version}}))
        self.repo = repo
        self.log_path = self.workdir / "mlserver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def env(self) -> dict[str, str]:
        return peer_env()

    def start(self) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([str(self.venv / "bin" / "mlserver"), "start", str(self.repo)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=self.env(),
                                     start_new_session=True)
        log.close()

    def python(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return venv_python(self.venv, *args, timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: mlserver and its inference workers
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench_peers",
                                description="The bench's references: an empty grpc.aio echo server and the "
                                            "helpers that serve the same model on MLServer.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("echo", help="run the empty grpc.aio echo server (N workers on one port)")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, default=0, help="0 picks a free port")
    e.add_argument("--workers", type=int, default=1, help="worker processes (SO_REUSEPORT)")
    m = sub.add_parser("peer-model", help="refit and save (joblib) the scikit-learn pipeline of a stored version")
    m.add_argument("--model-dir", type=Path, default=Path("models"))
    m.add_argument("--version", help="default: the ACTIVE one")
    m.add_argument("--out", type=Path, default=Path("reports/bench-peer"), help="cache folder")
    r = sub.add_parser("mlserver-requests", help="(.venv-bench) serialize V2 ModelInferRequests from a .npy")
    r.add_argument("--rows", type=Path, required=True, help="float32 [N, columns] .npy")
    r.add_argument("--version", required=True, help="model version")
    r.add_argument("--out", type=Path, required=True, help="length-prefixed serialized requests")
    c = sub.add_parser("mlserver-check", help="(.venv-bench) wait for MLServer and print its P(default) per row")
    c.add_argument("--target", required=True)
    c.add_argument("--rows", type=Path, required=True)
    c.add_argument("--version", required=True)
    c.add_argument("--wait", type=float, default=90.0, help="seconds to wait for the model to be ready")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"echo": echo_main, "peer-model": peer_model_main, "mlserver-requests": mlserver_requests_main,
            "mlserver-check": mlserver_check_main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
