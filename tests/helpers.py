"""Test helpers: start a real credscope-server process on loopback and stop it by its pid."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(r"CredScope listening on (\S+):(\d+)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    port: int
    output: list[str] = field(default_factory=list)
    cwd: Path = ROOT

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def log(self) -> str:
        return "".join(self.output)


def start_server(model_dir: Path, *, env: Mapping[str, str] | None = None, args: list[str] | None = None,
                 cwd: Path | None = None, timeout: float = 60.0) -> ServerProcess:
    """Start ``credscope-server`` on 127.0.0.1 with a free port; return once it listens and serves."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CREDSCOPE_")}
    full_env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    # Every test client calls from 127.0.0.1: brute-force slowing (failed auths per address) is off unless
    # a test turns it on (tests/test_bruteforce.py), or tests that send bad keys on purpose would lock out
    # the ones after them.
    full_env["CREDSCOPE_AUTH__FAILED_AUTH_LIMIT"] = "0"
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "server.main", "--host", "127.0.0.1", "--port", "0",
           "--model-dir", str(model_dir), *(args or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=str(cwd or ROOT))
    sp = ServerProcess(proc, 0, cwd=cwd or ROOT)
    found = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sp.output.append(line)
            m = LISTEN_RE.search(line)
            if m and not found.is_set():
                sp.port = int(m.group(2))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.1):
        if time.monotonic() > deadline:
            sp.stop(signal.SIGKILL)
            raise TimeoutError(f"server did not start in {timeout}s:\n{sp.log()}")
    if sp.port == 0:
        raise RuntimeError(f"server exited with {proc.wait()}:\n{sp.log()}")
    return sp


def make_api_key(cwd: Path, *, tier: str = "enterprise", admin: bool = True, name: str = "test-admin") -> str:
    """A new API key in the default key store of a server started in ``cwd`` (``sqlite:///<cwd>/credscope.db``)."""
    import asyncio

    from server.auth import keys
    from server.auth.store import open_key_store

    async def make() -> str:
        store = await open_key_store(f"sqlite:///{cwd / 'credscope.db'}")
        try:
            record, api_key = keys.generate(name, tier, admin)  # type: ignore[arg-type]
            await store.create(record)
        finally:
            await store.close()
        return api_key

    return asyncio.run(make())


def two_version_store(model_dir: Path, store: Path, *, seed: int, rows: int = 8_000,
                      n_estimators: int = 30) -> tuple[Path, str, str]:
    """A model store in ``store`` holding the session model (ACTIVE) and a second, small version trained
    with ``seed`` (not activated): (store, first, second)."""
    import shutil

    from server.model import active_version
    from tools.train import train

    first = active_version(model_dir)
    assert first
    shutil.copytree(model_dir / first, store / first)
    (store / "ACTIVE").write_text(first)
    second = train(model_dir=store, rows=rows, seed=seed, n_estimators=n_estimators, quiet=True,
                   activate=False).version
    assert second != first and active_version(store) == first
    return store, first, second
