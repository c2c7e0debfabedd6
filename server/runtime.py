"""The serving state of a worker: the active scorer (swappable atomically) and readiness."""

from __future__ import annotations

from server import metrics
from server.errors import Unavailable
from server.model import load_model
from server.scoring import Scorer
from server.settings import Settings


class Runtime:
    """Holds the scorer that answers calls. Replacing ``_scorer`` is one reference assignment, so a
    call sees either the old or the new model, never a mix."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._scorer: Scorer | None = None

    @property
    def ready(self) -> bool:
        return self._scorer is not None

    @property
    def scorer(self) -> Scorer:
        scorer = self._scorer
        if scorer is None:
            raise Unavailable("the model is still loading; retry shortly")
        return scorer

    def load(self, version: str | None = None) -> Scorer:
        """Load a model version (the configured or ACTIVE one by default) and serve it."""
        model = load_model(self.settings.model.model_dir, version or self.settings.model.version,
                           intra_op_threads=self.settings.model.intra_op_threads)
        self._scorer = Scorer(model)
        metrics.model_loaded(model.version)
        return self._scorer
