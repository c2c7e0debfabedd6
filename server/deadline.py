"""Deadlines: a call whose deadline has passed is not scored.

grpc.aio cancels a handler when its deadline passes, but only at the handler's next ``await``; CPU work
that runs without one (validating a large batch, a cache hit path that never suspends) would go on to
run the model for a caller who has given up. :func:`check` runs before scoring and before the
explanation step and ends the call with DEADLINE_EXCEEDED instead, counted in
``credscope_deadline_expired_total{stage}``.
"""

from __future__ import annotations

from typing import Literal

import grpc

from server import metrics
from server.errors import DeadlineExceeded

Stage = Literal["scoring", "explanation"]


def expired(context: grpc.aio.ServicerContext) -> bool:
    """Whether the call had a deadline and it has passed."""
    try:
        remaining = context.time_remaining()
    except Exception:  # noqa: BLE001 - a context without deadline support: nothing to check
        return False
    return remaining is not None and remaining <= 0


def check(context: grpc.aio.ServicerContext, stage: Stage) -> None:
    """Raise :class:`DeadlineExceeded` (and count it) when the call's deadline has passed."""
    if expired(context):
        metrics.deadline_expired(stage)
        raise DeadlineExceeded(f"the call's deadline passed before {stage}; nothing was "
                               f"{'scored' if stage == 'scoring' else 'explained'}: send a longer deadline "
                               "or a smaller batch")
