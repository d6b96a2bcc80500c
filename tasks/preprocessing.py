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
    """Raw feature columns → normalised float32 matrix, as fitted by `fit_normalizer`.

    Numeric columns are imputed, clipped and scaled; categorical ones become
    one-hot blocks of train's values (an unseen or missing value: all zeros);
    then the selected features (if any) are kept, in their fitted order.
    """
    missing = [c for c in pre["feature_columns"] if c not in features.columns]
    if missing:
        raise DistilflowError(f"input is missing feature columns: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    numeric = pre.get("numeric_columns", pre["feature_columns"])
    out = _scaled(pre, features, numeric)
    categories = pre.get("categories") or {}
    if categories:
        blocks = [out] + [_one_hot(features[c], values) for c, values in categories.items()]
        out = np.concatenate(blocks, axis=1)
    if pre.get("selected") is not None:
        out = np.ascontiguousarray(out[:, pre["selected"]])
    return out


def _one_hot(column: pd.Series, values: list[str]) -> np.ndarray:
    text = column.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip())
    return (text.to_numpy(dtype=object)[:, None] == np.asarray(values, dtype=object)[None, :]).astype(np.float32)


def _scaled(pre: dict, features: pd.DataFrame, numeric: list[str]) -> np.ndarray:
    try:
        X = features[numeric].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        for column in numeric:
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
        column = numeric[int(np.argwhere(~np.isfinite(out))[0][1])]
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
    select_k: int | None = None,
) -> dict:
    """Fit imputation and scaling on the train split only, as a JSON-able record.

    Every method reduces to per-feature (impute, shift, scale) vectors, so
    serving applies one formula: (clip(fill_nan(x, impute)) - shift) / scale,
    clipping to `value_range` as the clean stage did to the training rows.
    Scales that are not finite (values too large to square) stop here with
    the columns named, rather than train on NaN.
    """
    inputs = [c for c in train.columns if c != LABEL]
    categorical = [c for c in inputs if not pd.api.types.is_numeric_dtype(train[c])]
    features = [c for c in inputs if c not in categorical]  # the numeric ones, scaled
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
    pre = {
        "version": 1,
        "method": method,
        "feature_columns": inputs,
        "numeric_columns": features,
        "categories": {c: sorted(v for v in train[c].dropna().unique().tolist()) for c in categorical},
        "image_shape": list(image_shape) if image_shape else None,
        "classes": classes,
        "impute": impute.tolist(),
        "shift": shift.tolist(),
        "scale": scale.tolist(),
        "clip": list(value_range) if value_range is not None else None,
        "selected": None,
    }
    names = features + [f"{c}={v}" for c, values in pre["categories"].items() for v in values]
    if select_k is not None and select_k < len(names):
        pre["selected"], pre["selection"] = _select(pre, train, names, select_k)
    pre["n_inputs"] = len(pre["selected"]) if pre["selected"] is not None else len(names)
    return pre


def _select(pre: dict, train: pd.DataFrame, names: list[str], k: int) -> tuple[list[int], dict]:
    """The k encoded features with the most mutual information with the label on train (scikit-learn)."""
    from sklearn.feature_selection import mutual_info_classif

    X = apply_normalizer(pre, train)
    scores = mutual_info_classif(X, train[LABEL].astype(str).to_numpy(), random_state=0)
    keep = sorted(np.argsort(-scores, kind="stable")[:k].tolist())
    record = {
        "method": "mutual_info",
        "k": k,
        "of": len(names),
        "kept": [names[i] for i in keep],
        "scores": {n: round(float(v), 6) for n, v in zip(names, scores)},
    }
    return keep, record
