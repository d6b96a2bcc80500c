"""A scikit-learn baseline on every run, on the same split and preprocessing as the teacher."""

from __future__ import annotations

import numpy as np
import pandas as pd

from distilflow.io import read_json
from distilflow.params import CleanParams, DataParams, SplitParams
from tasks.baseline import baseline_stage
from tasks.data import clean_table, read_raw
from tasks.preprocessing import fit_normalizer
from tasks.registry.card import baseline_note
from tasks.splits import stratified_split


def _prepared(tmp_path, frame: pd.DataFrame, data: DataParams, method: str) -> dict:
    path = tmp_path / "raw.csv"
    frame.to_csv(path, index=False)
    cleaned, _ = clean_table(read_raw(path, data), CleanParams(), None, data.value_range, 3)
    parts = stratified_split(cleaned, SplitParams(), 0)
    files = {}
    for name, part in parts.items():
        files[name] = tmp_path / f"{name}.parquet"
        part.to_parquet(files[name], index=False)
    files["preprocessor"] = tmp_path / "pre.json"
    import json

    files["preprocessor"].write_text(json.dumps(fit_normalizer(parts["train"], method, data.image_shape)))
    return files


def test_digits_get_a_logistic_regression_near_its_known_accuracy(tmp_path, digits_csv):
    data = DataParams()
    files = _prepared(tmp_path, pd.read_csv(digits_csv), data, "per_channel")
    result = baseline_stage(**files, baseline_report=tmp_path / "b.json", image_shape=data.image_shape, seed=0)
    models = read_json(tmp_path / "b.json")["models"]
    assert list(models) == ["logistic regression"]  # images: no gradient boosting
    # a multinomial logistic regression on scaled digits scores about 0.96-0.97 on held-out rows
    assert 0.94 <= models["logistic regression"]["test_accuracy"] <= 1.0
    assert result.metrics["logreg.test_accuracy"] == models["logistic regression"]["test_accuracy"]


def test_tables_add_gradient_boosting_which_learns_what_a_linear_model_cannot(tmp_path):
    rng = np.random.default_rng(0)
    n = 1200
    a, b = rng.normal(size=n), rng.normal(size=n)
    frame = pd.DataFrame({"a": a, "b": b, "y": np.where((a > 0) ^ (b > 0), "x", "o")})  # XOR: not linear
    data = DataParams(image_shape=None, value_range=None, classes=None, label_column="y")
    files = _prepared(tmp_path, frame, data, "standard")
    baseline_stage(**files, baseline_report=tmp_path / "b.json", image_shape=None, seed=0)
    models = read_json(tmp_path / "b.json")["models"]
    assert models["histogram gradient boosting"]["test_accuracy"] >= 0.93
    assert models["logistic regression"]["test_accuracy"] <= 0.7  # chance is 0.5: a line cannot split XOR


def test_the_card_says_loudly_when_the_baseline_beats_the_network():
    row = {"val_accuracy": 0.97, "test_accuracy": 0.975, "test_macro_f1": 0.97}
    loud = baseline_note({"logistic regression": row}, teacher_accuracy=0.942, product_accuracy=0.93)
    assert "**A classical baseline beats this model: logistic regression" in loud[1]
    quiet = baseline_note({"logistic regression": row}, teacher_accuracy=0.99, product_accuracy=0.98)
    assert not quiet[1].startswith("**") and "below the teacher (0.9900)" in quiet[1]
    assert baseline_note(None, 0.9, 0.9) == []
