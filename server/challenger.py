"""Champion/challenger: a challenger model version scores a deterministic share of applicants in shadow.

The champion's answer is the one returned. After the response is built, the servicer offers the scored
rows to :meth:`Challenger.offer`, which keeps the sampled ones (a hash of the per-applicant request id,
so a replay samples the same applicants) and puts them on a bounded queue without waiting; a full queue
drops them and counts (``credscope_challenger_dropped_total``). One background task per worker runs
the challenger model off the event loop and writes ``challenger_predictions`` rows through the audit
store (idempotent by request id). The challenger never delays or fails a champion call.

:func:`compare` turns (champion, challenger, outcome) rows into the GetStats / ROI comparison.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from server import metrics
from server.audit.store import AuditStore, AuditStoreError
from server.model import ModelArtifact, load_model
from server.policy import Policy
from server.schema import COLUMNS
from server.settings import Settings

log = logging.getLogger("credscope.challenger")


def sampled(request_id: str, share: float) -> bool:
    """Whether the challenger scores this applicant: a stable hash of the request id below ``share``."""
    if share >= 1.0:
        return True
    if share <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big")
    return h / 2.0**64 < share


class Challenger:
    """One worker's shadow scorer: the challenger model, a bounded queue and the task draining it."""

    def __init__(self, settings: Settings, store: AuditStore) -> None:
        m = settings.model
        assert m.challenger_version
        self.version = m.challenger_version
        self.share = m.challenger_share
        self.store = store
        self.model: ModelArtifact = load_model(m.model_dir, m.challenger_version, intra_op_threads=m.intra_op_threads)
        self.policy = Policy.from_metadata(self.model.metadata.get("policy"))
        self.model.predict_proba(np.full((1, len(COLUMNS)), math.nan, dtype=np.float32))  # warm up
        self.queue: asyncio.Queue[tuple[list[str], np.ndarray]] = asyncio.Queue(m.challenger_queue_size)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="challenger")

    def offer(self, request_ids: list[str], matrix: np.ndarray) -> None:
        """Queue the sampled applicants of a scored call (never waits, never raises)."""
        try:
            keep = [j for j, rid in enumerate(request_ids) if sampled(rid, self.share)]
            if not keep:
                return
            item = ([request_ids[j] for j in keep], matrix if len(keep) == len(request_ids) else matrix[keep])
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            metrics.CHALLENGER_DROPPED.labels("queue_full").inc(len(keep))
        except Exception:  # noqa: BLE001 - the shadow must never fail the champion call
            log.exception("challenger: cannot queue applicants")

    async def _run(self) -> None:
        while True:
            ids, matrix = await self.queue.get()
            try:
                probs = await asyncio.to_thread(self.model.predict_proba, matrix)
                now = datetime.now(UTC)
                rows = [(rid, now, self.version, float(p), self.policy.decide(float(p))[0])
                        for rid, p in zip(ids, probs, strict=True)]
                await self.store.write_challenger(rows)
                metrics.CHALLENGER_SCORED.inc(len(rows))
            except asyncio.CancelledError:
                raise
            except AuditStoreError as e:
                metrics.CHALLENGER_DROPPED.labels("error").inc(len(ids))
                log.warning("challenger: %d row(s) not recorded: %s", len(ids), e)
            except Exception:  # noqa: BLE001 - keep shadowing the next calls
                metrics.CHALLENGER_DROPPED.labels("error").inc(len(ids))
                log.exception("challenger: scoring failed")
            finally:
                self.queue.task_done()

    async def drain(self, within: float = 5.0) -> None:
        """Wait (up to ``within`` seconds) until every queued applicant is scored and recorded."""
        try:
            await asyncio.wait_for(self.queue.join(), within)
        except TimeoutError:
            pass

    async def close(self, within: float = 5.0) -> None:
        await self.drain(within)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# --- comparison -----------------------------------------------------------------------------------

@dataclass
class Comparison:
    challenger_version: str
    compared: int
    agreement_rate: float
    approval_rate_difference: float
    """Challenger approval rate minus champion approval rate."""
    champion_auc: float | None
    challenger_auc: float | None
    with_outcomes: int


def auc(probs: list[float], defaulted: list[bool]) -> float | None:
    """ROC-AUC (Mann-Whitney, ties counted half); None unless both classes are present."""
    pos = sum(defaulted)
    neg = len(defaulted) - pos
    if pos == 0 or neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(np.asarray(probs, dtype=np.float64))
    rank_sum = float(sum(r for r, d in zip(ranks, defaulted, strict=True) if d))
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def compare(rows: list[tuple[Any, ...]]) -> Comparison | None:
    """The comparison over rows of (champion probability, champion decision, challenger version, challenger
    probability, challenger decision, defaulted or None), restricted to the most frequent challenger
    version; None when there are no rows."""
    if not rows:
        return None
    version = Counter(r[2] for r in rows).most_common(1)[0][0]
    rows = [r for r in rows if r[2] == version]
    n = len(rows)
    agree = sum(r[1] == r[4] for r in rows)
    approvals = sum(r[4] == "APPROVE" for r in rows) - sum(r[1] == "APPROVE" for r in rows)
    known = [r for r in rows if r[5] is not None]
    outcomes = [bool(r[5]) for r in known]
    return Comparison(version, n, agree / n, approvals / n, auc([float(r[0]) for r in known], outcomes),
                      auc([float(r[3]) for r in known], outcomes), len(known))
