"""Brute-force slowing: failed authentications are counted per client address, and an address that fails
too often is refused for a while without its key being checked.

A sliding window per address (the IP, not the port: ``ipv4:10.1.2.3``): the times of its last
``auth.failed_auth_limit`` failures. Once that many fall within ``auth.failed_auth_window_seconds``, every
call from the address gets RESOURCE_EXHAUSTED (ErrorInfo reason ``AUTH_THROTTLED``, ``QuotaFailure`` on
``clientip:<address>``, ``RetryInfo`` = when the oldest of those failures leaves the window) until then; a
refused call is not checked, so a guess made meanwhile can neither succeed nor tell the caller anything,
and guessing is held to ``limit`` keys per window per address. Valid keys sent from the same address are
refused too while it is throttled (an attacker behind the same NAT can lock its neighbours out for one
window; set the limit with that in mind, or 0 to turn this off).

Each time an address reaches the limit the worker logs it (the address, never a key). The table is per
worker process and bounded (``auth.failed_auth_max_peers`` addresses, least recently
failed dropped first), so a flood of addresses costs bounded memory. Counted in
``credscope_auth_failures_total{reason}`` and ``credscope_auth_throttled_total`` (no per-address labels).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from server import metrics
from server.errors import CredScopeError, RateLimited, Unauthenticated
from server.settings import AuthSettings

log = logging.getLogger("credscope.auth")


class AuthThrottled(RateLimited):
    reason = "AUTH_THROTTLED"


class FailedAuthThrottle:
    def __init__(self, limit: int, window_seconds: float, *, max_peers: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window_seconds
        self.max_peers = max_peers
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> FailedAuthThrottle:
        return cls(auth.failed_auth_limit, auth.failed_auth_window_seconds, max_peers=auth.failed_auth_max_peers)

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def rejected(self, peer: str, method: str, error: CredScopeError) -> None:
        """The auth interceptor's ``on_reject`` hook: count the refusal; failed authentications
        (UNAUTHENTICATED, not a missing admin flag) count against ``peer``."""
        metrics.auth_failed(error.reason)
        if isinstance(error, Unauthenticated):
            self.failed(peer)

    def failed(self, peer: str) -> None:
        if not self.enabled:
            return
        times = self._failures.get(peer)
        if times is None:
            times = self._failures[peer] = deque(maxlen=self.limit)
            while len(self._failures) > self.max_peers:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(peer)
        now = self.clock()
        times.append(now)
        if len(times) == self.limit and now - times[0] < self.window:
            log.warning("client address %s failed authentication %d times within %gs: its calls are refused "
                        "for %.0fs", peer, self.limit, self.window, times[0] + self.window - now)

    def retry_after(self, peer: str) -> float:
        """Seconds until ``peer`` may be checked again (0: not throttled)."""
        times = self._failures.get(peer)
        if times is None or len(times) < self.limit:
            return 0.0
        wait = times[0] + self.window - self.clock()
        if wait <= 0:
            return 0.0
        return wait

    def check(self, peer: str) -> None:
        """Raise :class:`AuthThrottled` (and count it) while ``peer`` is throttled."""
        if not self.enabled:
            return
        wait = self.retry_after(peer)
        if wait > 0:
            metrics.auth_throttled()
            raise AuthThrottled(
                f"too many failed authentications from this address: {self.limit} within "
                f"{self.window:g}s; calls from it are refused for {math.ceil(wait)}s more",
                subject=f"clientip:{peer.split(':', 1)[-1]}", retry_after_seconds=wait,
                limit_description=f"at most {self.limit} failed authentications per {self.window:g}s per address")

    def __len__(self) -> int:
        return len(self._failures)
