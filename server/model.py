"""Model runtime: load a version from the model store and score raw applicant matrices.

The store (written by ``credscope-train`` / ``tools.train``)::

    <model_dir>/<version>/model.onnx       version = first 16 hex digits of sha256(model.onnx)
    <model_dir>/<version>/metadata.json    features, decision policy, metrics, drift reference
    <model_dir>/ACTIVE                     the version served by default

The ONNX graph takes one float32 tensor (metadata ``onnx.input_name``, ``"input"``) of shape
``[N, len(COLUMNS)]`` in :data:`server.schema.COLUMNS` order and returns ``probabilities``
(float32 ``[N, 2]``; P(default) is column ``onnx.probability_column`` = 1) and ``features``
(float32 ``[N, len(MODEL_FEATURES)]``, the raw columns plus the engineered ones, what the trees see).

This module imports nothing from grpc.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.schema import COLUMN_NAMES, COLUMNS

__all__ = [
    "ACTIVE_FILE",
    "METADATA_FILE",
    "ONNX_FILE",
    "ModelArtifact",
    "ModelError",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "active_version",
    "list_versions",
    "load_model",
    "read_metadata",
]

ACTIVE_FILE = "ACTIVE"
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
SUPPORTED_FORMAT = 1
_VERSION_LENGTH = 16
_HEX = frozenset("0123456789abcdef")
_HOW_TO_TRAIN = "run `make model` or `credscope-train --model-dir {dir}` to train one"


class ModelError(Exception):
    """A model could not be loaded or used."""


class ModelNotFoundError(ModelError):
    """No model (or not the requested version) in the model store."""


class ModelIntegrityError(ModelError):
    """A stored model does not match its version hash or its metadata is unusable."""


def _is_version(name: str) -> bool:
    return len(name) == _VERSION_LENGTH and set(name) <= _HEX


def list_versions(model_dir: Path) -> list[str]:
    """Versions present in the store (directories holding model.onnx and metadata.json), oldest first."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    found = [d for d in model_dir.iterdir()
             if d.is_dir() and _is_version(d.name) and (d / ONNX_FILE).is_file() and (d / METADATA_FILE).is_file()]
    return [d.name for d in sorted(found, key=lambda d: ((d / METADATA_FILE).stat().st_mtime, d.name))]


def active_version(model_dir: Path) -> str | None:
    """The version named in ``<model_dir>/ACTIVE``, or None if there is no (non-empty) ACTIVE file."""
    try:
        text = (Path(model_dir) / ACTIVE_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def read_metadata(model_dir: Path, version: str) -> dict[str, Any]:
    """The metadata of a stored version, without loading (or verifying) its ONNX graph."""
    if not _is_version(version):
        raise ModelNotFoundError(f"{version!r} is not a model version (16 lower-case hex digits)")
    path = Path(model_dir) / version / METADATA_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"model {version} not found in {model_dir}: "
                                 f"{_HOW_TO_TRAIN.format(dir=model_dir)}") from exc
    except (OSError, ValueError) as exc:
        raise ModelIntegrityError(f"{path}: unreadable metadata: {exc}") from exc


@dataclass
class ModelArtifact:
    """A loaded model version, ready to score.

    ``path`` is the version directory (holding ``model.onnx`` and ``metadata.json``).
    """

    version: str
    metadata: dict[str, Any]
    path: Path
    session: ort.InferenceSession = field(repr=False)
    input_name: str = "input"
    proba_output: str = "probabilities"
    proba_column: int = 1
    features_output: str | None = "features"
    batch_session: ort.InferenceSession | None = field(default=None, repr=False)
    """A session with more intra-op threads for matrices of ``batch_rows`` rows or more (None: ``session``)."""
    batch_rows: int = 128
    onnx_bytes: bytes | None = field(default=None, repr=False)
    """The verified bytes of ``model.onnx`` (what the version hashes), e.g. to read its trees for explanations."""

    @property
    def features(self) -> tuple[str, ...]:
        """Names of the features the trees see (raw columns then engineered), in order."""
        return tuple(self.metadata["features"])

    @property
    def onnx_path(self) -> Path:
        """The ONNX file of this version."""
        return self.path / ONNX_FILE

    def onnx_model(self) -> Any:
        """The ONNX graph as an ``onnx.ModelProto``, parsed from the verified bytes this artifact was loaded from."""
        import onnx

        if self.onnx_bytes is None:
            raise ModelError(f"model {self.version} was loaded without its ONNX bytes")
        return onnx.load_from_string(self.onnx_bytes)

    @property
    def decision_policy(self) -> dict[str, Any]:
        """Thresholds: ``approve_below``, ``review_below``, ``risk_levels`` ([name, upper bound] pairs)."""
        return self.metadata["policy"]

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(COLUMNS):
            raise ValueError(f"expected a float32 matrix [N, {len(COLUMNS)}], got shape {x.shape}")
        return x

    def _session_for(self, x: np.ndarray) -> ort.InferenceSession:
        return self.batch_session if self.batch_session is not None and len(x) >= self.batch_rows else self.session

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """P(default) for each row of ``x`` (float32 ``[N, len(COLUMNS)]``, NaN = missing) as float64 ``[N]``."""
        x = self._check(x)
        out = self._session_for(x).run([self.proba_output], {self.input_name: x})[0]
        return out[:, self.proba_column].astype(np.float64)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """The feature matrix the trees see (float32 ``[N, len(features)]``), computed by the same graph."""
        if self.features_output is None:
            raise ModelError(f"model {self.version} has no features output")
        return self.session.run([self.features_output], {self.input_name: self._check(x)})[0]

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(P(default) float64 [N], features float32 [N, len(features)])`` in one run of the graph."""
        if self.features_output is None:
            raise ModelError(f"model {self.version} has no features output")
        x = self._check(x)
        proba, feats = self._session_for(x).run([self.proba_output, self.features_output], {self.input_name: x})
        return proba[:, self.proba_column].astype(np.float64), feats


def _session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No spinning: idle pool threads would burn the cores the other workers need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _check_metadata(meta: dict[str, Any], version: str, session: ort.InferenceSession) -> dict[str, Any]:
    """Validate metadata against the format, the schema and the graph; return its ``onnx`` section."""
    if meta.get("format_version") != SUPPORTED_FORMAT:
        raise ModelIntegrityError(f"model {version}: unsupported metadata format_version "
                                  f"{meta.get('format_version')!r} (expected {SUPPORTED_FORMAT})")
    if meta.get("version") != version:
        raise ModelIntegrityError(f"model {version}: metadata names version {meta.get('version')!r}")
    names = [c.get("name") for c in meta.get("columns", [])]
    if names != list(COLUMN_NAMES):
        raise ModelIntegrityError(f"model {version} was trained on other input columns than server.schema.COLUMNS; "
                                  "retrain it with this code")
    for stored, column in zip(meta["columns"], COLUMNS, strict=True):
        if column.kind == "categorical" and list(stored.get("categories", [])) != list(column.categories):
            raise ModelIntegrityError(f"model {version}: categories of {column.name} differ from server.schema")
    onnx_meta = meta.get("onnx", {})
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    input_name = onnx_meta.get("input_name", "input")
    if input_name not in inputs or len(inputs) != 1:
        raise ModelIntegrityError(f"model {version}: expected one ONNX input {input_name!r}, found {sorted(inputs)}")
    width = inputs[input_name].shape[-1]
    if width != len(COLUMNS):
        raise ModelIntegrityError(f"model {version}: ONNX input has {width} columns, schema has {len(COLUMNS)}")
    if onnx_meta.get("output_name", "probabilities") not in outputs:
        raise ModelIntegrityError(f"model {version}: ONNX output {onnx_meta.get('output_name')!r} missing")
    return onnx_meta


def load_model(model_dir: Path, version: str | None = None, *, intra_op_threads: int = 1,
               inter_op_threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",),
               batch_intra_op_threads: int = 1) -> ModelArtifact:
    """Load ``version`` (default: the ACTIVE one) from the store and open an onnxruntime session.

    The session is tuned for low single-row latency on a small host: ``intra_op_threads`` and
    ``inter_op_threads`` (default 1 each, one worker process per core does the parallelism),
    sequential execution, all graph optimisations, no spinning threads. With
    ``batch_intra_op_threads`` != ``intra_op_threads`` a second session scores matrices of
    ``ModelArtifact.batch_rows`` rows or more (BatchScore) on that many threads: a batch of 1,000 takes
    ~9 ms on one thread and ~6 ms on two here; its probabilities may differ from the one-thread
    session's in the last float32 bit (summation order).

    Raises :class:`ModelNotFoundError` when there is no model (the message says how to train one) and
    :class:`ModelIntegrityError` when the ONNX bytes do not hash to the version or the metadata does
    not fit this code.
    """
    model_dir = Path(model_dir)
    how = _HOW_TO_TRAIN.format(dir=model_dir)
    if version is None:
        version = active_version(model_dir)
        if version is None:
            known = list_versions(model_dir)
            hint = f" (stored versions: {', '.join(known)}; name one or write it to {model_dir / ACTIVE_FILE})" if known else ""
            raise ModelNotFoundError(f"no active model in {model_dir}{hint}: {how}")
    if not _is_version(version):
        raise ModelNotFoundError(f"{version!r} is not a model version (16 lower-case hex digits): {how}")
    path = model_dir / version
    onnx_file, meta_file = path / ONNX_FILE, path / METADATA_FILE
    if not onnx_file.is_file() or not meta_file.is_file():
        raise ModelNotFoundError(f"model {version} not found in {model_dir} (need {ONNX_FILE} and "
                                 f"{METADATA_FILE} in {path}): {how}")
    onnx_bytes = onnx_file.read_bytes()
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    if digest[:_VERSION_LENGTH] != version:
        raise ModelIntegrityError(f"{onnx_file} is corrupt or was modified: its sha256 starts {digest[:16]}, "
                                  f"not {version}; {how}")
    meta = read_metadata(model_dir, version)
    try:
        session = ort.InferenceSession(onnx_bytes, _session_options(intra_op_threads, inter_op_threads),
                                       providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelIntegrityError(f"{onnx_file}: onnxruntime cannot load it: {exc}") from exc
    onnx_meta = _check_metadata(meta, version, session)
    batch_session = None
    if batch_intra_op_threads != intra_op_threads:  # large matrices (BatchScore) on more threads
        batch_session = ort.InferenceSession(onnx_bytes, _session_options(batch_intra_op_threads, inter_op_threads),
                                             providers=list(providers))
    outputs = {o.name for o in session.get_outputs()}
    features_output = onnx_meta.get("features_output_name", "features")
    return ModelArtifact(
        version=version,
        metadata=meta,
        path=path,
        session=session,
        input_name=onnx_meta.get("input_name", "input"),
        proba_output=onnx_meta.get("output_name", "probabilities"),
        proba_column=int(onnx_meta.get("probability_column", 1)),
        features_output=features_output if features_output in outputs else None,
        batch_session=batch_session,
        onnx_bytes=onnx_bytes,
    )


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync and ``os.replace``,
    so readers (other workers) see the old or the new content, never a torn one."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the server may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_active(model_dir: Path, version: str) -> None:
    """Make ``version`` the store's ACTIVE one (atomically); every worker watching the store follows."""
    if not _is_version(version) or not (Path(model_dir) / version / ONNX_FILE).is_file():
        raise ModelNotFoundError(f"model {version!r} is not in the store {model_dir}")
    write_atomic(Path(model_dir) / ACTIVE_FILE, f"{version}\n".encode())
