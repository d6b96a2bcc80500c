"""Tables: constant, near-constant and ID-like columns dropped at ingest; categoricals one-hot on train's values
and bundled in the served model (an unseen value encodes as zeros); an optional mutual-information selection."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from distilflow.errors import DistilflowError
from distilflow.params import CleanParams, DataParams, FeaturesParams, SplitParams
from tasks.data import clean_table, read_raw
from tasks.preprocessing import apply_normalizer, fit_normalizer
from tasks.splits import LABEL, stratified_split
from tests.conftest import REPO, edit_params

TABLE = DataParams(image_shape=None, value_range=None, label_column="y")


def _table(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """`y` is `site == north` XOR `x1 > 0`: learnable only with the categorical one-hot encoded."""
    rng = np.random.default_rng(seed)
    site = rng.choice(["north", "south", "east"], n)
    x1 = rng.normal(size=n)
    return pd.DataFrame(
        {
            "row_id": np.arange(1000, 1000 + n),  # numbers the rows: ID-like
            "customer": [f"c{i:05d}" for i in rng.permutation(n)],  # text unique per row: ID-like
            "region": "emea",  # one value: constant
            "flag": np.where(np.arange(n) == 7, 1, 0),  # one row differs: near-constant
            "site": site,
            "x1": x1,
            "noise": rng.normal(size=n),
            "y": np.where((site == "north") ^ (x1 > 0), "a", "b"),
        }
    )


def test_ingest_drops_constant_near_constant_and_id_like_columns_and_keeps_the_categorical(tmp_path):
    path = tmp_path / "t.csv"
    _table().to_csv(path, index=False)
    plans: list = []
    table = read_raw(path, TABLE, FeaturesParams(near_constant_share=0.99), plans)
    assert list(table.columns) == [LABEL, "site", "x1", "noise"]
    dropped = plans[0].report()["dropped"]
    assert set(dropped) == {"row_id", "customer", "region", "flag"}
    assert dropped["region"] == "constant" and dropped["flag"].startswith("near-constant")
    assert dropped["row_id"].startswith("ID-like") and dropped["customer"].startswith("ID-like")
    assert not pd.api.types.is_numeric_dtype(table["site"]) and set(table["site"]) == {"north", "south", "east"}


def test_switched_off_the_columns_stay_and_continuous_unique_values_are_never_ids(tmp_path):
    path = tmp_path / "t.csv"
    _table().drop(columns=["customer"]).to_csv(path, index=False)
    cfg = FeaturesParams(drop_constant=False, drop_id_like=False)
    table = read_raw(path, TABLE, cfg)
    assert {"row_id", "region", "flag"} <= set(table.columns)
    # x1 and noise are unique per row too, but not whole numbers: features, not IDs
    assert {"x1", "noise"} <= set(read_raw(path, TABLE).columns)


def test_free_text_with_too_many_values_is_one_clear_error(tmp_path):
    frame = _table()
    frame["comment"] = [f"note {i % 50}" for i in range(len(frame))]
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DistilflowError, match=r"'comment'.*more than features.max_categories=20"):
        read_raw(tmp_path / "t.csv", TABLE)
    assert "comment" in read_raw(tmp_path / "t.csv", TABLE, FeaturesParams(max_categories=60)).columns


def test_a_table_of_only_dropped_columns_says_so(tmp_path):
    pd.DataFrame({"id": range(30), "c": 1, "y": ["a", "b"] * 15}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DistilflowError, match=r"every feature column was dropped \(id: ID-like.*c: constant"):
        read_raw(tmp_path / "t.csv", TABLE)


def _prepared(tmp_path, select_k=None, frame=None):
    path = tmp_path / "t.csv"
    (frame if frame is not None else _table().drop(columns=["flag"])).to_csv(path, index=False)
    table = read_raw(path, TABLE)
    cleaned, _ = clean_table(table, CleanParams(), None, None, 3)
    parts = stratified_split(cleaned, SplitParams(), 0)
    return parts, fit_normalizer(parts["train"], "standard", None, None, select_k)


def test_clean_keeps_categoricals_beside_the_numbers_and_duplicates_count_them(tmp_path):
    frame = _table(200).drop(columns=["flag", "customer", "row_id"])  # copied rows would repeat the IDs
    twin = frame.iloc[[0]].assign(site="south" if frame.iloc[0]["site"] != "south" else "east")
    twin["y"] = "a" if frame.iloc[0]["y"] == "b" else "b"  # same numbers, another site: not a conflict
    frame = pd.concat([frame, frame.iloc[[1]], twin], ignore_index=True)  # one exact duplicate
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    cleaned, report = clean_table(read_raw(path, TABLE), CleanParams(), None, None, 3)
    assert report["dropped"]["duplicates"] == 1 and report["dropped"]["conflicting_labels"] == 0
    assert list(cleaned.columns) == [LABEL, "site", "x1", "noise"] and len(cleaned) == 201


def test_one_hot_is_fitted_on_train_values_and_an_unseen_value_encodes_as_zeros(tmp_path):
    parts, pre = _prepared(tmp_path)
    assert pre["categories"] == {"site": ["east", "north", "south"]} and pre["numeric_columns"] == ["x1", "noise"]
    rows = pd.DataFrame({"site": ["north", "west", None], "x1": [0.5, 0.5, 0.5], "noise": [0.0, 0.0, 0.0]})
    X = apply_normalizer(pre, rows)
    assert X.shape == (3, pre["n_inputs"]) == (3, 5)
    assert X[0, 2:].tolist() == [0, 1, 0] and X[1, 2:].tolist() == [0, 0, 0] and X[2, 2:].tolist() == [0, 0, 0]
    # the numeric block is the scaled values, the same for all three rows
    assert np.allclose(X[:, :2], X[0, :2])


def test_selection_keeps_the_informative_feature_fitted_on_train_only(tmp_path):
    rng = np.random.default_rng(1)
    n = 400
    frame = pd.DataFrame({f"n{i}": rng.normal(size=n) for i in range(5)})
    frame["signal"] = rng.normal(size=n)
    frame["site"] = rng.choice(["a", "b"], n)
    frame["y"] = np.where(frame["signal"] > 0, "pos", "neg")
    parts, pre = _prepared(tmp_path, select_k=1, frame=frame)
    assert pre["selection"]["kept"] == ["signal"] and pre["selection"]["of"] == 8 and pre["n_inputs"] == 1
    X = apply_normalizer(pre, parts["test"])
    assert X.shape == (len(parts["test"]), 1)
    # the kept column is the scaled signal itself: its sign is the label
    assert ((X[:, 0] > -0.2) == (parts["test"][LABEL] == "pos").to_numpy()).mean() > 0.95


def test_select_k_is_refused_for_images():
    from distilflow.params import params_from_dict

    with pytest.raises(Exception, match="features.select_k is for tables"):
        params_from_dict({"features": {"select_k": 5}})


@pytest.mark.slow
def test_a_table_with_categoricals_and_ids_runs_end_to_end_and_serves_raw_text_rows(tmp_path):
    """`distilflow run` on a CSV with an ID, a constant and a categorical column; the registered model takes
    the raw rows (text included), handles an unseen site, and learns the XOR that needs the one-hot."""
    import mlflow

    project = tmp_path / "p"
    (project / "data/raw").mkdir(parents=True)
    frame = _table(900)
    frame.to_csv(project / "data/raw/sites.csv", index=False)
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    edit_params(
        project,
        data={
            "source": "data/raw/sites.csv",
            "label_column": "y",
            "image_shape": None,
            "value_range": None,
            "classes": None,
            "name": None,  # from the file: distilflow-sites
        },
        normalize={"method": "standard"},
        backbone={"spec": "builtin:cnn", "width": 64, "depth": 2},
        train={"epochs": 40, "warmup_epochs": 0, "batch_size": 64},
        transfer={"enabled": False},
        distill={"epochs": 40, "gain_label_budgets": [], "student_width": 32, "student_depth": 2},
        quantize={"calibration_size": 64},
        evaluate={"repeats": 3},
        select={"max_drop": 0.1},
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    proc = subprocess.run(
        [sys.executable, "-m", "distilflow", "run", "--params", str(project / "params.yaml")],
        cwd=REPO,
        env={**env, "PREFECT_HOME": str(project / ".prefect")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dropped feature columns: row_id: ID-like" in proc.stdout + proc.stderr
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/distilflow-sites@challenger")
    rows = _table(300, seed=7).drop(columns=["y"])
    truth = _table(300, seed=7)["y"].to_numpy()
    predicted = model.predict(rows)["prediction"].astype(str).to_numpy()
    # the XOR is learnable only through the site one-hot: a model blind to it scores ~0.5
    assert (predicted == truth).mean() >= 0.9
    unseen = rows.head(3).assign(site="west")
    assert len(model.predict(unseen)) == 3
