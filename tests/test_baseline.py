"""A scikit-learn baseline on every run, on the same split and preprocessing as the teacher; and the early stop
of a run select could only refuse (issue 19)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from distilflow.errors import DistilflowError
from distilflow.io import read_json
from distilflow.params import CleanParams, DataParams, SplitParams
from tasks.baseline import baseline_stage, refuse_degenerate_run
from tasks.data import clean_table, read_raw
from tasks.preprocessing import fit_normalizer
from tasks.registry.card import baseline_note
from tasks.splits import stratified_split
from tests.conftest import REPO, edit_params

MARGIN = 0.1  # params.yaml's select.min_macro_f1_margin


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
    result = baseline_stage(
        **files, baseline_report=tmp_path / "b.json", image_shape=data.image_shape, seed=0, min_macro_f1_margin=MARGIN
    )
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
    # balanced XOR: the linear model is poor but the gradient boosting is not, so the run is not stopped
    baseline_stage(**files, baseline_report=tmp_path / "b.json", image_shape=None, seed=0, min_macro_f1_margin=MARGIN)
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


# ----------------------------------------------------------------------------
# a run that could only end at select with nothing registered stops at the baseline, before fine-tuning


def _one_class_mostly(n: int = 600) -> pd.DataFrame:
    """4x4 "images" of noise, 85% of them labelled 0: nothing to learn but the majority class."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.integers(0, 17, size=(n, 16)), columns=[f"px{i}" for i in range(16)])
    frame["label"] = rng.choice([0, 1, 2], size=n, p=[0.85, 0.10, 0.05])
    return frame


NOISE = DataParams(image_shape=(4, 4, 1), value_range=(0.0, 16.0), classes=None)


def test_a_baseline_no_better_than_the_majority_class_stops_the_run_in_selects_words(tmp_path):
    files = _prepared(tmp_path, _one_class_mostly(), NOISE, "per_channel")
    report = tmp_path / "b.json"
    with pytest.raises(DistilflowError) as caught:
        baseline_stage(**files, baseline_report=report, image_shape=NOISE.image_shape, seed=0, min_macro_f1_margin=0.1)
    message = str(caught.value)
    assert message.startswith(
        "nothing registered: no candidate is likely to meet select: the best baseline, logistic regression, "
        "misses it: validation macro-F1 "
    )
    assert "+ select.min_macro_f1_margin 0.1) by " in message and "and class '0' holds 8" in message
    assert "stopped before fine-tuning" in message and not report.exists()  # nothing half-written


@pytest.mark.parametrize(
    ("models", "counts", "stops"),
    [
        ({"logistic regression": {"val_macro_f1": 0.30}}, {"a": 85, "b": 10, "c": 5}, True),  # majority's 0.306
        ({"logistic regression": {"val_macro_f1": 0.30}}, {"a": 34, "b": 33, "c": 33}, False),  # no class holds most
        ({"logistic regression": {"val_macro_f1": 0.90}}, {"a": 85, "b": 10, "c": 5}, False),  # learns the rare ones
        (  # a table: the better baseline counts
            {"logistic regression": {"val_macro_f1": 0.30}, "histogram gradient boosting": {"val_macro_f1": 0.45}},
            {"a": 85, "b": 10, "c": 5},
            False,
        ),
    ],
)
def test_the_early_stop_needs_one_class_holding_most_rows_and_every_baseline_at_the_majoritys_macro_f1(
    models, counts, stops
):
    if stops:
        with pytest.raises(DistilflowError, match=r"validation macro-F1 0\.3000 < 0\.4063 \(majority-class predictor"):
            refuse_degenerate_run(models, counts, MARGIN)
    else:
        refuse_degenerate_run(models, counts, MARGIN)  # no error


@pytest.mark.slow
def test_distilflow_run_on_such_data_exits_with_the_line_before_the_backbone_and_fine_tuning(tmp_path):
    project = tmp_path / "p"
    (project / "data/raw").mkdir(parents=True)
    _one_class_mostly().to_csv(project / "data/raw/noise.csv", index=False)
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    edit_params(
        project,
        data={"source": "data/raw/noise.csv", "image_shape": [4, 4, 1], "value_range": [0, 16], "classes": None},
        backbone={"spec": "builtin:cnn", "width": 16, "depth": 3},
        transfer={"enabled": False},
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    proc = subprocess.run(
        [sys.executable, "-m", "distilflow", "run", "--params", str(project / "params.yaml")],
        cwd=REPO,
        env={**env, "PREFECT_HOME": str(project / ".prefect")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("distilflow: error: nothing registered: no candidate is likely"), (
        proc.stdout[-2000:] + proc.stderr[-3000:]
    )
    assert "stopped before fine-tuning" in last and "Traceback" not in proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr
    assert "normalize: ran" in said and "backbone: ran" not in said and "finetune: ran" not in said
    assert not (project / "artifacts/teacher").exists() and not (project / "reports/baseline.json").exists()
