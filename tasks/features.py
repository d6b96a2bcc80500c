"""Which columns of a table carry signal: constant, near-constant and ID-like columns out, categoricals in.

Decided at ingest from the whole file (a column's values and their order, never
the label), so the decision is the file's, not the split's; the encoding of
the categoricals is fitted on train by normalize (tasks/preprocessing.py).
Images keep every pixel: nothing here runs for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from distilflow.params import FeaturesParams

MIN_ROWS_FOR_ID = 20  # a 10-row table's whole numbers are unique by chance


@dataclass
class ColumnPlan:
    """What ingest does with each feature column: numeric, categorical, or dropped (with the reason)."""

    numeric: dict[str, pd.Series] = field(default_factory=dict)
    categorical: dict[str, pd.Series] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    text: dict[str, object] = field(default_factory=dict)  # too many values to be a category: refused

    def report(self) -> dict:
        """The JSON record of the decisions (ingest's info; the served model's preprocessing repeats it)."""
        return {
            "numeric": list(self.numeric),
            "categorical": {c: int(s.nunique()) for c, s in self.categorical.items()},
            "dropped": dict(self.dropped),
        }


def _as_text(series: pd.Series) -> pd.Series:
    """Text values stripped, missing ones None: what a categorical column holds."""
    text = series.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip())
    return text.astype(object)


def _top_share(series: pd.Series) -> float:
    counts = series.value_counts(dropna=False)
    return float(counts.iloc[0]) / len(series) if len(series) else 1.0


def _id_like(series: pd.Series, numeric: bool) -> bool:
    """Text unique per row, or whole numbers unique per row that follow the row order or number the rows."""
    n = len(series)
    if n < MIN_ROWS_FOR_ID or series.isna().any() or series.nunique() != n:
        return False
    if not numeric:
        return True
    values = series.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        return False
    steps = np.diff(values)
    return bool(np.all(steps > 0) or np.all(steps < 0) or values.max() - values.min() + 1 == n)


def plan_columns(frame: pd.DataFrame, cfg: FeaturesParams, for_table: bool) -> ColumnPlan:
    """Sort a raw table's feature columns (label excluded) into numeric, categorical, dropped and refused text."""
    plan = ColumnPlan()
    for col in frame.columns:
        series = frame[col]
        numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
        if not numeric:
            coerced = pd.to_numeric(series, errors="coerce")
            if not (coerced.isna() & series.notna()).any():
                series, numeric = coerced, True
        name = str(col)
        if for_table:
            distinct = series.nunique(dropna=False)
            if cfg.drop_constant and distinct <= 1:
                plan.dropped[name] = "constant"
                continue
            share = _top_share(series)
            if cfg.drop_constant and share >= cfg.near_constant_share:
                plan.dropped[name] = f"near-constant ({share:.2%} one value)"
                continue
            if cfg.drop_id_like and _id_like(series, numeric):
                plan.dropped[name] = "ID-like (unique per row)"
                continue
        if numeric:
            plan.numeric[name] = series.astype(np.float64)
            continue
        text = _as_text(series)
        if for_table and text.nunique() <= cfg.max_categories:
            plan.categorical[name] = text
        else:
            plan.text[name] = series[series.notna()].iloc[0]
    return plan
