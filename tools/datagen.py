"""Synthetic training data shaped like Home Credit's ``application_train.csv``.

No dataset can be downloaded where CredScope is built, so this module makes one. The frame has
``SK_ID_CURR``, ``TARGET`` and every column of :data:`server.schema.COLUMNS`, with Home Credit's
column names and value conventions (``"Cash loans"``, ``"Y"``/``"N"``, negative ``DAYS_*``, the
365243 code in ``DAYS_EMPLOYED``, missing values as NaN).

Marginals (close to the real file's)
------------------------------------
* ``NAME_INCOME_TYPE``: Working 52 %, Commercial associate 23 %, Pensioner 18 %, State servant 7 %,
  a few dozen per 300k of Unemployed / Student / Businessman / Maternity leave.
* ``DAYS_EMPLOYED`` is 365243 for (almost all) pensioners and every unemployed applicant (~18 %);
  otherwise ``-days`` with an exponential length of service (median ~4.5 years) capped by age.
* ``DAYS_BIRTH`` in about -25200..-7500 (ages 20.5-69, pensioners mostly over 50), mean age ~44.
* ``AMT_INCOME_TOTAL`` log-normal, median ~147k (rounded like the real amounts);
  ``AMT_GOODS_PRICE`` log-normal (median ~450k), ``AMT_CREDIT`` = goods price x a markup of 1.0-1.3
  (median ~510k); ``AMT_ANNUITY`` from an annuity formula over a term of 6-60 months and a yearly
  rate of 10-35 % (median ~25k). Revolving loans (~10 %) have round limits, goods price = credit,
  annuity = 5 % of the limit.
* ``EXT_SOURCE_1`` / ``_2`` / ``_3``: Beta marginals (mean ~0.5); missing 56 %, 0.2 %, 20 %.
* ``OWN_CAR_AGE`` only for car owners (34 %); ``AMT_REQ_CREDIT_BUREAU_YEAR`` missing 13.5 %;
  the social-circle counts missing 0.3 %; ``CNT_FAM_MEMBERS`` = applicant + partner + children.
* Regions: a fixed table of 81 regions (the same for every seed) with a relative population and
  a rating (1 best .. 3 worst; about 10 % / 74 % / 16 %).

Default mechanism (documented so that the model's job is well defined)
-----------------------------------------------------------------------
Each applicant has an unobserved credit quality ``L ~ N(0, 1)``. The external scores are noisy,
age-related views of it: ``EXT_SOURCE_k = BetaQuantile_k(Phi(a_k * L + b_k * age_z + noise))``.
The social-circle default count is ``Binomial(OBS_30, sigmoid(-2.3 - 0.5 L))``. Then

    logit P(TARGET = 1) = B0 - 1.40 L
        + 0.022 (40 - age)                             younger is riskier
        + 0.55 exp(-years employed / 1.5)              new in the job is riskier
        + 0.6 [unemployed] - 0.1 [pensioner]
        + 0.45 log(0.05 / payment rate)                long terms are riskier
        + 0.25 log(credit / income / 3)
        + 1.2 (annuity / income - 0.18)
        - 0.9 (credit / goods price - 1.1)             insured (marked-up) loans are safer
        + education (lower secondary +0.45, secondary +0.2, incomplete higher +0.1,
                     higher -0.25, academic -0.6)
        + 0.28 (REGION_RATING_CLIENT_W_CITY - 2)
        + 0.3 min(DEF_30_CNT_SOCIAL_CIRCLE, 4)
        + family, housing, car, contract-type, bureau-enquiry and phone/ID-change terms
        + N(0, 0.35) idiosyncratic noise

with ``B0`` set for a default rate of ~8 %. Because ``L`` is only seen through the (partly
missing) external scores, a good model reaches a holdout ROC-AUC of roughly 0.75-0.80, like models
on the real data.

Usage::

    python -m tools.datagen --rows 100000 --seed 42 --out data/application_train.csv
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special, stats

from server.schema import COLUMN_NAMES, DAYS_EMPLOYED_UNEMPLOYED

__all__ = ["generate", "main", "DEFAULT_ROWS", "DEFAULT_SEED"]

DEFAULT_ROWS = 100_000
DEFAULT_SEED = 42

#: Intercept of the default logit, calibrated for a ~8 % default rate.
_B0 = -3.66

_INCOME_TYPES = {
    "Working": 158774, "Commercial associate": 71617, "Pensioner": 55362, "State servant": 21703,
    "Unemployed": 22, "Student": 18, "Businessman": 10, "Maternity leave": 5,
}
_EDUCATION = {
    "Secondary / secondary special": 0.7102, "Higher education": 0.2434, "Incomplete higher": 0.0334,
    "Lower secondary": 0.0124, "Academic degree": 0.0006,
}
_EDUCATION_RISK = {
    "Secondary / secondary special": 0.2, "Higher education": -0.25, "Incomplete higher": 0.1,
    "Lower secondary": 0.45, "Academic degree": -0.6,
}
_FAMILY = {"Married": 0.639, "Single / not married": 0.148, "Civil marriage": 0.097, "Separated": 0.064,
           "Widow": 0.052}
_FAMILY_RISK = {"Married": 0.0, "Single / not married": 0.15, "Civil marriage": 0.15, "Separated": 0.1,
                "Widow": -0.1}
_HOUSING = {"House / apartment": 0.887, "With parents": 0.048, "Municipal apartment": 0.036,
            "Rented apartment": 0.016, "Office apartment": 0.0085, "Co-op apartment": 0.0045}
_HOUSING_RISK = {"House / apartment": 0.0, "With parents": 0.2, "Municipal apartment": 0.1,
                 "Rented apartment": 0.3, "Office apartment": -0.1, "Co-op apartment": 0.0}
_TERMS_MONTHS = np.array([12, 18, 24, 30, 36, 48, 60])
_TERM_WEIGHTS = np.array([0.18, 0.14, 0.20, 0.08, 0.18, 0.12, 0.10])
_REVOLVING_LIMITS = np.array([45000, 67500, 90000, 112500, 135000, 180000, 225000, 270000, 337500,
                              450000, 675000, 900000])


def _regions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed region table: (relative population, rating, sampling weight), same for every seed."""
    rng = np.random.default_rng(2018)
    pop = np.sort(np.round(np.exp(rng.normal(np.log(0.015), 0.75, 81)).clip(0.00029, 0.0725), 6))
    pop[-1] = 0.072508  # the capital
    weight = pop ** 0.4
    weight /= weight.sum()
    rating = np.full(81, 2)
    cum = np.cumsum(weight)
    rating[cum <= 0.16] = 3  # small, poor regions
    rating[cum >= 0.90] = 1  # the big cities
    return pop, rating, weight


def _choice(rng: np.random.Generator, table: Mapping[str, float], n: int) -> np.ndarray:
    names = np.array(list(table), dtype=object)
    p = np.array(list(table.values()), dtype=float)
    return names[rng.choice(len(names), size=n, p=p / p.sum())]


def _beta_from_normal(z: np.ndarray, a: float, b: float) -> np.ndarray:
    """Map a standard normal score to a Beta(a, b) marginal, keeping its rank."""
    return stats.beta.ppf(special.ndtr(z), a, b)


def generate(n_rows: int, seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """Generate ``n_rows`` synthetic applications with a ``TARGET`` column (1 = default).

    The result is a pure function of ``(n_rows, seed)``. Columns: ``SK_ID_CURR``, ``TARGET``, then
    :data:`server.schema.COLUMN_NAMES` in schema order.
    """
    if n_rows <= 0:
        raise ValueError("n_rows must be positive")
    rng = np.random.default_rng(seed)
    n = n_rows

    # --- who: income type, age, employment --------------------------------------------------
    income_type = _choice(rng, _INCOME_TYPES, n)
    pensioner = income_type == "Pensioner"
    unemployed = income_type == "Unemployed"
    age = 20.5 + 44.5 * rng.beta(1.6, 2.0, n)
    age[pensioner] = 45.0 + 24.0 * rng.beta(3.0, 1.6, pensioner.sum())
    student = income_type == "Student"
    age[student] = 20.5 + 9.0 * rng.beta(1.2, 2.5, student.sum())
    days_birth = -np.round(age * 365.25).clip(7489, 25229)
    age = -days_birth / 365.25
    age_z = (age - 44.0) / 12.0

    # employment: pensioners (99.96 %) and the unemployed carry Home Credit's 365243 code
    not_employed = unemployed | (pensioner & (rng.random(n) < 0.9996))
    years_employed = np.minimum(rng.exponential(6.5, n), np.maximum(age - 18.0, 0.1))
    days_employed = -np.floor(years_employed * 365.25).clip(0, None)
    days_employed[not_employed] = DAYS_EMPLOYED_UNEMPLOYED
    years_employed = np.where(not_employed, np.nan, -days_employed / 365.25)

    education = _choice(rng, _EDUCATION, n)
    higher = np.isin(education, ["Higher education", "Academic degree"])
    family = _choice(rng, _FAMILY, n)
    widow_fix = (family == "Widow") & (age < 40) & (rng.random(n) < 0.8)
    family[widow_fix] = "Married"
    housing = _choice(rng, _HOUSING, n)
    parents_fix = (housing == "With parents") & (age > 45) & (rng.random(n) < 0.8)
    housing[parents_fix] = "House / apartment"

    children = rng.choice(5, size=n, p=[0.70, 0.199, 0.087, 0.012, 0.002])
    children[pensioner & (rng.random(n) < 0.9)] = 0
    partner = np.isin(family, ["Married", "Civil marriage"]).astype(float)
    fam_members = 1.0 + partner + children

    own_car = rng.random(n) < np.where(higher, 0.45, 0.30)
    own_realty = rng.random(n) < np.where(pensioner, 0.80, 0.67)
    car_age = np.where(own_car, np.round(rng.gamma(2.0, 6.0, n)).clip(0, 91), np.nan)

    # --- region ----------------------------------------------------------------------------
    pop, rating, weight = _regions()
    region = rng.choice(len(pop), size=n, p=weight)
    region_pop = pop[region]
    rating_client = rating[region].astype(float)
    shift = rng.choice([-1, 0, 1], size=n, p=[0.03, 0.95, 0.02])
    rating_city = np.clip(rating_client + shift, 1, 3)

    # --- money -----------------------------------------------------------------------------
    z_income = rng.standard_normal(n)
    log_income = (np.log(140_000) + 0.50 * z_income + 0.22 * higher - 0.30 * pensioner
                  + 0.10 * (income_type == "Commercial associate") + 0.08 * (region_pop > 0.05))
    income = np.exp(log_income)
    step = np.where(rng.random(n) < 0.5, 22_500.0, 4_500.0)
    income = (np.round(income / step) * step).clip(25_650, 1.17e8)

    revolving = rng.random(n) < 0.095
    z_goods = 0.45 * z_income + np.sqrt(1 - 0.45**2) * rng.standard_normal(n)
    goods = np.exp(np.log(480_000) + 0.60 * z_goods - 0.15 * pensioner)
    goods = (np.round(goods / 4_500) * 4_500).clip(40_500, 4_050_000)
    markup = np.where(rng.random(n) < 0.28, 1.0, rng.uniform(1.04, 1.30, n))
    credit = np.round(goods * markup * 2) / 2
    term = rng.choice(_TERMS_MONTHS, size=n, p=_TERM_WEIGHTS / _TERM_WEIGHTS.sum())
    monthly_rate = rng.uniform(0.10, 0.35, n) / 12
    annuity = np.round(credit * monthly_rate / (1 - (1 + monthly_rate) ** -term) * 2) / 2
    limit = rng.choice(_REVOLVING_LIMITS, size=n)
    credit = np.where(revolving, limit.astype(float), credit)
    goods = np.where(revolving, credit, goods)
    annuity = np.where(revolving, credit * 0.05, annuity)
    goods[revolving & (rng.random(n) < 0.01)] = np.nan  # a few revolving lines without goods

    # --- latent credit quality and the external scores -------------------------------------
    quality = rng.standard_normal(n)
    e1 = 0.50 * quality + 0.55 * age_z + 0.67 * rng.standard_normal(n)
    e2 = 0.66 * quality + 0.10 * age_z + 0.74 * rng.standard_normal(n)
    e3 = 0.66 * quality + 0.25 * age_z + 0.70 * rng.standard_normal(n)
    ext1 = _beta_from_normal(e1 / np.sqrt(0.25 + 0.3025 + 0.4489), 2.3, 2.3)
    ext2 = _beta_from_normal(e2 / np.sqrt(0.4356 + 0.01 + 0.5476), 3.0, 2.6)
    ext3 = _beta_from_normal(e3 / np.sqrt(0.4356 + 0.0625 + 0.49), 3.0, 2.85)
    ext1[rng.random(n) < 0.564] = np.nan
    ext2[rng.random(n) < 0.0021] = np.nan
    ext3[rng.random(n) < 0.198] = np.nan

    # --- behaviour: social circle, bureau, documents ----------------------------------------
    obs30 = rng.negative_binomial(0.5, 0.5 / (0.5 + 1.42), n).clip(0, 348).astype(float)
    def30 = rng.binomial(obs30.astype(int), special.expit(-2.3 - 0.5 * quality)).astype(float)
    circle_missing = rng.random(n) < 0.0033
    obs30[circle_missing] = np.nan
    def30[circle_missing] = np.nan
    bureau = rng.negative_binomial(1.5, 1.5 / (1.5 + 1.9), n).clip(0, 25).astype(float)
    bureau[rng.random(n) < 0.135] = np.nan
    days_registration = -np.floor((age * 365.25 - 6574) * rng.beta(1.4, 1.4, n))
    days_id_publish = -np.floor(np.minimum(rng.gamma(2.6, 1150, n), 7197.0)).clip(0, age * 365.25 - 5110)
    days_phone = np.where(rng.random(n) < 0.12, 0.0, -np.floor(rng.exponential(1080, n).clip(0, 4292)))

    # --- the default mechanism (see the module docstring) -----------------------------------
    payment_rate = annuity / credit
    logit = (_B0 - 1.40 * quality
             + 0.022 * (40.0 - age)
             + np.where(not_employed, 0.0, 0.55 * np.exp(-np.nan_to_num(years_employed) / 1.5))
             + 0.6 * unemployed - 0.1 * pensioner
             + 0.45 * np.log(0.05 / payment_rate)
             + 0.25 * np.log(credit / income / 3.0)
             + 1.2 * (annuity / income - 0.18)
             - 0.9 * (credit / np.where(np.isnan(goods), credit, goods) - 1.1)
             + np.vectorize(_EDUCATION_RISK.get, otypes=[float])(education)
             + np.vectorize(_FAMILY_RISK.get, otypes=[float])(family)
             + np.vectorize(_HOUSING_RISK.get, otypes=[float])(housing)
             + 0.28 * (rating_city - 2.0)
             + 0.3 * np.minimum(np.nan_to_num(def30), 4.0)
             - 0.15 * own_car + 0.01 * np.nan_to_num(car_age)
             - 0.3 * revolving
             + 0.04 * np.minimum(np.nan_to_num(bureau), 10.0)
             + 0.15 * (days_phone > -180) + 0.1 * (days_id_publish > -1000)
             + 0.35 * rng.standard_normal(n))
    target = (rng.random(n) < special.expit(logit)).astype(np.int64)

    yn = np.array(["N", "Y"], dtype=object)
    frame = pd.DataFrame({
        "SK_ID_CURR": np.arange(100002, 100002 + n, dtype=np.int64),
        "TARGET": target,
        "NAME_CONTRACT_TYPE": np.where(revolving, "Revolving loans", "Cash loans").astype(object),
        "FLAG_OWN_CAR": yn[own_car.astype(int)],
        "FLAG_OWN_REALTY": yn[own_realty.astype(int)],
        "CNT_CHILDREN": children.astype(np.int64),
        "AMT_INCOME_TOTAL": income,
        "AMT_CREDIT": credit,
        "AMT_ANNUITY": annuity,
        "AMT_GOODS_PRICE": goods,
        "NAME_INCOME_TYPE": income_type,
        "NAME_EDUCATION_TYPE": education,
        "NAME_FAMILY_STATUS": family,
        "NAME_HOUSING_TYPE": housing,
        "REGION_POPULATION_RELATIVE": region_pop,
        "DAYS_BIRTH": days_birth.astype(np.int64),
        "DAYS_EMPLOYED": days_employed.astype(np.int64),
        "DAYS_REGISTRATION": days_registration,
        "DAYS_ID_PUBLISH": days_id_publish.astype(np.int64),
        "DAYS_LAST_PHONE_CHANGE": days_phone,
        "OWN_CAR_AGE": car_age,
        "CNT_FAM_MEMBERS": fam_members,
        "REGION_RATING_CLIENT": rating_client.astype(np.int64),
        "REGION_RATING_CLIENT_W_CITY": rating_city.astype(np.int64),
        "EXT_SOURCE_1": ext1,
        "EXT_SOURCE_2": ext2,
        "EXT_SOURCE_3": ext3,
        "OBS_30_CNT_SOCIAL_CIRCLE": obs30,
        "DEF_30_CNT_SOCIAL_CIRCLE": def30,
        "AMT_REQ_CREDIT_BUREAU_YEAR": bureau,
    })
    return frame[["SK_ID_CURR", "TARGET", *COLUMN_NAMES]]


def main(argv: list[str] | None = None) -> int:
    """Command line: write a synthetic ``application_train.csv``."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.datagen",
        description="Generate a synthetic training set shaped like Home Credit's application_train.csv.")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="number of applications (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="CSV file to write (default: standard output)")
    args = parser.parse_args(argv)
    if args.rows <= 0:
        parser.error("--rows must be positive")
    frame = generate(args.rows, args.seed)
    if args.out is None:
        frame.to_csv(sys.stdout, index=False)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
        print(f"wrote {len(frame)} rows ({frame['TARGET'].mean():.2%} defaults) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
