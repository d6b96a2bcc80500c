"""The preprocessing fitted on train and applied everywhere: the one piece the served model shares with training.

`fit_normalizer` (train split only) gives a JSON-able record; `apply_normalizer`
applies it, in training and in the served model alike. Kept free of Prefect
and pydantic, so the registered model (tasks/serving.py) imports only numpy
and pandas on top of its runtime.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from distilflow.errors import DistilflowError

LABEL = "label"  # the label column of every table after ingestion (tasks/splits.py re-exports it)


def apply_normalizer(pre: dict, features: pd.DataFrame) -> np.ndarray:
    """Raw feature columns → normalised float32 matrix, as fitted by `fit_normalizer`."""
    missing = [c for c in pre["feature_columns"] if c not in features.columns]
    if missing:
        raise DistilflowError(f"input is missing feature columns: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    try:
        X = features[pre["feature_columns"]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        for column in pre["feature_columns"]:
            values = pd.to_numeric(features[column], errors="coerce")
            bad = features[column][values.isna() & features[column].notna()]
            if len(bad):
                raise DistilflowError(
                    f"input column {column!r} holds non-numeric values (e.g. {bad.iloc[0]!r})"
                ) from None
        raise
    impute = np.asarray(pre["impute"])
    X = np.where(np.isfinite(X), X, impute)
    if pre.get("clip") is not None:  # as the clean stage did to the training rows: no train/serve skew
        X = np.clip(X, *pre["clip"])
    with np.errstate(over="ignore", invalid="ignore"):
        out = ((X - np.asarray(pre["shift"])) / np.asarray(pre["scale"])).astype(np.float32)
    if not np.isfinite(out).all():
        column = pre["feature_columns"][int(np.argwhere(~np.isfinite(out))[0][1])]
        raise DistilflowError(
            f"input column {column!r} holds a value too large for the model (after scaling it is not a finite number)"
        )
    return out


def _statistics(method: str, X: np.ndarray, image_shape) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (shift, scale) of a normalization method."""
    if method == "standard":
        return X.mean(axis=0), _by_column_blocks(np.std, X)
    elif method == "minmax":
        return X.min(axis=0), X.max(axis=0) - X.min(axis=0)
    elif method == "per_channel":
        c = image_shape[2]
        per_channel = X.reshape(len(X), -1, c)
        mean, std = per_channel.mean(axis=(0, 1)), per_channel.std(axis=(0, 1))
        return np.tile(mean, X.shape[1] // c), np.tile(std, X.shape[1] // c)
    elif method == "none":
        return np.zeros(X.shape[1]), np.ones(X.shape[1])
    raise DistilflowError(f"normalize.method: unknown method {method!r} (allowed: standard, minmax, per_channel, none)")


def _by_column_blocks(stat, X: np.ndarray, block: int = 16) -> np.ndarray:
    """`stat(X, axis=0)` a few columns at a time: numpy's median and std copy the whole of X first."""
    if X.shape[1] == 0:
        return np.zeros(0)
    return np.concatenate([stat(X[:, j : j + block], axis=0) for j in range(0, X.shape[1], block)])


def fit_normalizer(
    train: pd.DataFrame,
    method: str,
    image_shape: tuple[int, int, int] | None,
    value_range: tuple[float, float] | None = None,
) -> dict:
    """Fit imputation and scaling on the train split only, as a JSON-able record.

    Every method reduces to per-feature (impute, shift, scale) vectors, so
    serving applies one formula: (clip(fill_nan(x, impute)) - shift) / scale,
    clipping to `value_range` as the clean stage did to the training rows.
    Scales that are not finite (values too large to square) stop here with
    the columns named, rather than train on NaN.
    """
    features = [c for c in train.columns if c != LABEL]
    X = train[features].to_numpy(dtype=np.float64, copy=True)  # ours to fill in place
    missing = np.isnan(X)
    with np.errstate(all="ignore"):
        impute = _by_column_blocks(np.nanmedian if missing.any() else np.median, X)
    impute = np.where(np.isfinite(impute), impute, 0.0)
    np.copyto(X, np.broadcast_to(impute, X.shape), where=missing)
    del missing
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing statistics are refused just below
        shift, scale = _statistics(method, X, image_shape)
    scale = np.where(scale > 0, scale, 1.0)  # constant features (digits' blank corners) pass through centred
    bad = [
        f
        for f, a, b, c in zip(features, shift, scale, impute)
        if not (np.isfinite(a) and np.isfinite(b) and np.isfinite(c))
    ]
    if bad:
        raise DistilflowError(
            f"normalize: column(s) {bad[:5]} have values too large to scale (their {method} statistics overflow, "
            f"e.g. max |x| {np.nanmax(np.abs(X[:, features.index(bad[0])])):g}): set data.value_range to clip or "
            "drop them, or fix the data"
        )
    classes = sorted(train[LABEL].unique().tolist())
    return {
        "version": 1,
        "method": method,
        "feature_columns": features,
        "image_shape": list(image_shape) if image_shape else None,
        "classes": classes,
        "impute": impute.tolist(),
        "shift": shift.tolist(),
        "scale": scale.tolist(),
        "clip": list(value_range) if value_range is not None else None,
    }
