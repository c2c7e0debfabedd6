"""Tests of the model part: synthetic data, training, ONNX export and the runtime loader.

One small model (20k synthetic rows) is trained once per module in a temporary model store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from server.model import (
    ModelIntegrityError,
    ModelNotFoundError,
    active_version,
    list_versions,
    load_model,
    read_metadata,
)
from server.schema import BY_NAME, COLUMN_NAMES, COLUMNS, DAYS_EMPLOYED_UNEMPLOYED, ENGINEERED, MODEL_FEATURES
from tools import datagen
from tools import train as trainmod
from tools.train import (
    DECISION_POLICY,
    TrainResult,
    build_pipeline,
    encode_frame,
    engineer_features,
    fit_pipeline,
    train,
    version_of,
)

ROWS = 20_000
SEED = 7
PARAMS = {"n_estimators": 150}
IDX = {name: i for i, name in enumerate(COLUMN_NAMES)}
EXT = [IDX[f"EXT_SOURCE_{k}"] for k in (1, 2, 3)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def trained(store: Path) -> TrainResult:
    return train(rows=ROWS, seed=SEED, model_dir=store, params=PARAMS)


def hard_rows(n: int, seed: int) -> np.ndarray:
    """Encoded rows with many missing values and edge cases (not validated, like a careless caller)."""
    rng = np.random.default_rng(seed)
    x = encode_frame(datagen.generate(n, seed))
    groups = np.array_split(rng.permutation(n), 8)
    x[groups[0]] = np.where(rng.random((len(groups[0]), x.shape[1])) < 0.3, np.nan, x[groups[0]])  # any field
    x[np.ix_(groups[1], EXT)] = np.nan  # all EXT_SOURCE missing
    x[groups[2], IDX["DAYS_EMPLOYED"]] = DAYS_EMPLOYED_UNEMPLOYED
    x[np.ix_(groups[3], [IDX["NAME_INCOME_TYPE"], IDX["NAME_FAMILY_STATUS"]])] = np.nan  # unknown categories
    x[groups[4]] = np.nan  # everything missing
    x[groups[5], IDX["AMT_INCOME_TOTAL"]] = 0.0  # division by zero -> inf
    x[groups[5], IDX["CNT_FAM_MEMBERS"]] = 0.0
    x[np.ix_(groups[6], EXT[:2])] = np.nan  # one EXT_SOURCE left
    return x


# ---------------------------------------------------------------------------------------------- datagen

def test_datagen_shape_and_marginals() -> None:
    df = datagen.generate(30_000, seed=3)
    assert list(df.columns) == ["SK_ID_CURR", "TARGET", *COLUMN_NAMES]
    assert df["SK_ID_CURR"].is_unique
    assert 0.065 <= df["TARGET"].mean() <= 0.095
    unemployed = df["DAYS_EMPLOYED"] == DAYS_EMPLOYED_UNEMPLOYED
    assert 0.16 <= unemployed.mean() <= 0.20
    assert df.loc[unemployed, "NAME_INCOME_TYPE"].isin(["Pensioner", "Unemployed"]).all()
    assert (df.loc[df["NAME_INCOME_TYPE"] == "Pensioner", "DAYS_EMPLOYED"] == DAYS_EMPLOYED_UNEMPLOYED).mean() > 0.99
    assert abs(df["EXT_SOURCE_1"].isna().mean() - 0.56) < 0.02
    assert abs(df["EXT_SOURCE_3"].isna().mean() - 0.20) < 0.02
    assert df["EXT_SOURCE_2"].isna().mean() < 0.01
    assert (df["OWN_CAR_AGE"].isna() == (df["FLAG_OWN_CAR"] == "N")).all()
    assert set(df["FLAG_OWN_CAR"]) | set(df["FLAG_OWN_REALTY"]) <= {"Y", "N"}
    for col in COLUMNS:
        if col.kind == "categorical":
            assert set(df[col.name]) <= set(col.categories), col.name
    assert 130_000 <= df["AMT_INCOME_TOTAL"].median() <= 165_000
    assert 440_000 <= df["AMT_CREDIT"].median() <= 580_000
    assert 20_000 <= df["AMT_ANNUITY"].median() <= 30_000
    assert 0.9 <= (df["AMT_GOODS_PRICE"] / df["AMT_CREDIT"]).median() <= 1.0
    assert df["DAYS_BIRTH"].between(-25_229, -7_489).all()
    assert df["Cash loans" == df["NAME_CONTRACT_TYPE"]].shape[0] > 0.85 * len(df)
    # every generated value passes the API's validation
    for col in COLUMNS:
        if col.kind == "numeric":
            values = df[col.name].dropna().to_numpy(dtype=float)
            assert all(col.check(v) is None for v in np.unique(values)), col.name
    # defaults follow the documented mechanism: lower external scores -> more defaults
    low = df["EXT_SOURCE_3"] < df["EXT_SOURCE_3"].quantile(0.2)
    high = df["EXT_SOURCE_3"] > df["EXT_SOURCE_3"].quantile(0.8)
    assert df.loc[low, "TARGET"].mean() > 3 * df.loc[high, "TARGET"].mean()


def test_datagen_is_deterministic() -> None:
    pd.testing.assert_frame_equal(datagen.generate(2_000, seed=5), datagen.generate(2_000, seed=5))
    assert not datagen.generate(2_000, seed=5).equals(datagen.generate(2_000, seed=6))


def test_datagen_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        datagen.main(["--help"])
    assert exc.value.code == 0 and "--rows" in capsys.readouterr().out
    out = tmp_path / "train.csv"
    assert datagen.main(["--rows", "500", "--seed", "1", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert len(df) == 500 and list(df.columns) == ["SK_ID_CURR", "TARGET", *COLUMN_NAMES]


# ---------------------------------------------------------------------------------------------- encoding / features

def test_encode_frame() -> None:
    frame = pd.DataFrame({
        "NAME_CONTRACT_TYPE": ["Cash loans", "Revolving loans", "Mortgage", None],
        "FLAG_OWN_CAR": ["Y", "N", "?", None],
        "NAME_FAMILY_STATUS": ["Married", "Widow", "Unknown", "Married"],
        "AMT_INCOME_TOTAL": [100_000, "oops", None, 1.5],
        "CODE_GENDER": ["F", "M", "XNA", "F"],  # not a model input: ignored
    })
    x = encode_frame(frame)
    assert x.dtype == np.float32 and x.shape == (4, len(COLUMNS))
    np.testing.assert_array_equal(x[:, IDX["NAME_CONTRACT_TYPE"]], [0, 1, np.nan, np.nan])
    np.testing.assert_array_equal(x[:, IDX["FLAG_OWN_CAR"]], [1, 0, np.nan, np.nan])
    np.testing.assert_array_equal(x[:, IDX["NAME_FAMILY_STATUS"]], [0, 4, np.nan, 0])
    np.testing.assert_array_equal(x[:, IDX["AMT_INCOME_TOTAL"]], [100_000, np.nan, np.nan, 1.5])
    assert np.isnan(x[:, IDX["EXT_SOURCE_1"]]).all()  # absent column


def test_engineer_features_values() -> None:
    x = np.full((3, len(COLUMNS)), np.nan, dtype=np.float32)
    x[:, IDX["EXT_SOURCE_1"]] = [0.2, np.nan, np.nan]
    x[:, IDX["EXT_SOURCE_2"]] = [0.4, 0.5, np.nan]
    x[:, IDX["EXT_SOURCE_3"]] = [0.9, np.nan, np.nan]
    x[:, IDX["AMT_INCOME_TOTAL"]] = 100_000
    x[:, IDX["AMT_CREDIT"]] = 500_000
    x[:, IDX["AMT_ANNUITY"]] = [25_000, np.nan, 20_000]
    x[:, IDX["AMT_GOODS_PRICE"]] = 400_000
    x[:, IDX["DAYS_BIRTH"]] = -14_610
    x[:, IDX["DAYS_EMPLOYED"]] = [-1_461, DAYS_EMPLOYED_UNEMPLOYED, -730.5]
    x[:, IDX["CNT_FAM_MEMBERS"]] = [2, 4, np.nan]
    f = engineer_features(x)
    assert f.dtype == np.float32 and f.shape == (3, len(MODEL_FEATURES))
    np.testing.assert_array_equal(f[:, : len(COLUMNS)], x)
    e = {name: f[:, len(COLUMNS) + k] for k, name in enumerate(ENGINEERED)}
    np.testing.assert_allclose(e["EXT_SOURCE_MEAN"], [0.5, 0.5, np.nan], rtol=1e-6)
    np.testing.assert_allclose(e["EXT_SOURCE_MIN"], [0.2, 0.5, np.nan], rtol=1e-6)
    np.testing.assert_allclose(e["EXT_SOURCE_MAX"], [0.9, 0.5, np.nan], rtol=1e-6)
    np.testing.assert_allclose(e["EXT_SOURCE_PROD"], [0.072, np.nan, np.nan], rtol=1e-6)
    np.testing.assert_allclose(e["PAYMENT_RATE"], [0.05, np.nan, 0.04], rtol=1e-6)
    np.testing.assert_allclose(e["CREDIT_TO_INCOME"], [5, 5, 5], rtol=1e-6)
    np.testing.assert_allclose(e["ANNUITY_TO_INCOME"], [0.25, np.nan, 0.2], rtol=1e-6)
    np.testing.assert_allclose(e["CREDIT_TO_GOODS"], [1.25, 1.25, 1.25], rtol=1e-6)
    np.testing.assert_allclose(e["DAYS_EMPLOYED_PERC"], [0.1, np.nan, 0.05], rtol=1e-6)
    np.testing.assert_allclose(e["INCOME_PER_PERSON"], [50_000, 25_000, np.nan], rtol=1e-6)
    np.testing.assert_allclose(e["AGE_YEARS"], [40, 40, 40], rtol=1e-6)
    np.testing.assert_allclose(e["EMPLOYED_YEARS"], [4, np.nan, 2], rtol=1e-6)


def test_feature_engineer_onnx_equals_numpy(trained: TrainResult) -> None:
    model = load_model(trained.model_dir)
    x = np.concatenate([hard_rows(6_000, seed=11), encode_frame(datagen.generate(2_000, seed=12))])
    onnx_features = model.transform(x)
    assert onnx_features.shape == (len(x), len(MODEL_FEATURES))
    np.testing.assert_array_equal(onnx_features, engineer_features(x))  # bit for bit, NaN where NaN
    one_by_one = np.concatenate([model.transform(x[i: i + 1]) for i in range(0, 200)])
    np.testing.assert_array_equal(one_by_one, engineer_features(x[:200]))


# ---------------------------------------------------------------------------------------------- the model

def test_onnx_matches_sklearn(trained: TrainResult) -> None:
    model = load_model(trained.model_dir)
    x = np.concatenate([encode_frame(datagen.generate(3_000, seed=21)), hard_rows(6_000, seed=22)])
    expected = trained.pipeline.predict_proba(x)[:, 1]
    got = model.predict_proba(x)
    assert got.dtype == np.float64 and got.shape == (len(x),)
    assert np.isfinite(got).all()
    assert np.max(np.abs(got - expected)) <= 1e-5
    proba, features = model.predict(x[:10])
    np.testing.assert_array_equal(proba, got[:10])
    assert features.shape == (10, len(MODEL_FEATURES))
    singles = np.array([model.predict_proba(x[i: i + 1])[0] for i in range(0, len(x), 97)])
    assert np.max(np.abs(singles - expected[::97])) <= 1e-5


def test_float32_thresholds_change_no_prediction() -> None:
    df = datagen.generate(8_000, seed=31)
    x, y = encode_frame(df), df["TARGET"].to_numpy()
    plain = build_pipeline({"n_estimators": 60}, seed=31).fit(x, y)
    rounded = fit_pipeline(x, y, {"n_estimators": 60}, seed=31)
    probe = np.concatenate([x, hard_rows(3_000, seed=32)])
    np.testing.assert_array_equal(plain.predict_proba(probe), rounded.predict_proba(probe))
    text = rounded.named_steps["lgbm"].booster_.model_to_string()
    for line in text.splitlines():
        if line.startswith("threshold="):
            t = np.array(line.split("=", 1)[1].split(), dtype=np.float64)
            np.testing.assert_array_equal(t, t.astype(np.float32).astype(np.float64))


def test_metrics_in_band(trained: TrainResult) -> None:
    metrics = trained.metadata["metrics"]
    assert 0.70 <= metrics["roc_auc"] <= 0.85
    assert 0.065 <= metrics["default_rate"] <= 0.095
    assert 0.0 < metrics["brier"] < 0.1 and 0.0 < metrics["log_loss"] < 0.35
    assert metrics["n_train"] == 16_000 and metrics["n_holdout"] == 4_000
    assert metrics["onnx_max_abs_diff"] <= 1e-5


def test_metadata(trained: TrainResult) -> None:
    meta = json.loads(trained.metadata_path.read_text())  # strict JSON: no NaN
    assert meta["version"] == trained.version == version_of(trained.onnx_path.read_bytes())
    assert meta["format_version"] == 1
    assert meta["onnx"]["input_name"] == "input" and meta["onnx"]["output_name"] == "probabilities"
    assert meta["onnx"]["probability_column"] == 1
    assert [c["name"] for c in meta["columns"]] == list(COLUMN_NAMES)
    assert meta["columns"][IDX["NAME_CONTRACT_TYPE"]]["categories"] == ["Cash loans", "Revolving loans"]
    assert meta["engineered"] == list(ENGINEERED) and meta["features"] == list(MODEL_FEATURES)
    assert meta["policy"] == json.loads(json.dumps(DECISION_POLICY))
    assert meta["training"]["source"] == "synthetic" and meta["training"]["rows"] == ROWS
    assert meta["training"]["packages"]["lightgbm"]
    # one model file: the trees are explained from model.onnx (covers in its metadata_props)
    assert sorted(p.name for p in trained.onnx_path.parent.iterdir()) == ["metadata.json", "model.onnx"]
    reference = meta["reference"]
    assert set(reference["features"]) == set(MODEL_FEATURES)
    for name, entry in reference["features"].items():
        assert 0.0 <= entry["missing_rate"] <= 1.0
        if entry["proportions"]:
            assert abs(sum(entry["proportions"]) - 1.0) < 1e-9, name
        if entry["kind"] == "numeric":
            assert entry["edges"] == sorted(set(entry["edges"])) and len(entry["proportions"]) == len(entry["edges"]) + 1
        else:
            assert len(entry["proportions"]) == len(entry["categories"])
    assert reference["features"]["NAME_INCOME_TYPE"]["categories"] == list(BY_NAME["NAME_INCOME_TYPE"].categories)
    assert abs(reference["features"]["EXT_SOURCE_1"]["missing_rate"] - 0.56) < 0.03
    sample = reference["sample"]
    assert sample["columns"] == list(COLUMN_NAMES) and 0 < len(sample["rows"]) <= 2000
    assert all(len(row) == len(COLUMNS) for row in sample["rows"])
    assert any(v is None for row in sample["rows"] for v in row)


def test_version_is_deterministic_and_no_activate(trained: TrainResult, store: Path) -> None:
    again = train(rows=ROWS, seed=SEED, model_dir=store, n_estimators=PARAMS["n_estimators"], activate=False)
    assert again.version == trained.version
    assert again.onnx_path.read_bytes() == trained.onnx_path.read_bytes()
    other = train(rows=5_000, seed=SEED + 1, model_dir=store, params={"n_estimators": 20}, activate=False)
    assert other.version != trained.version
    assert active_version(store) == trained.version  # --no-activate left ACTIVE alone
    assert set(list_versions(store)) == {trained.version, other.version}
    assert load_model(store, other.version).version == other.version


def test_early_stopping_picks_the_tree_count_on_a_validation_split(trained: TrainResult, store: Path) -> None:
    """The module's model stopped early (150 rounds at most): the metadata says how, the ONNX graph holds
    that many trees, and a fit of exactly that many rounds without early stopping (the bench's MLServer
    peer refits from the metadata this way) gives the very same model."""
    stop = trained.metadata["training"]["early_stopping"]
    params = trained.metadata["training"]["params"]
    booster = trained.pipeline.named_steps["lgbm"].booster_
    assert stop["rounds"] == trainmod.EARLY_STOPPING_ROUNDS and stop["max_estimators"] == PARAMS["n_estimators"]
    assert 1 <= stop["best_iteration"] < PARAMS["n_estimators"]
    assert params["n_estimators"] == stop["best_iteration"] == booster.num_trees()
    assert stop["validation_rows"] == round(ROWS * (1 - trainmod.HOLDOUT_FRACTION) * trainmod.VALIDATION_FRACTION)
    assert 0 < stop["validation_log_loss"] < 0.4
    exact = train(rows=ROWS, seed=SEED, model_dir=store, n_estimators=stop["best_iteration"], early_stopping_rounds=0,
                  activate=False)
    assert exact.version == trained.version
    assert exact.metadata["training"]["early_stopping"]["rounds"] == 0

    lines: list[str] = []
    few = train(rows=200, seed=SEED, model_dir=store, n_estimators=12, activate=False, log=lines.append)
    assert few.metadata["training"]["early_stopping"]["rounds"] == 0  # too few defaults to hold some out
    assert few.metadata["training"]["params"]["n_estimators"] == 12
    assert any("too few rows of a class" in line and "all 12 rounds" in line for line in lines)
    assert any("12 trees" in line for line in lines)

    lines.clear()
    short = train(rows=5_000, seed=SEED, model_dir=store, n_estimators=5, activate=False, log=lines.append)
    assert short.metadata["training"]["early_stopping"]["best_iteration"] == 5  # still improving at the end
    assert any("a larger --n-estimators may do better" in line for line in lines)


def test_train_cli_rejects_a_negative_early_stopping_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        trainmod.main(["--early-stopping-rounds", "-1"])
    assert exc.value.code == 2 and "--early-stopping-rounds >= 0" in capsys.readouterr().err


def test_version_does_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    """Two processes with different hash seeds make the same bytes (skl2onnx listed the opsets in set order,
    so one model got several versions and the bench's refitted MLServer peer was refused)."""
    versions = []
    for seed in ("1", "6"):  # (the two orders, before the fix)
        out = subprocess.run(
            [sys.executable, "-m", "tools.train", "--model-dir", str(tmp_path / seed), "--rows", "3000",
             "--seed", "5", "--n-estimators", "5", "--quiet"],
            env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, timeout=300, check=True)
        versions.append(out.stdout.strip().splitlines()[-1])
    assert len(set(versions)) == 1, versions


# ---------------------------------------------------------------------------------------------- the store

def test_active_handling(trained: TrainResult, tmp_path: Path) -> None:
    assert (trained.model_dir / "ACTIVE").read_text().strip() == trained.version
    model = load_model(trained.model_dir)
    assert model.version == trained.version and model.path == trained.model_dir / trained.version
    assert model.features == MODEL_FEATURES and model.onnx_path.is_file()
    assert model.decision_policy["approve_below"] == 0.20
    assert read_metadata(trained.model_dir, trained.version) == model.metadata
    assert not list(trained.model_dir.glob(".*tmp"))  # atomic writes left no temporary files

    copy = tmp_path / "store"
    shutil.copytree(trained.model_dir / trained.version, copy / trained.version)
    assert active_version(copy) is None and list_versions(copy) == [trained.version]
    with pytest.raises(ModelNotFoundError, match="no active model"):
        load_model(copy)
    assert load_model(copy, trained.version).version == trained.version
    (copy / "ACTIVE").write_text(trained.version + "\n")
    assert load_model(copy).version == trained.version
    (copy / "ACTIVE").write_text("0123456789abcdef\n")
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(copy)


def test_missing_store_explains_how_to_train(tmp_path: Path) -> None:
    for directory in (tmp_path / "nothing-here", tmp_path):
        with pytest.raises(ModelNotFoundError) as exc:
            load_model(directory)
        assert "make model" in str(exc.value) and "credscope-train" in str(exc.value)
    assert list_versions(tmp_path / "nothing-here") == [] and active_version(tmp_path) is None
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path, "not-a-version")
    with pytest.raises(ModelNotFoundError):
        read_metadata(tmp_path, "0123456789abcdef")


def test_tampered_model_is_refused(trained: TrainResult, tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(trained.model_dir / trained.version, copy / trained.version)
    onnx_file = copy / trained.version / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="modified"):
        load_model(copy, trained.version)


def test_predict_proba_rejects_bad_shapes(trained: TrainResult) -> None:
    model = load_model(trained.model_dir, intra_op_threads=2)
    with pytest.raises(ValueError):
        model.predict_proba(np.zeros((2, len(COLUMNS) - 1), dtype=np.float32))
    with pytest.raises(ValueError):
        model.predict_proba(np.zeros(len(COLUMNS), dtype=np.float32))
    assert model.predict_proba(np.zeros((0, len(COLUMNS)), dtype=np.float32)).shape == (0,)
    as_float64 = model.predict_proba(np.zeros((1, len(COLUMNS)), dtype=np.float64))
    assert as_float64.shape == (1,)


# ---------------------------------------------------------------------------------------------- the CLI

def test_train_cli_on_a_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = datagen.generate(6_000, seed=41)
    df.insert(2, "CODE_GENDER", np.where(np.arange(len(df)) % 3 == 0, "M", "F"))  # extra column
    df["FLAG_DOCUMENT_3"] = 1  # extra column
    df = df.drop(columns=["OWN_CAR_AGE"])  # an optional column missing
    df.loc[df.index[:50], "NAME_FAMILY_STATUS"] = "Unknown"  # a category the schema does not know
    csv = tmp_path / "application_train.csv"
    df.to_csv(csv, index=False)
    models = tmp_path / "models"
    code = trainmod.main(["--data", str(csv), "--model-dir", str(models), "--n-estimators", "40",
                          "--num-leaves", "15", "--learning-rate", "0.1", "--early-stopping-rounds", "0"])
    captured = capsys.readouterr()
    version = captured.out.strip()
    assert code == 0 and active_version(models) == version
    assert "ROC-AUC" in captured.err and "fit" in captured.err  # progress lines
    meta = load_model(models).metadata
    assert meta["training"]["source"] == "application_train.csv" and meta["training"]["rows"] == 6_000
    assert meta["training"]["params"]["n_estimators"] == 40 and meta["training"]["params"]["num_leaves"] == 15
    assert meta["reference"]["features"]["OWN_CAR_AGE"]["missing_rate"] == 1.0
    assert meta["metrics"]["roc_auc"] > 0.65

    df.drop(columns=["AMT_CREDIT"]).to_csv(csv, index=False)  # a required column missing
    assert trainmod.main(["--data", str(csv), "--model-dir", str(models), "--quiet"]) == 2
    assert "AMT_CREDIT" in capsys.readouterr().err


def test_train_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        trainmod.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for option in ("--data", "--rows", "--seed", "--model-dir", "--n-estimators", "--num-leaves",
                   "--learning-rate", "--no-activate", "--quiet"):
        assert option in out
