"""server.wire: BatchScore's applicants decoded from the wire give exactly applicant_to_row's rows and
violations — on random applicants, and on encodings a protobuf library would not write itself (a field twice,
an explicit zero, unknown fields, a known field in another wire type, 10-byte varints); and its results
encoded for the wire parse to the messages filled one by one."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from credscope.v1 import applicant_pb2, scoring_pb2
from server.convert import DECISION, RISK_LEVEL, applicant_to_row
from server.errors import Violation
from server.schema import COLUMNS
from server.scoring import ScoreResult
from server.services.scoring import _fill_results, _results_bytes
from server.wire import decode_applicants, encode_results
from tests.helpers import ROOT
from tests.test_api import applicant
from tests.test_fuzz import applicants

FIELDS = applicant_pb2.Applicant.DESCRIPTOR.fields_by_name


def expected(request: scoring_pb2.BatchScoreRequest) -> tuple[list[list[float]], list[int], list[tuple[int, list]]]:
    rows, positions, bad = [], [], []
    for i, a in enumerate(request.applicants):
        row, violations = applicant_to_row(a, f"applicants[{i}]")
        if violations:
            bad.append((i, violations))
        else:
            rows.append(row)
            positions.append(i)
    return rows, positions, bad


def assert_same(request: scoring_pb2.BatchScoreRequest) -> None:
    rows, positions, bad = expected(request)
    matrix, got_positions, got_bad = decode_applicants(request)
    assert got_positions == positions
    assert [(i, [(v.field, v.description) for v in vs]) for i, vs in got_bad] == \
           [(i, [(v.field, v.description) for v in vs]) for i, vs in bad]
    assert matrix.dtype == np.float64 and matrix.shape == (len(rows), len(COLUMNS))
    for got, want in zip(matrix.tolist(), rows, strict=True):
        assert [None if math.isnan(v) else v for v in got] == [None if math.isnan(v) else v for v in want]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(applicants(), min_size=1, max_size=12))
def test_random_applicants_decode_like_applicant_to_row(people: list[applicant_pb2.Applicant]) -> None:
    assert_same(scoring_pb2.BatchScoreRequest(applicants=people, request_id="batch-1"))


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes:
    return varint(number << 3 | wire) + payload


def request_of(*applicant_bytes: bytes) -> scoring_pb2.BatchScoreRequest:
    """A request parsed from hand-made bytes, as the server receives it."""
    data = b"".join(field(1, 2, varint(len(b)) + b) for b in applicant_bytes)
    return scoring_pb2.BatchScoreRequest.FromString(data + field(2, 2, varint(3) + b"abc"))


def test_hand_made_encodings_decode_like_applicant_to_row() -> None:
    good = applicant().SerializeToString()
    credit, employed = FIELDS["amt_credit"].number, FIELDS["days_employed"].number
    children, car = FIELDS["cnt_children"].number, FIELDS["flag_own_car"].number
    contract, income = FIELDS["name_contract_type"].number, FIELDS["amt_income_total"].number
    birth = FIELDS["days_birth"].number
    cases = [
        good,
        good + field(credit, 1, struct.pack("<d", 123456.5)),  # a field twice: the last one wins
        good + field(income, 1, struct.pack("<d", 0.0)),  # explicit zero of an implicit field: missing
        good + field(income, 1, struct.pack("<d", -0.0)),
        good + field(children, 0, varint(0)),  # explicit zero of an optional field: present
        good + field(employed, 0, varint(-400)),  # negative int32: a 10-byte varint
        good + field(employed, 0, varint(365243)),  # outside the range, an allowed code
        good + field(employed, 0, varint(400)),  # outside the range: a violation
        good + field(birth, 0, varint(-(2**31))),
        good + field(birth, 0, varint(2**40 - 5)),  # an int32 keeps its low 32 bits
        good + field(car, 0, varint(7)),  # bool: nonzero is true
        good + field(contract, 0, varint(40)),  # an enum value the schema does not know
        good + field(contract, 0, varint(0)),  # enum at UNSPECIFIED: missing (required: a violation)
        good + field(999, 0, varint(5)) + field(998, 1, b"\0" * 8) + field(997, 5, b"\0" * 4)
        + field(996, 2, varint(2) + b"xy"),  # unknown fields are skipped
        good + field(credit, 0, varint(5)),  # a known field in another wire type: protobuf keeps it unknown
        good + field(credit, 5, b"\0\0\x80\x3f"),
        field(credit, 1, struct.pack("<d", float("nan"))) + good,
        good + field(credit, 1, struct.pack("<d", float("inf"))),
        b"",  # an empty applicant: every required field missing
    ]
    assert_same(request_of(*cases))
    for case in cases:
        assert_same(request_of(case))


def test_valid_applicants_never_take_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import server.wire

    def refuse(*args: object) -> None:
        raise AssertionError("a valid applicant went through applicant_to_row")

    monkeypatch.setattr(server.wire, "applicant_to_row", refuse)
    people = [applicant(amt_credit=100_000.0 + i, days_employed=365243 if i % 2 else -100) for i in range(50)]
    matrix, positions, bad = decode_applicants(scoring_pb2.BatchScoreRequest(applicants=people))
    assert positions == list(range(50)) and bad == []
    credit = [c.field for c in COLUMNS].index("amt_credit")
    assert matrix[:, credit].tolist() == [100_000.0 + i for i in range(50)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.sampled_from(sorted(DECISION)), st.sampled_from(sorted(RISK_LEVEL)),
                          st.floats(0.0, 1.0), st.booleans(), st.booleans()), min_size=1, max_size=40),
       st.text(min_size=1, max_size=40))
def test_encoded_results_equal_the_messages_filled_one_by_one(
        rows: list[tuple[float, str, str, float, bool, bool]], request_id: str) -> None:
    """A BatchScore's results encoded for the wire (``encode_results``, errors spliced in request order)
    parse to the same response as ``results.add`` + ``fill_prediction`` message by message: gaps where an
    applicant was refused (first, last, in runs), cache hits, any request id (UTF-8)."""
    n = len(rows)
    refused = {i for i, row in enumerate(rows) if row[5]}
    positions = [i for i in range(n) if i not in refused]
    pairs = [(ScoreResult(p, d, r, c, "6aa597fdac68ae83"), hit) for p, d, r, c, hit, no in rows if not no]
    bad = [(i, [Violation(f"applicants[{i}].age_years", "must be 18 or more")]) for i in sorted(refused)]
    encoded = scoring_pb2.BatchScoreResponse()
    encoded.MergeFromString(_results_bytes(n, positions, pairs, bad, request_id, "6aa597fdac68ae83"))
    filled = scoring_pb2.BatchScoreResponse()
    _fill_results(filled, n, positions, pairs, bad, request_id)
    assert encoded == filled
    assert [r.index for r in encoded.results] == list(range(n))
    for i, r in enumerate(encoded.results):
        assert r.WhichOneof("result") == ("error" if i in refused else "prediction")


def test_encoded_results_at_large_indexes() -> None:
    """Indexes and request ids past one varint byte and a 1,000-applicant batch keep their order and ids."""
    n = 1_000
    positions = list(range(0, n, 2))
    pairs = [(ScoreResult(i / n, "APPROVE", "LOW", 0.5, "v"), i % 3 == 0) for i in positions]
    bad = [(i, [Violation(f"applicants[{i}]", "bad")]) for i in range(1, n, 2)]
    msg = scoring_pb2.BatchScoreResponse()
    msg.MergeFromString(_results_bytes(n, positions, pairs, bad, "r" * 200, "v"))
    assert len(msg.results) == n
    assert msg.results[998].prediction.request_id == "r" * 200 + "/998"
    assert msg.results[998].prediction.default_probability == 0.998
    assert msg.results[999].error.message == "applicant 999 has 1 invalid field(s)"
    assert msg.results[996].prediction.from_cache and not msg.results[998].prediction.from_cache
    with pytest.raises(ValueError, match="uint32"):
        encode_results([-1], [0.5], [1], [1], [0.5], [False], "v", "r")
    with pytest.raises(ValueError, match="one value per position"):
        encode_results([0, 1], [0.5], [1, 1], [1, 1], [0.5, 0.5], [False, False], "v", "r")
    with pytest.raises(ValueError, match="enum numbers"):
        encode_results([0], [0.5], [1], [300], [0.5], [False], "v", "r")
    big = encode_results([2**32 - 1], [0.5], [3], [5], [0.25], [True], "v" * 300, "r" * 128)
    one = scoring_pb2.BatchScoreResponse.FromString(big).results[0]
    assert one.index == 2**32 - 1 and one.prediction.request_id == "r" * 128 + f"/{2**32 - 1}"
    assert one.prediction.model_version == "v" * 300 and one.prediction.from_cache


def test_warm_compiles_both_passes() -> None:
    """``warm`` (run before a worker reports SERVING) leaves both compiled passes ready for the signatures
    BatchScore calls them with (a fresh interpreter: here they are compiled already)."""
    code = textwrap.dedent("""
        from server import wire
        from tests.test_wire import _encoded_once
        assert not wire._decode.signatures and not wire._encode_results.signatures
        wire.warm()
        signatures = (len(wire._decode.signatures), len(wire._encode_results.signatures))
        _encoded_once()
        assert (len(wire._decode.signatures), len(wire._encode_results.signatures)) == signatures == (1, 1)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def _encoded_once() -> None:
    """A BatchScore's decode and encode, as the service calls them."""
    request = scoring_pb2.BatchScoreRequest(applicants=[applicant()])
    encoded, positions, bad = decode_applicants(request)
    pairs = [(ScoreResult(0.5, "REVIEW", "MEDIUM", 0.5, "v"), False)]
    _results_bytes(1, positions, pairs, bad, "r", "v")
