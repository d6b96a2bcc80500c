"""`distilflow add-data`: look at a new data file and propose the `data:` params that read it right.

Pure inspection (the file is read, nothing is written): separator and BOM,
label column candidates, image shape when the features are a square of
whole numbers, the observed value range, class counts and labels that look
like typos of another. The CLI (cli/add_data.py) copies the file, `dvc add`s
it and writes the proposal as a params file for the user to confirm.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from distilflow.errors import DistilflowError

LABEL_NAMES = ("label", "labels", "target", "class", "y", "category", "outcome")
PIXEL_RANGES = ((0.0, 1.0), (0.0, 16.0), (0.0, 255.0), (0.0, 65535.0))  # the usual encodings of a pixel


def _sniff(path: Path) -> tuple[str, bool]:
    from tasks.data import sniff_separator

    with open(path, "rb") as f:
        bom = f.read(3) == b"\xef\xbb\xbf"
    return (sniff_separator(path) or ",") if path.suffix.lower() == ".csv" else ",", bom


def _read(path: Path, separator: str) -> pd.DataFrame:
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, sep=separator, encoding="utf-8-sig")
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DistilflowError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def label_candidates(frame: pd.DataFrame) -> list[str]:
    """Columns that look like the label: a usual name first, then few-valued non-float columns, last first."""
    named = [c for c in frame.columns if str(c).strip().lower() in LABEL_NAMES]
    limit = max(2, min(100, len(frame) // 5))
    few = []
    for c in reversed(frame.columns):
        s = frame[c].dropna()
        whole = pd.api.types.is_integer_dtype(s) or not pd.api.types.is_numeric_dtype(s)
        if c not in named and whole and 2 <= s.nunique() <= limit:
            few.append(c)
    return [str(c) for c in named + few]


def _image_shape(features: pd.DataFrame) -> tuple[list[int] | None, list[float] | None]:
    """[s, s, 1] and the pixel range when the features are s² whole numbers in a usual pixel range."""
    n = features.shape[1]
    side = math.isqrt(n)
    if n < 16 or side * side != n or not all(pd.api.types.is_numeric_dtype(features[c]) for c in features):
        return None, None
    values = features.to_numpy(dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or not np.all(finite == np.round(finite)):
        return None, None
    lo, hi = float(finite.min()), float(finite.max())
    for low, high in PIXEL_RANGES:
        if low <= lo and hi <= high:
            return [side, side, 1], [low, high]
    return None, None


def inspect_file(path: Path, label: str | None = None) -> dict:
    """What the file looks like and the `data:` params that read it (see the module docstring)."""
    from tasks.data import normalize_label, one_edit_apart

    path = Path(path)
    if not path.is_file():
        raise DistilflowError(f"add-data: {path} is not a file")
    if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise DistilflowError(f"add-data: {path.name}: a .csv or .parquet table is expected")
    separator, bom = _sniff(path)
    frame = _read(path, separator)
    if len(frame) == 0:
        raise DistilflowError(f"add-data: {path} has a header but no rows")
    candidates = label_candidates(frame)
    if label is None:
        if not candidates:
            cols = ", ".join(map(str, frame.columns[:8]))
            raise DistilflowError(f"add-data: no column looks like the label (columns: {cols}); name it with --label")
        label = candidates[0]
    elif label not in frame.columns:
        cols = ", ".join(map(str, frame.columns[:8])) + (", ..." if len(frame.columns) > 8 else "")
        raise DistilflowError(f"add-data: --label {label!r} is not a column of {path.name} (columns: {cols})")
    labels = frame[label].map(normalize_label).dropna()
    counts = labels.astype(str).value_counts()
    features = frame.drop(columns=[label])
    manifest = "path" in features.columns
    shape, pixel_range = (None, None) if manifest else _image_shape(features)
    numeric = features.select_dtypes("number")
    finite = numeric.to_numpy(dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    typos = [
        (small, big)
        for small in counts.index
        for big in counts.index
        if counts[small] * 20 <= counts[big] and one_edit_apart(small, big)
    ]
    classes = sorted(labels.unique().tolist(), key=lambda v: (isinstance(v, str), v))
    data = {
        "source": None,  # set by the caller: where the file lands in the project
        "label_column": str(label),
        "separator": separator,
        "image_shape": shape,
        "value_range": pixel_range,
        "classes": classes if len(classes) <= 50 and not typos else None,
        "name": None,
    }
    return {
        "rows": len(frame),
        "columns": len(frame.columns),
        "bom": bom,
        "separator": separator,
        "label_candidates": candidates,
        "label": str(label),
        "manifest": manifest,
        "class_counts": {str(k): int(v) for k, v in counts.items()},
        "typos": typos,
        "observed_range": [float(finite.min()), float(finite.max())] if finite.size else None,
        "non_numeric": [str(c) for c in features.columns if c not in numeric.columns],
        "data": data,
        "normalize": {"method": "per_channel" if shape else "standard"},
        # a table has no pretrained backbone to start from: the built-in MLP, and no pretrained-vs-scratch check
        "overrides": {} if shape or manifest else {"backbone": {"spec": "builtin:cnn"}, "transfer": {"enabled": False}},
    }


def describe(report: dict) -> list[str]:
    """The inspection as the lines the CLI prints."""
    sep = {"\t": "tab", ",": "','", ";": "';'", "|": "'|'"}.get(report["separator"], repr(report["separator"]))
    lines = [
        f"rows: {report['rows']:,}, columns: {report['columns']}, separator {sep}"
        + (", UTF-8 with a BOM (handled)" if report["bom"] else ""),
        f"label column: {report['label']}"
        + (
            f" (other candidates: {', '.join(c for c in report['label_candidates'] if c != report['label'])})"
            if len(report["label_candidates"]) > 1
            else ""
        ),
        "classes: "
        + ", ".join(f"{k} ({v})" for k, v in list(report["class_counts"].items())[:20])
        + (" ..." if len(report["class_counts"]) > 20 else ""),
    ]
    d = report["data"]
    if d["image_shape"]:
        lines.append(f"images: {d['image_shape']} (the features are a square of whole numbers in {d['value_range']})")
    elif report["manifest"]:
        lines.append("an image manifest (a `path` column): set data.image_shape to the images' H, W, C")
    else:
        lines.append(
            "a table: data.image_shape null, normalize.method standard, the built-in MLP (backbone.spec "
            "builtin:cnn), transfer.enabled false"
        )
    if report["observed_range"]:
        lo, hi = report["observed_range"]
        lines.append(f"observed numeric range: [{lo:g}, {hi:g}]")
    if report["non_numeric"]:
        lines.append(f"text columns (categoricals, or refused if free text): {', '.join(report['non_numeric'][:8])}")
    for small, big in report["typos"]:
        lines.append(
            f"WARNING: class {small!r} ({report['class_counts'][small]} rows) is one edit from {big!r} "
            f"({report['class_counts'][big]} rows): a typo? data.classes is left null until you decide"
        )
    return lines
