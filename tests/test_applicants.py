"""Building Applicant messages from JSON/CSV mappings (client side)."""

import pytest

from client.applicants import ApplicantFormatError, applicant_from_mapping
from credscope.v1 import applicant_pb2


def test_home_credit_names_strings_and_flags() -> None:
    a = applicant_from_mapping({"AMT_CREDIT": "406597.5", "NAME_CONTRACT_TYPE": "Cash loans", "FLAG_OWN_CAR": "N",
                                "days_birth": "-9461", "EXT_SOURCE_1": "", "CODE_GENDER": "M", "TARGET": "1",
                                "name_income_type": "INCOME_TYPE_PENSIONER", "cnt_children": 2.0})
    assert a.amt_credit == 406597.5
    assert a.name_contract_type == applicant_pb2.CONTRACT_TYPE_CASH_LOANS
    assert a.HasField("flag_own_car") and a.flag_own_car is False
    assert a.days_birth == -9461
    assert not a.HasField("ext_source_1")
    assert a.name_income_type == applicant_pb2.INCOME_TYPE_PENSIONER
    assert a.cnt_children == 2


@pytest.mark.parametrize(("data", "message"), [
    ({"name_contract_type": "Mortgage"}, "unknown category 'Mortgage'"),
    ({"flag_own_car": "maybe"}, "expected Y/N"),
    ({"amt_credit": "lots"}, "expected a number"),
    ({"days_birth": "-9461.5"}, "whole number"),
    ({"days_birth": 1e12}, "out of range"),
])
def test_bad_values_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ApplicantFormatError, match=message):
        applicant_from_mapping(data)
