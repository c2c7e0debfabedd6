"""The serving state of a worker: the active scorer (hot-swappable) and readiness.

A call reads ``runtime.scorer`` once and uses that object to the end, so a model switch never gives
a call a mix of versions: calls that started before the switch finish on the old model, later ones
run on the new one. Switching is one reference assignment after the new model is loaded and warmed.

Workers follow the store's ACTIVE file (polled every ``model.watch_seconds``), so an
``AdminService.ActivateModel`` call that reaches one worker — it writes ACTIVE — reaches them all
within seconds.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math

import numpy as np

from server import metrics
from server.errors import FailedPrecondition, NotFound, Unavailable
from server.model import ModelError, ModelNotFoundError, active_version, load_model, set_active
from server.schema import COLUMNS
from server.scoring import Scorer
from server.settings import Settings

log = logging.getLogger("credscope.server")


def freeze_heap(collect: bool) -> None:
    """Move every object alive now (modules, the model, its metadata and explainer) out of the cyclic
    garbage collector's reach (:func:`gc.freeze`), so that its full collections stop walking them: with
    them, a generation-2 collection paused the worker's event loop for 60–120 ms every few thousand calls
    (the tail of the Score latency). ``collect`` first frees what is already garbage (at start, before
    serving; not on a model switch, where a full collection would be such a pause)."""
    if collect:
        gc.collect()
    gc.freeze()


class Runtime:
    """Holds the scorer that answers calls."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._scorer: Scorer | None = None
        self._switch = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._scorer is not None

    @property
    def scorer(self) -> Scorer:
        scorer = self._scorer
        if scorer is None:
            raise Unavailable("the model is still loading; retry shortly")
        return scorer

    def _load(self, version: str | None) -> Scorer:
        model = load_model(self.settings.model.model_dir, version,
                           intra_op_threads=self.settings.model.intra_op_threads,
                           batch_intra_op_threads=self.settings.model.batch_intra_op_threads)
        scorer = Scorer(model)
        model.predict_proba(np.full((1, len(COLUMNS)), math.nan, dtype=np.float32))  # warm up (not a prediction)
        return scorer

    def _serve(self, scorer: Scorer) -> None:
        first = self._scorer is None
        self._scorer = scorer
        metrics.model_loaded(scorer.version)
        freeze_heap(collect=first)

    def load(self, version: str | None = None) -> Scorer:
        """Load a model version (the configured or ACTIVE one by default) and serve it."""
        self._serve(self._load(version or self.settings.model.version))
        return self.scorer

    async def activate(self, version: str) -> tuple[str, str]:
        """Serve ``version`` from the store and make it the store's ACTIVE one; return (previous, new)."""
        async with self._switch:
            previous = self._scorer.version if self._scorer else ""
            try:
                scorer = self._scorer if self._scorer is not None and previous == version else await asyncio.to_thread(self._load, version)
            except ModelNotFoundError as e:
                raise NotFound(f"model version {version!r} is not in the model store") from e
            except ModelError as e:
                raise FailedPrecondition(f"model version {version!r} cannot be served: {e}") from e
            set_active(self.settings.model.model_dir, version)
            self._serve(scorer)
        if previous != version:
            log.info("model switched from %s to %s", previous or "-", version)
        return previous, version

    async def watch(self) -> None:
        """Follow the store's ACTIVE file (unless a version is pinned by settings); runs until cancelled."""
        interval = self.settings.model.watch_seconds
        if interval <= 0 or self.settings.model.version:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                wanted = active_version(self.settings.model.model_dir)
                current = self._scorer.version if self._scorer else None
                if wanted and wanted != current and not self._switch.locked():
                    async with self._switch:
                        scorer = await asyncio.to_thread(self._load, wanted)
                        self._serve(scorer)
                    log.info("model switched from %s to %s (store ACTIVE changed)", current, wanted)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a bad store must not stop the worker
                log.error("cannot follow the model store's ACTIVE version: %s", e)
