"""Test data for the telemetry tests: audited predictions and outcomes in SQLite or PostgreSQL.

The tables are made by the audit trail's migrations (``server.db.migrate``: 0002_audit defines
predictions, outcomes and model_performance).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from server.db import migrate_postgres, migrate_sqlite
from server.schema import COLUMN_NAMES
from tests.helpers import ROOT, ServerProcess

#: Raw features the shifted population changes, and the engineered features computed from them.
SHIFTED = {"AMT_INCOME_TOTAL", "EXT_SOURCE_3"}
DERIVED = {"CREDIT_TO_INCOME", "ANNUITY_TO_INCOME", "INCOME_PER_PERSON",
           "EXT_SOURCE_MEAN", "EXT_SOURCE_MIN", "EXT_SOURCE_MAX", "EXT_SOURCE_PROD"}


def population(n: int, seed: int, shift: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic applicants (encoded raw matrix, default labels); ``shift`` makes incomes 1.8x and
    EXT_SOURCE_3 0.25 higher."""
    from tools.datagen import generate
    from tools.train import encode_frame

    frame = generate(n, seed)
    x = encode_frame(frame)
    if shift:
        cols = {name: j for j, name in enumerate(COLUMN_NAMES)}
        x[:, cols["AMT_INCOME_TOTAL"]] *= 1.8
        e3 = x[:, cols["EXT_SOURCE_3"]]
        x[:, cols["EXT_SOURCE_3"]] = np.where(np.isnan(e3), e3, np.minimum(e3 + 0.25, 1.0))
    return x, frame["TARGET"].to_numpy(dtype=np.int64)


@dataclass
class Audited:
    """Rows for the predictions and outcomes tables."""

    predictions: list[tuple] = field(default_factory=list)
    outcomes: list[tuple] = field(default_factory=list)


def audited(model, x: np.ndarray, y: np.ndarray | None, start: datetime, spacing: timedelta,
            label_share: float = 1.0) -> Audited:
    """Score ``x`` with ``model`` and make audit rows at ``start + i * spacing``; the first
    ``label_share`` of them get their outcome ``y``."""
    from server.scoring import Scorer

    results = Scorer(model).score(x)
    out = Audited()
    labelled = int(len(x) * label_share)
    for i, (row, r) in enumerate(zip(x, results, strict=True)):
        rid = str(uuid.uuid4())
        created = start + i * spacing
        inp = json.dumps({name: (None if math.isnan(v) else float(v)) for name, v in zip(COLUMN_NAMES, row.tolist(),
                                                                                      strict=True)})
        out.predictions.append((rid, created, None, None, "/credscope.v1.ScoringService/Score", inp, r.probability,
                                r.decision, r.risk_level, r.confidence, r.model_version, 1.0, False, None))
        if y is not None and i < labelled:
            out.outcomes.append((rid, bool(y[i]), created + timedelta(days=60), created + timedelta(days=59)))
    return out


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sqlite_audit(path: Path, data: Audited) -> str:
    """Create the audit tables in a SQLite file, insert ``data``; return the URL."""
    migrate_sqlite(path)
    conn = sqlite3.connect(path)
    conn.executemany("INSERT INTO predictions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     [(*p[:1], _iso(p[1]), *p[2:]) for p in data.predictions])
    conn.executemany("INSERT INTO outcomes VALUES (?,?,?,?)",
                     [(o[0], o[1], _iso(o[2]), _iso(o[3])) for o in data.outcomes])
    conn.commit()
    conn.close()
    return f"sqlite:///{path}"


async def postgres_audit(dsn: str, data: Audited) -> None:
    import asyncpg

    await migrate_postgres(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table("predictions", records=data.predictions)
        await conn.copy_records_to_table("outcomes", records=data.outcomes)
    finally:
        await conn.close()


# --- promtool -----------------------------------------------------------------------------------

def promtool() -> str:
    """Path of promtool (Debian's prometheus package); skips locally, fails under CI when missing."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required under CI=true (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


# --- the sidecar process ------------------------------------------------------------------------

class SidecarProcess(ServerProcess):
    """A ``credscope-telemetry serve`` process (stopped and read like a server process)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

def start_sidecar(args: list[str], env: dict[str, str] | None = None, timeout: float = 60.0) -> SidecarProcess:
    """Start ``credscope-telemetry serve`` on a free loopback port; return once it listens."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDSCOPE_", "PROMETHEUS_", "OTEL_"))}
    full_env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}, **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "telemetry.main", "serve", "--host", "127.0.0.1", "--port", "0",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=str(ROOT))
    sp = SidecarProcess(proc, 0)
    found = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sp.output.append(line)
            if "listening on http://" in line and not found.is_set():
                sp.port = int(line.split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1])
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"sidecar did not start in {timeout}s:\n{sp.log()}")
    if sp.port == 0:
        raise RuntimeError(f"sidecar exited with {proc.wait()}:\n{sp.log()}")
    return sp
