"""A classical baseline on every run: scikit-learn on the same split and preprocessing as the teacher.

Logistic regression always; histogram gradient boosting too for tables. Fitted
on train, measured on validation and test like every other model, so a teacher
that a linear model beats is visible at once (the CLI, the model card, MLflow).

It runs before the backbone and fine-tuning stages, so it is also where a run
that could only end at select with nothing registered stops, minutes sooner
(`refuse_degenerate_run`): one class holds most of the validation rows and no
baseline's validation macro-F1 beats the majority-class predictor's by
`select.min_macro_f1_margin`, select's own rule (tasks/candidates.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from distilflow.errors import DistilflowError
from distilflow.io import write_json
from distilflow.records import StageResult
from tasks.candidates import macro_f1_shortfall, majority_macro_f1
from tasks.dataset import load_splits
from tasks.metrics import classification_metrics

log = logging.getLogger("distilflow.baseline")
MOST_ROWS = 0.5  # the early stop needs the majority class above this share of the validation rows


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


def refuse_degenerate_run(models: dict[str, dict], val_counts: dict[str, int], margin: float) -> None:
    """Stop a run select could only refuse, before fine-tuning (see the module docstring).

    Both conditions are needed: a weak linear model on balanced classes says little about a network
    (XOR), but when most rows are one class and no baseline beats always predicting it, the same
    rule at select is all but sure to refuse the network too. A DistilflowError in select's words.
    """
    if not models or sum(val_counts.values()) == 0:
        return
    top = max(val_counts, key=val_counts.get)
    share = val_counts[top] / sum(val_counts.values())
    best = max(models, key=lambda m: models[m]["val_macro_f1"])
    shortfall = macro_f1_shortfall(models[best]["val_macro_f1"], majority_macro_f1(val_counts), margin)
    if share <= MOST_ROWS or shortfall is None:
        return
    raise DistilflowError(
        f"nothing registered: no candidate is likely to meet select: the best baseline, {best}, misses it: "
        f"{shortfall}, and class {top!r} holds {share:.0%} of the validation rows; stopped before fine-tuning. Check "
        "data.label_column (add-data --label) and the labels, or set evaluate.baseline: false to train anyway"
    )


def baseline_stage(
    train: Path,
    val: Path,
    test: Path,
    preprocessor: Path,
    baseline_report: Path,
    image_shape: tuple[int, int, int] | None,
    seed: int,
    min_macro_f1_margin: float,
) -> StageResult:
    """Fit the baselines on train; their validation and test figures in reports/baseline.json.

    Stops the run (`refuse_degenerate_run`, select's `min_macro_f1_margin`) when select could only refuse it.
    """
    pre, data = load_splits(train, val, test, preprocessor)
    models = fit_baselines(data, pre["classes"], image_shape, seed)
    indices, counts = np.unique(data["val"][1], return_counts=True)
    val_counts = {str(pre["classes"][i]): int(n) for i, n in zip(indices, counts)}
    refuse_degenerate_run(models, val_counts, min_macro_f1_margin)
    write_json({"models": models}, baseline_report)
    best = max(models, key=lambda m: models[m]["val_accuracy"])
    log.info(f"baseline: {best} test accuracy {models[best]['test_accuracy']:.4f}")
    short = {"logistic regression": "logreg", "histogram gradient boosting": "hgb"}
    return StageResult(
        metrics={f"{short[m]}.{k}": v for m, row in models.items() for k, v in row.items()},
        params={"seed": seed, "min_macro_f1_margin": min_macro_f1_margin},
        artifacts=[str(baseline_report)],
        info={"models": models, "best": best},
    )
