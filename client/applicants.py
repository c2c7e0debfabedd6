"""Build ``Applicant`` messages from mappings (JSON objects, CSV rows).

Keys may be the proto field names (``amt_credit``) or the Home Credit column names (``AMT_CREDIT``);
other keys (``SK_ID_CURR``, ``TARGET``, ``CODE_GENDER``…) are ignored. Categorical values may be the
Home Credit strings (``"Cash loans"``), the enum names (``CONTRACT_TYPE_CASH_LOANS``) or their numbers;
flags take ``Y``/``N``, true/false or 1/0. Empty strings and nulls mean missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from credscope.v1 import applicant_pb2
from server.schema import BY_FIELD, BY_NAME, Column

_ENUMS = {f.name: f.enum_type for f in applicant_pb2.Applicant.DESCRIPTOR.fields if f.enum_type is not None}
_INT_FIELDS = {f.name for f in applicant_pb2.Applicant.DESCRIPTOR.fields
               if f.type in (f.TYPE_INT32, f.TYPE_INT64)}
_TRUE = {"y", "yes", "true", "1", "t"}
_FALSE = {"n", "no", "false", "0", "f"}


class ApplicantFormatError(ValueError):
    """A value that cannot be put in an Applicant; the message names the field."""


def _column(key: str) -> Column | None:
    return BY_FIELD.get(key) or BY_NAME.get(key) or BY_NAME.get(key.upper())


def _enum_value(col: Column, value: Any) -> int:
    enum = _ENUMS[col.field]
    if isinstance(value, bool):
        raise ApplicantFormatError(f"{col.field}: expected a category, got {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if text in col.categories:
        return col.categories.index(text) + 1
    if text in enum.values_by_name:
        return enum.values_by_name[text].number
    names = ", ".join(repr(c) for c in col.categories)
    raise ApplicantFormatError(f"{col.field}: unknown category {text!r}; expected one of {names}")


def _flag(col: Column, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ApplicantFormatError(f"{col.field}: expected Y/N or true/false, got {value!r}")


def _number(col: Column, value: Any) -> float | int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ApplicantFormatError(f"{col.field}: expected a number, got {value!r}") from None
    if col.field in _INT_FIELDS:
        if not number.is_integer():
            raise ApplicantFormatError(f"{col.field}: expected a whole number, got {value!r}")
        if abs(number) >= 2**31:
            raise ApplicantFormatError(f"{col.field}: {value!r} is out of range")
        return int(number)
    return number


def applicant_from_mapping(data: Mapping[str, Any]) -> applicant_pb2.Applicant:
    """Make an Applicant from a mapping of field or column names to values."""
    applicant = applicant_pb2.Applicant()
    for key, value in data.items():
        col = _column(key)
        if col is None or value is None or (isinstance(value, str) and value.strip() == ""):
            continue
        if col.kind == "categorical":
            setattr(applicant, col.field, _enum_value(col, value))
        elif col.kind == "flag":
            setattr(applicant, col.field, _flag(col, value))
        else:
            setattr(applicant, col.field, _number(col, value))
    return applicant
