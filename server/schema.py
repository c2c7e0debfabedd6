"""The applicant schema: the one list of raw model inputs, shared by training and serving.

Each column is a Home Credit ``application_train.csv`` column. The model's ONNX graph takes one
float32 matrix whose columns are :data:`COLUMNS` in this order; missing values are NaN.

Encoding contract (training, serving and the proto API all follow it):

* ``numeric`` columns are the number itself.
* ``flag`` columns are 1.0 / 0.0 (Home Credit's ``Y`` / ``N``).
* ``categorical`` columns are the index of the value in ``categories``. In the proto API the enum
  value number ``k`` (``k >= 1``) stands for ``categories[k - 1]``; ``0`` (``*_UNSPECIFIED``) means
  missing.

This module imports nothing from grpc, so the training tools, the server and the CLI share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Kind = Literal["numeric", "flag", "categorical"]

#: Home Credit's code in DAYS_EMPLOYED for applicants with no current employment (mostly pensioners).
DAYS_EMPLOYED_UNEMPLOYED = 365243


@dataclass(frozen=True)
class Column:
    """One raw model input."""

    name: str
    """Home Credit column name (upper case), as in ``application_train.csv``."""
    field: str
    """Name of the field in the proto ``Applicant`` message (snake case of ``name``)."""
    kind: Kind
    required: bool = False
    """A required column may not be missing from a request."""
    minimum: float | None = None
    """Smallest valid value (inclusive), if bounded."""
    maximum: float | None = None
    """Largest valid value (inclusive), if bounded."""
    exclusive_minimum: bool = False
    """If true the minimum itself is not valid (e.g. amounts must be > 0)."""
    special: tuple[float, ...] = ()
    """Values accepted although outside [minimum, maximum] (e.g. DAYS_EMPLOYED's 365243 code)."""
    categories: tuple[str, ...] = ()
    """For categorical columns, the Home Credit strings in code order."""
    description: str = ""

    def check(self, value: float) -> str | None:
        """Return why ``value`` is invalid for this column, or None if it is valid."""
        if self.kind == "categorical":
            if not math.isfinite(value) or value != int(value) or not 0 <= value < len(self.categories):
                return f"unknown value; expected one of {len(self.categories)} enum values"
            return None
        if math.isnan(value) or math.isinf(value):
            return "must be a finite number (NaN and infinity are not accepted; leave the field unset if unknown)"
        if self.kind == "flag":
            return None if value in (0.0, 1.0) else f"must be 0 or 1, got {_fmt(value)}"
        if value in self.special:
            return None
        if self.minimum is not None:
            if self.exclusive_minimum and value <= self.minimum:
                return f"must be greater than {_fmt(self.minimum)}, got {_fmt(value)}"
            if value < self.minimum:
                return f"must be at least {_fmt(self.minimum)}, got {_fmt(value)}"
        if self.maximum is not None and value > self.maximum:
            extra = f" (or exactly {_fmt(self.special[0])})" if self.special else ""
            return f"must be at most {_fmt(self.maximum)}{extra}, got {_fmt(value)}"
        return None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


MAX_AMOUNT = 1e9
"""Largest accepted monetary amount (Home Credit's largest income is 1.17e8)."""

COLUMNS: tuple[Column, ...] = (
    Column("NAME_CONTRACT_TYPE", "name_contract_type", "categorical",
           categories=("Cash loans", "Revolving loans"), description="Loan product."),
    Column("FLAG_OWN_CAR", "flag_own_car", "flag", description="Owns a car."),
    Column("FLAG_OWN_REALTY", "flag_own_realty", "flag", description="Owns a house or flat."),
    Column("CNT_CHILDREN", "cnt_children", "numeric", minimum=0, maximum=30, description="Number of children."),
    Column("AMT_INCOME_TOTAL", "amt_income_total", "numeric", required=True, minimum=0,
           exclusive_minimum=True, maximum=MAX_AMOUNT, description="Annual income."),
    Column("AMT_CREDIT", "amt_credit", "numeric", required=True, minimum=0, exclusive_minimum=True,
           maximum=MAX_AMOUNT, description="Credit amount of the loan."),
    Column("AMT_ANNUITY", "amt_annuity", "numeric", minimum=0, exclusive_minimum=True, maximum=MAX_AMOUNT,
           description="Loan annuity (yearly payment)."),
    Column("AMT_GOODS_PRICE", "amt_goods_price", "numeric", minimum=0, exclusive_minimum=True,
           maximum=MAX_AMOUNT, description="Price of the goods the loan is for."),
    Column("NAME_INCOME_TYPE", "name_income_type", "categorical",
           categories=("Working", "Commercial associate", "Pensioner", "State servant", "Unemployed",
                       "Student", "Businessman", "Maternity leave"), description="Income type."),
    Column("NAME_EDUCATION_TYPE", "name_education_type", "categorical",
           categories=("Secondary / secondary special", "Higher education", "Incomplete higher",
                       "Lower secondary", "Academic degree"), description="Highest education."),
    Column("NAME_FAMILY_STATUS", "name_family_status", "categorical",
           categories=("Married", "Single / not married", "Civil marriage", "Separated", "Widow"),
           description="Family status."),
    Column("NAME_HOUSING_TYPE", "name_housing_type", "categorical",
           categories=("House / apartment", "With parents", "Municipal apartment", "Rented apartment",
                       "Office apartment", "Co-op apartment"), description="Housing situation."),
    Column("REGION_POPULATION_RELATIVE", "region_population_relative", "numeric", minimum=0, maximum=1,
           description="Normalised population of the applicant's region."),
    Column("DAYS_BIRTH", "days_birth", "numeric", required=True, minimum=-36525, maximum=-6574,
           description="Age in days relative to the application (negative; 18 to 100 years)."),
    Column("DAYS_EMPLOYED", "days_employed", "numeric", minimum=-36525, maximum=0,
           special=(DAYS_EMPLOYED_UNEMPLOYED,),
           description="Days since current employment started (negative); 365243 = not employed."),
    Column("DAYS_REGISTRATION", "days_registration", "numeric", minimum=-36525, maximum=0,
           description="Days since the registration changed (negative)."),
    Column("DAYS_ID_PUBLISH", "days_id_publish", "numeric", minimum=-36525, maximum=0,
           description="Days since the identity document was issued (negative)."),
    Column("DAYS_LAST_PHONE_CHANGE", "days_last_phone_change", "numeric", minimum=-36525, maximum=0,
           description="Days since the phone number changed (negative)."),
    Column("OWN_CAR_AGE", "own_car_age", "numeric", minimum=0, maximum=100, description="Age of the car in years."),
    Column("CNT_FAM_MEMBERS", "cnt_fam_members", "numeric", minimum=1, maximum=40,
           description="Number of family members."),
    Column("REGION_RATING_CLIENT", "region_rating_client", "numeric", minimum=1, maximum=3,
           description="Rating of the region (1 best, 3 worst)."),
    Column("REGION_RATING_CLIENT_W_CITY", "region_rating_client_w_city", "numeric", minimum=1, maximum=3,
           description="Rating of the region with the city taken into account."),
    Column("EXT_SOURCE_1", "ext_source_1", "numeric", minimum=0, maximum=1,
           description="Normalised score from external source 1."),
    Column("EXT_SOURCE_2", "ext_source_2", "numeric", minimum=0, maximum=1,
           description="Normalised score from external source 2."),
    Column("EXT_SOURCE_3", "ext_source_3", "numeric", minimum=0, maximum=1,
           description="Normalised score from external source 3."),
    Column("OBS_30_CNT_SOCIAL_CIRCLE", "obs_30_cnt_social_circle", "numeric", minimum=0, maximum=1000,
           description="Observations of the social circle with 30 days past due."),
    Column("DEF_30_CNT_SOCIAL_CIRCLE", "def_30_cnt_social_circle", "numeric", minimum=0, maximum=1000,
           description="Defaults in the social circle with 30 days past due."),
    Column("AMT_REQ_CREDIT_BUREAU_YEAR", "amt_req_credit_bureau_year", "numeric", minimum=0, maximum=1000,
           description="Credit bureau enquiries in the year before the application."),
)

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
BY_FIELD: dict[str, Column] = {c.field: c for c in COLUMNS}
BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}

#: Engineered features computed inside the ONNX graph, appended after the raw columns.
ENGINEERED: tuple[str, ...] = (
    "EXT_SOURCE_MEAN",
    "EXT_SOURCE_MIN",
    "EXT_SOURCE_MAX",
    "EXT_SOURCE_PROD",
    "PAYMENT_RATE",
    "CREDIT_TO_INCOME",
    "ANNUITY_TO_INCOME",
    "CREDIT_TO_GOODS",
    "DAYS_EMPLOYED_PERC",
    "INCOME_PER_PERSON",
    "AGE_YEARS",
    "EMPLOYED_YEARS",
)

#: Every feature the tree ensemble sees, in order: raw columns then engineered ones.
MODEL_FEATURES: tuple[str, ...] = COLUMN_NAMES + ENGINEERED
