"""Worker processes: N grpc.aio servers sharing one port (SO_REUSEPORT), supervised by one parent.

``credscope-server --workers N`` (default: the host's cores) forks N workers; each runs its own
:class:`~server.app.CredScopeServer` (its own event loop, its own onnxruntime session with one intra-op
thread) bound to the same host:port with ``grpc.so_reuseport=1``. The kernel spreads *connections* (not
calls) over the workers, so a client that wants several cores opens several channels; load balancers
and the bench's load generator do.

The parent does no gRPC work (forking after gRPC has started threads is unsafe, so it never creates a
channel or server). It

* picks the port when ``--port 0``: it binds a socket with SO_REUSEPORT to an ephemeral port, keeps it
  (bound, not listening, so it receives no connection) until every worker listens, then closes it;
* prints the one ``CredScope listening on HOST:PORT`` line once every worker serves;
* forwards SIGTERM and SIGINT to the workers, which drain (NOT_SERVING + UNAVAILABLE for the drain
  period, then the grace period for calls in flight), and waits for them;
* has every worker ask Linux for a SIGTERM if the parent dies (``PR_SET_PDEATHSIG``), so that a
  SIGKILLed parent leaves no orphan serving on the port;
* restarts nothing. A worker that dies while the server runs is logged with its exit code; the parent
  then stops the other workers (gracefully) and exits with status 3, so the process supervisor
  (systemd, Kubernetes, docker's restart policy) sees the failure and restarts the whole server. A
  server that silently runs on fewer workers, or restarts crashing workers in a loop, hides the
  fault; a fresh start of every worker is also the only state the embedded backends are tested in.

Exit status: 0 after a clean stop; the failing worker's status (2 for a missing model, 1 for a bind
error) when a worker fails during start-up; 3 when a worker dies while serving; 1 when a worker fails
to stop cleanly.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.settings import Settings

log = logging.getLogger("credscope.server")

#: Exit status of the parent when a worker died while serving.
EXIT_WORKER_DIED = 3
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: ``run(settings, on_ready)``: serve until a stop signal; return the exit status. ``on_ready(port,
#: version)`` is called once the worker serves (instead of printing the listening line).
RunWorker = Callable[["Settings", Callable[[int, str], None] | None], int]


def default_workers() -> int:
    """The host's cores (the CPUs this process may run on), at least 1 and at most 64."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(64, n))


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket to ``host:port`` (0 = an ephemeral port) so that
    every worker can bind the same port and nobody else takes it in between.

    A given port is first bound *without* SO_REUSEPORT: that fails if anything listens there, even
    another server's SO_REUSEPORT group, which the workers would otherwise silently join."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    family, kind, proto, _, address = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    if port != 0:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent(parent: int) -> None:
    """Ask Linux for a SIGTERM when the parent dies (PR_SET_PDEATHSIG): workers of a parent that was
    SIGKILLed drain and stop instead of serving on, orphaned, on the port."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: orphans are the supervisor's to reap
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(index: int, settings: Settings, run: RunWorker, conn: Connection, reserved_fd: int,
            parent: int) -> None:
    """Body of a worker process (forked)."""
    os.close(reserved_fd)  # the parent's port reservation: the worker's own listening socket takes over
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with_parent(parent)
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter._fmt if handler.formatter else "%(levelname)s %(name)s %(message)s"  # noqa: SLF001
        handler.setFormatter(logging.Formatter((fmt or "%(message)s").replace(
            "%(message)s", f"[worker {index} pid {os.getpid()}] %(message)s")))

    def ready(port: int, version: str) -> None:
        conn.send((port, version))
        conn.close()

    try:
        code = run(settings, ready)
    except KeyboardInterrupt:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit/finalizers inherited from the parent


class _Supervisor:
    def __init__(self, settings: Settings, run: RunWorker, on_exit: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.run = run
        self.on_exit = on_exit
        self.n = settings.server.workers
        self.procs: list[Any] = []
        self.stopping = False

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, self.n)
        self.stopping = True
        for p in self.procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def _signal_all(self, signum: int) -> None:
        for p in self.procs:
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def _join_all(self) -> None:
        """Wait for every worker: drain + grace + a margin, then SIGKILL the stragglers."""
        s = self.settings.server
        deadline = time.monotonic() + s.drain_seconds + s.grace_seconds + 5.0
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                log.error("worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.join(5)
        if self.on_exit is not None:
            for p in self.procs:
                if p.exitcode is not None:
                    try:
                        self.on_exit(p.pid)
                    except Exception:  # noqa: BLE001 - clean-up of a dead worker must not fail the stop
                        log.exception("clean-up after worker pid %d failed", p.pid)

    def _clean(self, p: Any) -> bool:
        return p.exitcode == 0 or (self.stopping and p.exitcode in (-signal.SIGTERM, -signal.SIGINT))

    def serve(self) -> int:
        s = self.settings.server
        ctx = multiprocessing.get_context("fork")
        reserved = reserve_port(s.host, s.port)
        s.port = reserved.getsockname()[1]
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            ready_conns: dict[Connection, int] = {}
            for i in range(self.n):
                parent_end, child_end = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker, args=(i, self.settings, self.run, child_end, reserved.fileno(),
                                                      os.getpid()),
                                name=f"credscope-worker-{i}")
                p.start()
                child_end.close()
                self.procs.append(p)
                ready_conns[parent_end] = i
            version = self._wait_ready(ready_conns)
            reserved.close()
            if version is None:
                self._signal_all(signal.SIGTERM)
                self._join_all()
                if self.stopping:
                    return 0
                failed = [p.exitcode for p in self.procs if p.exitcode and p.exitcode > 0]
                return failed[0] if failed else 1
            print(f"CredScope listening on {s.host}:{s.port} (model {version}, {self.n} workers); "
                  "Ctrl-C or SIGTERM stops it", flush=True)
            return self._supervise()
        finally:
            reserved.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _wait_ready(self, conns: dict[Connection, int]) -> str | None:
        """Wait until every worker serves; None if one exited (or a stop signal came) first."""
        version = None
        pending = dict(conns)
        sentinels = {p.sentinel: p for p in self.procs}
        while pending and not self.stopping:
            for obj in wait([*pending, *sentinels], timeout=1.0):
                if obj in sentinels:
                    p = sentinels[obj]
                    p.join()
                    if not self.stopping:
                        log.error("worker %s (pid %d) exited with status %s during start-up",
                                  p.name, p.pid, p.exitcode)
                    return None
                assert isinstance(obj, Connection)  # what is not a sentinel is a worker's pipe
                try:
                    _port, version = obj.recv()
                except EOFError:
                    continue  # its sentinel reports the exit
                pending.pop(obj)
        return None if self.stopping else version

    def _supervise(self) -> int:
        """Wait for a stop signal or a worker's death; then stop the workers and wait for them."""
        sentinels = {p.sentinel: p for p in self.procs}
        died = None
        while not self.stopping:
            ready = wait(list(sentinels), timeout=1.0)
            if ready and not self.stopping:
                died = sentinels[ready[0]]
                died.join()
                log.error("worker %s (pid %d) died with status %s; stopping the other workers "
                          "(nothing is restarted: let the process supervisor restart the server)",
                          died.name, died.pid, died.exitcode)
                self.stopping = True
                self._signal_all(signal.SIGTERM)
        self._join_all()
        if died is not None:
            return EXIT_WORKER_DIED
        unclean = [p for p in self.procs if not self._clean(p)]
        for p in unclean:
            log.error("worker %s (pid %d) stopped with status %s", p.name, p.pid, p.exitcode)
        return 1 if unclean else 0


def run_workers(settings: Settings, run: RunWorker, on_exit: Callable[[int], None] | None = None) -> int:
    """Run ``settings.server.workers`` worker processes on one port until SIGTERM/SIGINT; the exit status.
    ``on_exit(pid)`` runs in the parent for every worker once it has exited (e.g. to drop its live
    metrics: a SIGKILLed worker cannot)."""
    return _Supervisor(settings, run, on_exit).serve()
