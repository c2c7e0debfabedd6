"""Converters between the protobuf API and the scoring domain (no grpc here, only messages)."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
from google.protobuf import timestamp_pb2

from credscope.v1 import applicant_pb2, scoring_pb2
from server.errors import InvalidArgument, Violation
from server.explain import DEFAULT_TOP_K, Explanation
from server.schema import COLUMNS, Column
from server.scoring import ScoreResult

DECISION = {name: scoring_pb2.Decision.Value(f"DECISION_{name}") for name in ("APPROVE", "REVIEW", "REJECT")}
RISK_LEVEL = {name: scoring_pb2.RiskLevel.Value(f"RISK_LEVEL_{name}")
              for name in ("VERY_LOW", "LOW", "MEDIUM", "HIGH", "VERY_HIGH")}
DECISION_NAME = {v: k for k, v in DECISION.items()}

_PRESENCE = {f.name for f in applicant_pb2.Applicant.DESCRIPTOR.fields if f.has_presence}


def _spec(col: Column) -> tuple[str, str, bool, Column]:
    return col.field, col.kind, col.field in _PRESENCE, col


_SPECS = tuple(_spec(c) for c in COLUMNS)
NAN = math.nan
_BIG = sys.float_info.max


def _fast_range(col: Column) -> tuple[float, float]:
    """A range inside which every value is valid for ``col`` (finite, within bounds): the common case
    takes one chained comparison; anything outside (NaN, infinities, special codes, errors) goes to
    :meth:`Column.check`, which has the last word and the message."""
    if col.kind == "categorical":
        return 0.0, float(len(col.categories) - 1)
    if col.kind == "flag":
        return 0.0, 1.0
    lo = -_BIG if col.minimum is None else float(col.minimum)
    if col.minimum is not None and col.exclusive_minimum:
        lo = math.nextafter(lo, math.inf)
    return lo, _BIG if col.maximum is None else float(col.maximum)


#: field descriptor -> (column index, categorical?, implicit-presence number?, fast range low, high, column)
_BY_FIELD = {applicant_pb2.Applicant.DESCRIPTOR.fields_by_name[field]: (
    i, kind == "categorical", not has_presence and kind != "categorical", *_fast_range(col), col)
    for i, (field, kind, has_presence, col) in enumerate(_SPECS)}
#: Required columns without field presence: their zero value means "missing".
_REQUIRED_IMPLICIT = tuple((i, field, col) for i, (field, kind, has_presence, col) in enumerate(_SPECS)
                           if not has_presence and kind != "categorical" and col.required)
_MISSING_ROW = [NAN] * len(COLUMNS)


def applicant_to_row(applicant: applicant_pb2.Applicant, path: str = "applicant") -> tuple[list[float], list[Violation]]:
    """Encode an applicant as the model's raw input row (NaN for missing) and list every invalid field.

    Walks only the fields that are set (``ListFields``, one C call) over a row of NaN: unset optional
    fields and enums at ``*_UNSPECIFIED`` stay missing; a required field at its zero value is missing
    and reported. Violations come in schema order."""
    row = _MISSING_ROW.copy()
    bad: list[tuple[int, Violation]] | None = None
    for fd, raw in applicant.ListFields():
        i, categorical, implicit, lo, hi, col = _BY_FIELD[fd]
        if implicit and raw == 0:  # -0.0: proto3 may send it, but it is the zero value (missing)
            continue
        value = float(raw - 1) if categorical else float(raw)
        if not lo <= value <= hi:
            problem = col.check(value)
            if problem:
                if bad is None:
                    bad = []
                bad.append((i, Violation(f"{path}.{fd.name}", problem)))
        row[i] = value
    for i, field, col in _REQUIRED_IMPLICIT:
        if getattr(applicant, field) == 0:
            if bad is None:
                bad = []
            bad.append((i, Violation(f"{path}.{field}", f"is required: {col.description}")))
    if bad is None:
        return row, []
    bad.sort(key=lambda t: t[0])
    return row, [v for _, v in bad]


def timestamp(now: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(now * 1e9))
    return ts


def fill_prediction(msg: Any, result: ScoreResult, request_id: str, from_cache: bool) -> None:
    """Fill the prediction fields shared by ScoreResponse and Prediction."""
    msg.default_probability = result.probability
    msg.decision = DECISION[result.decision]
    msg.risk_level = RISK_LEVEL[result.risk_level]
    msg.confidence = result.confidence
    msg.model_version = result.model_version
    msg.request_id = request_id
    msg.from_cache = from_cache


def rows_to_matrix(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(COLUMNS))


def explain_top_k(options: scoring_pb2.ExplainOptions, n_features: int, path: str = "explain") -> int | None:
    """How many contributions the caller wants (``None``: no explanation); 0 means
    :data:`~server.explain.DEFAULT_TOP_K`. More than the model's features is INVALID_ARGUMENT."""
    if not options.enabled:
        return None
    if options.top_k > n_features:
        raise InvalidArgument(f"{path}.top_k is over the model's {n_features} features", [
            Violation(f"{path}.top_k", f"ask for 1 to {n_features} contributions (0 means {DEFAULT_TOP_K})")])
    return options.top_k or min(DEFAULT_TOP_K, n_features)


def fill_explanation(msg: scoring_pb2.Explanation, explanation: Explanation) -> None:
    """Fill an Explanation message with the contributions held (slice with ``Explanation.top`` first)."""
    msg.base_value = explanation.base_value
    for c in explanation.contributions:
        item = msg.contributions.add(feature=c.feature, shap_value=c.shap_value, direction=(
            scoring_pb2.DIRECTION_INCREASES_RISK if c.increases_risk else scoring_pb2.DIRECTION_DECREASES_RISK))
        if c.value is not None:
            item.value = c.value
