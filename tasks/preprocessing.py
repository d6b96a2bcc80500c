"""Applying the fitted preprocessing: the one piece the served model shares with training.

Kept free of Prefect and pydantic, so the registered model (tasks/serving.py)
imports only numpy and pandas on top of its runtime.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from distilflow.errors import DistilflowError


def apply_normalizer(pre: dict, features: pd.DataFrame) -> np.ndarray:
    """Raw feature columns → normalised float32 matrix, as fitted by `tasks/data.py:fit_normalizer`."""
    missing = [c for c in pre["feature_columns"] if c not in features.columns]
    if missing:
        raise DistilflowError(f"input is missing feature columns: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    try:
        X = features[pre["feature_columns"]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DistilflowError(f"input feature columns must be numeric: {exc}") from None
    impute = np.asarray(pre["impute"])
    X = np.where(np.isfinite(X), X, impute)
    return ((X - np.asarray(pre["shift"])) / np.asarray(pre["scale"])).astype(np.float32)
