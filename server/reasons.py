"""Adverse-action reasons: the principal reasons of a REVIEW or REJECT decision, as codes of a versioned
catalogue with a plain-language text, ranked by how much their features raised the risk.

The catalogue ships with the model: ``credscope-train`` writes :data:`DEFAULT_CATALOGUE` into the
metadata of every version (``metadata["reason_catalogue"]``), so a version always gives the reasons it
gave when it made a decision (see ``AdminService.ReplayDecision``). A model trained before the catalogue
existed has none: the server falls back to :data:`DEFAULT_CATALOGUE` and logs it once per version.

A reason's weight for an applicant is the sum of the *positive* SHAP values (log-odds pushed towards
default) of the catalogue group's features, from the TreeSHAP explanation of the same trees. The reasons
are the groups of positive weight, largest first (ties by code), at most :data:`MAX_REASONS`.

Compliance note: the catalogue maps every model feature to a reason, including age and family status,
which the Home Credit data holds; whether such a reason may be given (or the feature used at all) is a
decision for the lender's compliance function, made in this catalogue.

This module imports nothing from grpc.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.explain import Explanation

log = logging.getLogger("credscope.reasons")

MAX_REASONS = 4
#: From this many rows on, :meth:`Catalogue.codes_for` ranks with numpy (per row, plain Python is faster).
_VECTOR_ROWS = 8
ADVERSE_DECISIONS = frozenset({"REVIEW", "REJECT"})

DEFAULT_CATALOGUE: dict[str, Any] = {
    "version": "2026-11-1",
    "reasons": [
        {"code": "EXT_SCORE_LOW", "text": "External credit bureau scores are low.",
         "features": ["EXT_SOURCE_1", "EXT_SOURCE_2", "EXT_SOURCE_3", "EXT_SOURCE_MEAN", "EXT_SOURCE_MIN",
                      "EXT_SOURCE_MAX", "EXT_SOURCE_PROD"]},
        {"code": "PAYMENT_BURDEN_HIGH", "text": "The loan payments are high relative to income.",
         "features": ["AMT_ANNUITY", "ANNUITY_TO_INCOME", "PAYMENT_RATE"]},
        {"code": "HIGH_CREDIT_TO_INCOME", "text": "The amount of credit requested is high relative to income.",
         "features": ["AMT_CREDIT", "CREDIT_TO_INCOME", "AMT_GOODS_PRICE", "CREDIT_TO_GOODS"]},
        {"code": "INCOME_INSUFFICIENT", "text": "Income is insufficient for the amount of credit requested.",
         "features": ["AMT_INCOME_TOTAL", "INCOME_PER_PERSON"]},
        {"code": "SHORT_EMPLOYMENT", "text": "Length of employment is short.",
         "features": ["DAYS_EMPLOYED", "DAYS_EMPLOYED_PERC", "EMPLOYED_YEARS"]},
        {"code": "INCOME_TYPE", "text": "Type or source of income.", "features": ["NAME_INCOME_TYPE"]},
        {"code": "APPLICANT_AGE", "text": "Age of the applicant, as a factor of the scoring model.",
         "features": ["DAYS_BIRTH", "AGE_YEARS"]},
        {"code": "RECENT_DETAILS_CHANGE",
         "text": "Identity document, registration or phone number changed recently.",
         "features": ["DAYS_REGISTRATION", "DAYS_ID_PUBLISH", "DAYS_LAST_PHONE_CHANGE"]},
        {"code": "CREDIT_ENQUIRIES_HIGH", "text": "Number of recent credit bureau enquiries.",
         "features": ["AMT_REQ_CREDIT_BUREAU_YEAR"]},
        {"code": "SOCIAL_CIRCLE_DELINQUENCY", "text": "Delinquencies among the applicant's social circle.",
         "features": ["OBS_30_CNT_SOCIAL_CIRCLE", "DEF_30_CNT_SOCIAL_CIRCLE"]},
        {"code": "REGION_RISK", "text": "Risk rating of the region of residence.",
         "features": ["REGION_RATING_CLIENT", "REGION_RATING_CLIENT_W_CITY", "REGION_POPULATION_RELATIVE"]},
        {"code": "HOUSEHOLD_SIZE", "text": "Number of dependants in the household.",
         "features": ["CNT_CHILDREN", "CNT_FAM_MEMBERS"]},
        {"code": "FAMILY_STATUS", "text": "Family status, as a factor of the scoring model.",
         "features": ["NAME_FAMILY_STATUS"]},
        {"code": "HOUSING_SITUATION", "text": "Housing situation.",
         "features": ["NAME_HOUSING_TYPE", "FLAG_OWN_REALTY"]},
        {"code": "NO_VEHICLE_COLLATERAL", "text": "Vehicle ownership or age of the vehicle.",
         "features": ["FLAG_OWN_CAR", "OWN_CAR_AGE"]},
        {"code": "EDUCATION_LEVEL", "text": "Level of education.", "features": ["NAME_EDUCATION_TYPE"]},
        {"code": "LOAN_PRODUCT", "text": "Type of loan product requested.", "features": ["NAME_CONTRACT_TYPE"]},
    ],
}
"""The catalogue written into new models' metadata (every model feature belongs to exactly one reason)."""


class CatalogueError(ValueError):
    """A reason catalogue is malformed."""


@dataclass(frozen=True)
class Reason:
    code: str
    text: str


@dataclass(frozen=True)
class Catalogue:
    """A versioned mapping of model features to reason codes."""

    version: str
    reasons: tuple[Reason, ...]
    features: tuple[tuple[str, ...], ...]
    """Each reason's features, in catalogue order (aligned with ``reasons``); a feature is in one reason."""
    embedded: bool = True
    """False when the model had no catalogue and this is the server's default."""
    _column_cache: dict[tuple[str, ...], list[list[int]]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def group_of(self) -> dict[str, int]:
        """Feature name -> index of its reason in ``reasons``."""
        return {f: i for i, feats in enumerate(self.features) for f in feats}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, embedded: bool = True) -> Catalogue:
        try:
            version = str(data["version"])
            reasons, features, seen = [], [], set()
            for entry in data["reasons"]:
                reasons.append(Reason(str(entry["code"]), str(entry["text"])))
                features.append(tuple(str(f) for f in entry["features"]))
                for feature in features[-1]:
                    if feature in seen:
                        raise CatalogueError(f"feature {feature} is in two reasons of catalogue {version}")
                    seen.add(feature)
        except (KeyError, TypeError) as e:
            raise CatalogueError(f"malformed reason catalogue: {e!r}") from e
        if len({r.code for r in reasons}) != len(reasons):
            raise CatalogueError(f"catalogue {version} repeats a code")
        return cls(version, tuple(reasons), tuple(features), embedded)

    def weights(self, explanation: Explanation) -> list[float]:
        """Sum of the positive SHAP values of each reason's features (aligned with ``reasons``): the same
        float64 additions in the same (catalogue) order as :meth:`weight_matrix`, so the same bits.

        By name, not through ``_columns``: an explanation's features come in its own rank order, and a
        column map cached per order grew by one entry per explained applicant (~1 KB each, never freed)."""
        shap = dict(zip(explanation.names, explanation.shap_values, strict=True))
        out = []
        for feats in self.features:
            w = 0.0
            for f in feats:
                v = shap.get(f)
                if v is not None:
                    w += v if v > 0.0 or v != v else 0.0  # (a NaN stays NaN, as np.maximum keeps it)
            out.append(w)
        return out

    def weight_matrix(self, phi: np.ndarray, feature_names: Sequence[str]) -> np.ndarray:
        """:meth:`weights` of every row of a SHAP matrix ``[N, len(feature_names)]``: ``[N, len(reasons)]``.

        The sums run in catalogue order, one column at a time, so a row's weights are the same bits
        whichever way (one applicant or a batch, from an :class:`Explanation` or the raw matrix) they are
        computed: near-ties rank the same in a call, its replay and the same applicant in a batch.
        """
        positive = np.maximum(np.asarray(phi, dtype=np.float64).reshape(-1, len(feature_names)), 0.0)
        out = np.zeros((positive.shape[0], len(self.reasons)), dtype=np.float64)
        for g, columns in enumerate(self._columns(tuple(feature_names))):
            for j in columns:
                out[:, g] += positive[:, j]
        return out

    def _columns(self, feature_names: tuple[str, ...]) -> list[list[int]]:
        """For each reason, the positions of its features in ``feature_names`` (catalogue order)."""
        cached = self._column_cache.get(feature_names)
        if cached is None:
            position = {name: j for j, name in enumerate(feature_names)}
            cached = [[position[f] for f in feats if f in position] for feats in self.features]
            self._column_cache[feature_names] = cached
        return cached

    def ranked(self, weights: Sequence[float], limit: int = MAX_REASONS) -> list[Reason]:
        """The principal reasons of one row of weights: positive ones, largest first (ties by code)."""
        order = sorted((i for i, w in enumerate(weights) if w > 0), key=lambda i: (-weights[i], self.reasons[i].code))
        return [self.reasons[i] for i in order[:limit]]

    def reasons_for(self, explanation: Explanation, limit: int = MAX_REASONS) -> list[Reason]:
        """The principal reasons: reasons of positive weight, largest first (ties by code), at most ``limit``."""
        return self.ranked(self.weights(explanation), limit)

    def codes_for(self, phi: np.ndarray, feature_names: Sequence[str], limit: int = MAX_REASONS) -> list[list[str]]:
        """The reason codes of every row of a SHAP matrix (what :meth:`reasons_for` gives row by row).

        From :data:`_VECTOR_ROWS` rows on, ranked with numpy: the reasons put in code order, a stable sort
        of the negated weights (ties stay in code order: :meth:`ranked`'s key), the positive ones kept."""
        weights = self.weight_matrix(phi, feature_names)
        if len(weights) < _VECTOR_ROWS:
            return [[r.code for r in self.ranked(w, limit)] for w in weights.tolist()]
        by_code = sorted(range(len(self.reasons)), key=lambda i: self.reasons[i].code)
        codes = [self.reasons[i].code for i in by_code]
        w = weights[:, by_code]
        order = np.argsort(-w, axis=1, kind="stable")[:, :limit]
        keep = np.take_along_axis(w, order, axis=1) > 0.0
        return [[codes[j] for j, k in zip(row, ok, strict=True) if k]
                for row, ok in zip(order.tolist(), keep.tolist(), strict=True)]

    def by_code(self, code: str) -> Reason | None:
        """The reason of a code of this catalogue."""
        for r in self.reasons:
            if r.code == code:
                return r
        return None


DEFAULT = Catalogue.from_dict(DEFAULT_CATALOGUE, embedded=False)
_by_version: dict[str, Catalogue] = {}


def catalogue_of(metadata: Mapping[str, Any], version: str = "") -> Catalogue:
    """The catalogue a model version ships with (cached per version); the default when it has none (or a
    malformed one), logged once per version."""
    key = version or str(metadata.get("version", ""))
    found = _by_version.get(key)
    if found is not None:
        return found
    data = metadata.get("reason_catalogue")
    if data is None:
        log.warning("model %s has no reason catalogue in its metadata; adverse-action reasons use the "
                    "server's default catalogue %s (retrain with this credscope-train to embed one)", key,
                    DEFAULT.version)
        found = DEFAULT
    else:
        try:
            found = Catalogue.from_dict(data)
        except CatalogueError as e:
            log.error("model %s: %s; adverse-action reasons use the default catalogue %s", key, e, DEFAULT.version)
            found = DEFAULT
    if len(_by_version) > 64:
        _by_version.clear()
    _by_version[key] = found
    return found


def is_adverse(decision: str) -> bool:
    return decision in ADVERSE_DECISIONS


def codes(reasons: Iterable[Reason]) -> list[str]:
    return [r.code for r in reasons]


def fill_reasons(repeated: Any, reasons: Sequence[Reason]) -> None:
    """Append ``AdverseActionReason`` messages to a repeated field."""
    for r in reasons:
        repeated.add(code=r.code, text=r.text)


def adverse_reasons(repeated: Any, scorer: Any, result: Any, explanation: Explanation | None) -> list[str] | None:
    """Fill the reasons of one scored applicant (``repeated``: a ``reasons`` field) and return their codes
    for the audit row: ``[]`` for an approval, None when the decision is adverse but the model cannot be
    explained (no reasons could be computed)."""
    if not is_adverse(result.decision) or explanation is None:
        return adverse_codes(repeated, scorer, result, None)
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    return adverse_codes(repeated, scorer, result, codes(catalogue.reasons_for(explanation)))


def adverse_codes(repeated: Any, scorer: Any, result: Any, reason_codes: Sequence[str] | None) -> list[str] | None:
    """Like :func:`adverse_reasons`, from reason codes already computed (e.g. by ``Scorer.reason_codes``)."""
    if not is_adverse(result.decision):
        return []
    if reason_codes is None:
        return None
    catalogue = catalogue_of(scorer.model.metadata, scorer.version)
    reasons = [r for r in (catalogue.by_code(c) for c in reason_codes) if r is not None]
    fill_reasons(repeated, reasons)
    return codes(reasons)


def needs_explanation(scorer: Any, decision: str) -> bool:
    """Whether an applicant needs an explanation for its reasons (adverse, and the model can explain)."""
    return decision in ADVERSE_DECISIONS and getattr(scorer, "explainer", None) is not None
