"""The metrics every model is judged by: accuracy, macro-F1 and per-class recall."""

from __future__ import annotations

import numpy as np


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list, labels: list[int] | None = None
) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class recall (`recall.<class>`).

    `labels` are the class indices `classes` name (default: 0..len(classes)-1).
    """
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    labels = list(range(len(classes))) if labels is None else list(labels)
    recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        **{f"recall.{c}": float(r) for c, r in zip(classes, recalls)},
    }


def accuracy(model, X: np.ndarray, y: np.ndarray) -> float:
    """Share of rows of X whose predicted class index is y; `model` is a torch module or a predictor of logits."""
    from tasks.inference import TorchPredictor

    if len(y) == 0:
        return float("nan")
    predict = TorchPredictor(model) if hasattr(model, "state_dict") else model
    return float((np.asarray(predict(X)).argmax(1) == np.asarray(y)).mean())
