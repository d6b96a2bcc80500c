"""A classical baseline on every run: scikit-learn on the same split and preprocessing as the teacher.

Logistic regression always; histogram gradient boosting too for tables. Fitted
on train, measured on validation and test like every other model, so a teacher
that a linear model beats is visible at once (the CLI, the model card, MLflow).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from distilflow.io import write_json
from distilflow.records import StageResult
from tasks.dataset import load_splits
from tasks.metrics import classification_metrics

log = logging.getLogger("distilflow.baseline")


def _models(image_shape, seed: int) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    models = {"logistic regression": LogisticRegression(max_iter=500, random_state=seed)}
    if image_shape is None:
        models["histogram gradient boosting"] = HistGradientBoostingClassifier(random_state=seed)
    return models


def fit_baselines(data: dict, classes: list, image_shape, seed: int) -> dict[str, dict]:
    """{model name: validation and test accuracy and macro-F1, fit seconds}."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    (Xtr, ytr), out = data["train"], {}
    for name, model in _models(image_shape, seed).items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds a baseline's cost on purpose
            model.fit(Xtr, ytr)
        row = {"fit_s": time.perf_counter() - t0}
        for split in ("val", "test"):
            X, y = data[split]
            m = classification_metrics(y, np.asarray(model.predict(X)), classes)
            row[f"{split}_accuracy"], row[f"{split}_macro_f1"] = m["accuracy"], m["macro_f1"]
        out[name] = row
    return out


def baseline_stage(
    train: Path,
    val: Path,
    test: Path,
    preprocessor: Path,
    baseline_report: Path,
    image_shape: tuple[int, int, int] | None,
    seed: int,
) -> StageResult:
    """Fit the baselines on train; their validation and test figures in reports/baseline.json."""
    pre, data = load_splits(train, val, test, preprocessor)
    models = fit_baselines(data, pre["classes"], image_shape, seed)
    write_json({"models": models}, baseline_report)
    best = max(models, key=lambda m: models[m]["val_accuracy"])
    log.info(f"baseline: {best} test accuracy {models[best]['test_accuracy']:.4f}")
    short = {"logistic regression": "logreg", "histogram gradient boosting": "hgb"}
    return StageResult(
        metrics={f"{short[m]}.{k}": v for m, row in models.items() for k, v in row.items()},
        params={"seed": seed},
        artifacts=[str(baseline_report)],
        info={"models": models, "best": best},
    )
