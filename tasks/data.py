"""Data stages: ingest → clean → stratified split → normalize.

The functions at the top are pure (tables and params in, tables and records
out) and know nothing of Prefect; the `*_stage` functions below them are the
edges that read and write paths, called alike by the Prefect tasks
(at the foot of this module) and by DVC (`python -m distilflow stage NAME`).
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd

from distilflow.errors import DistilflowError
from distilflow.hashing import file_md5, frame_hash
from distilflow.io import atomic_path, read_table, write_json, write_table
from distilflow.params import CleanParams, DataParams, FeaturesParams, SplitParams
from distilflow.records import StageResult
from tasks.dataset import cleaning_table
from tasks.features import ColumnPlan, plan_columns
from tasks.preprocessing import fit_normalizer
from tasks.splits import LABEL, SPLITS, row_keys, stratified_split

log = logging.getLogger("distilflow.data")
DROP_RULES = (
    "missing_label",
    "invalid_label",
    "nonfinite",
    "out_of_range",
    "conflicting_labels",
    "duplicates",
    "rare_classes",
)
SIMILAR_LABEL_RATIO = 10  # a text class this many times smaller than one a single edit away reads as its typo

# ----------------------------------------------------------------------------
# ingest


def export_digits(path: str | Path) -> Path:
    """Write scikit-learn's bundled digits as a raw CSV (64 pixel columns + label).

    The output is byte-for-byte deterministic, so the md5 committed in
    data/raw/digits.csv.dvc matches on every machine.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    df = pd.DataFrame(digits.data.astype(np.int64), columns=[f"px{i}" for i in range(64)])
    df[LABEL] = digits.target
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def sniff_separator(path: Path) -> str | None:
    """The field separator a CSV's first lines suggest (`,` `;` tab `|`), or None."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            sample = handle.read(64 * 1024)
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _read_any(path: Path, separator: str = ",") -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":  # utf-8-sig: a byte-order mark (Excel's) is not part of the first column's name
            return pd.read_csv(path, sep=separator, encoding="utf-8-sig")
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DistilflowError(f"data.source {path} is empty: no header and no rows") from None
    except Exception as exc:  # pandas/pyarrow raise many types for a corrupt file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistilflowError(f"data.source {path} could not be read as {suffix[1:]}: {reason}") from None
    raise DistilflowError(
        f"data.source {path}: unsupported file type '{suffix}' (use .csv, .parquet, or a CSV manifest)"
    )


def _load_images(manifest: pd.DataFrame, base: Path, data: DataParams) -> pd.DataFrame:
    """Read the image files a manifest names into pixel columns (H, W, C order)."""
    from PIL import Image, UnidentifiedImageError

    if data.image_shape is None:
        raise DistilflowError(f"data.source is an image manifest ('{data.path_column}' column): set data.image_shape")
    h, w, c = data.image_shape
    mode = {1: "L", 3: "RGB"}.get(c)
    if mode is None:
        raise DistilflowError(f"data.image_shape: images need 1 or 3 channels, got {c}")
    rows = []
    for rel in manifest[data.path_column].astype(str):
        p = Path(rel) if Path(rel).is_absolute() else base / rel
        try:
            with Image.open(p) as img:
                arr = np.asarray(img.convert(mode).resize((w, h)), dtype=np.float64)
        except FileNotFoundError:
            raise DistilflowError(f"image listed in the manifest not found: {p}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise DistilflowError(f"image listed in the manifest could not be read: {p} ({exc})") from None
        rows.append(arr.reshape(-1))
    pixels = pd.DataFrame(
        np.stack(rows) if rows else np.zeros((0, h * w * c)), columns=[f"px{i}" for i in range(h * w * c)]
    )
    return pd.concat([pixels, manifest[[data.label_column]].reset_index(drop=True)], axis=1)


def read_raw(
    source: str | Path, data: DataParams, columns: FeaturesParams | None = None, plan_out: list | None = None
) -> pd.DataFrame:
    """Read a raw table (CSV/Parquet) or image manifest into `label` + feature columns.

    Labels are kept as raw text (normalised later by `clean`); every check that
    can reject the file whole happens here, before anything is written. For a
    table (no `data.image_shape`), `columns` (params' `features:`) drops
    constant, near-constant and ID-like columns and keeps few-valued text
    columns as categoricals; the plan is appended to `plan_out` when given.
    """
    path = Path(source)
    if not path.exists():
        raise DistilflowError(f"data.source not found: {path}")
    if not path.is_file():
        raise DistilflowError(f"data.source is not a file: {path}")
    df = _read_any(path, data.separator)
    if data.label_column not in df.columns:
        raise _no_label_column(path, df, data)
    if data.path_column in df.columns:
        df = _load_images(df, path.parent, data)
    if len(df) == 0:
        raise DistilflowError(f"data.source {path} has a header but no rows")
    features = [c for c in df.columns if c != data.label_column]
    if not features:
        raise DistilflowError(f"data.source {path} has no feature columns besides '{data.label_column}'")
    table_cfg = columns or FeaturesParams()
    plan = plan_columns(df[features], table_cfg, for_table=data.image_shape is None)
    if plan.text:
        shown = ", ".join(f"'{k}' (e.g. {v!r})" for k, v in list(plan.text.items())[:5])
        why = (
            f" (more than features.max_categories={table_cfg.max_categories} distinct values: not a category)"
            if data.image_shape is None
            else " (data.image_shape is set: every column is a pixel)"
        )
        raise DistilflowError(
            f"non-numeric feature columns in {path}: {shown}{' ...' if len(plan.text) > 5 else ''}{why}"
        )
    if not plan.numeric and not plan.categorical:
        raise DistilflowError(
            f"data.source {path}: every feature column was dropped ({_dropped_text(plan)}); "
            "see features.drop_constant and features.drop_id_like"
        )
    if data.image_shape is not None:
        h, w, c = data.image_shape
        if len(plan.numeric) != h * w * c:
            raise DistilflowError(
                f"{path} has {len(plan.numeric)} feature columns, but data.image_shape {list(data.image_shape)} "
                f"needs {h * w * c}"
            )
    table = pd.DataFrame({**plan.numeric, **plan.categorical})[
        [str(c) for c in features if str(c) in plan.numeric or str(c) in plan.categorical]
    ]
    raw_labels = df[data.label_column]
    table.insert(0, LABEL, raw_labels.where(raw_labels.notna(), None).map(lambda v: None if v is None else str(v)))
    if plan_out is not None:
        plan_out.append(plan)
    return table


def _no_label_column(path: Path, df: pd.DataFrame, data: DataParams) -> DistilflowError:
    """The error for a missing label column: most often a wrong separator, which it names."""
    sniffed = sniff_separator(path) if path.suffix.lower() == ".csv" else None
    if sniffed and sniffed != data.separator:
        shown = {"\t": "tab"}.get(sniffed, repr(sniffed))
        return DistilflowError(
            f"label column '{data.label_column}' not found in {path}: the file looks {shown}-separated, not "
            f"{data.separator!r} (its header reads as {len(df.columns)} column(s)); set data.separator: "
            f"{sniffed!r}"
        )
    cols = ", ".join(map(str, df.columns[:8])) + (", ..." if len(df.columns) > 8 else "")
    return DistilflowError(
        f"label column '{data.label_column}' not found in {path} (columns: {cols}); set data.label_column"
    )


def _dropped_text(plan: ColumnPlan) -> str:
    return ", ".join(f"{c}: {why}" for c, why in list(plan.dropped.items())[:8]) + (
        " ..." if len(plan.dropped) > 8 else ""
    )


# ----------------------------------------------------------------------------
# clean


def normalize_label(value) -> int | str | None:
    """' 7 ' → 7, '7.0' → 7, 'Cat ' → 'cat', '' / NaN → None (missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if not text or text.lower() in ("nan", "none", "null"):
        return None
    try:
        number = float(text)
    except ValueError:
        return text.lower()
    if math.isfinite(number) and number.is_integer():
        return int(number)
    return text.lower()


def _feature_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c != LABEL]


def clean_table(
    df: pd.DataFrame,
    clean: CleanParams,
    classes: list | None,
    value_range: tuple[float, float] | None,
    min_per_class: int,
) -> tuple[pd.DataFrame, dict]:
    """Apply each cleaning rule in turn and count what it did.

    Order matters: conflicts are resolved by majority *before* exact duplicates
    are collapsed, so three rows saying 7 outvote one row saying 1. The report
    satisfies rows_in - sum(dropped) == rows_out. Each rule narrows one row
    mask and edits the feature matrix in place; rows are copied once, at the
    end, so peak memory stays near two copies of the table (bench/data_scale.py).
    """
    dropped = dict.fromkeys(DROP_RULES, 0)
    modified = {"cells_clipped": 0, "cells_to_impute": 0, "rows_to_impute": 0}
    features = _feature_columns(df)
    categorical = [c for c in features if not pd.api.types.is_numeric_dtype(df[c])]  # tables' categoricals: text
    numeric = [c for c in features if c not in categorical]
    rows_in = len(df)

    labels, keep = _known_labels(df[LABEL], classes, dropped)
    X = df[numeric].to_numpy(dtype=np.float64, copy=True)  # ours to edit in place
    C = df[categorical].reset_index(drop=True) if categorical else None
    del df  # the caller's frame need not outlive this point (clean_stage passes it straight in)

    keep = _nonfinite_rule(X, keep, clean, dropped, modified)
    if value_range is not None:
        keep = _value_range_rule(X, keep, value_range, clean, dropped, modified)
    rows, y = _distinct_rows(X, C, labels, keep, clean, dropped)
    if classes is None and clean.similar_labels == "fail":
        _refuse_similar_labels(pd.Series(y).value_counts())
    rows, y, rare_classes = _rare_class_rule(rows, y, clean, min_per_class, dropped)

    X = X[rows] if len(rows) < len(X) else X  # the one copy of the rows that stay
    out = pd.DataFrame(X, columns=numeric, copy=False)
    if C is not None:
        for col in categorical:
            out[col] = C[col].to_numpy(dtype=object)[rows]
        out = out[features]
    out.insert(0, LABEL, y)
    _check_enough_left(out, rows_in, dropped)
    report = {
        "rows_in": rows_in,
        "rows_out": len(out),
        "dropped": dropped,
        "modified": modified,
        "rare_classes_dropped": rare_classes if clean.rare_classes == "drop" else {},
        "class_counts": {str(k): int(v) for k, v in out[LABEL].value_counts().sort_index().items()},
    }
    return out, report


def _known_labels(raw: pd.Series, classes: list | None, dropped: dict) -> tuple[np.ndarray, np.ndarray]:
    """(normalised labels, the rows whose label is present and, with `data.classes` set, one of them)."""
    labels = raw.map(normalize_label)
    keep = labels.notna().to_numpy().copy()  # pandas 3 hands out read-only views
    dropped["missing_label"] = int((~keep).sum())
    if classes is not None:
        allowed = {normalize_label(c) for c in classes}
        valid = labels.map(lambda v: v in allowed).to_numpy()
        dropped["invalid_label"] = int((keep & ~valid).sum())
        keep &= valid
    return labels.to_numpy(dtype=object), keep


def _nonfinite_rule(X: np.ndarray, keep: np.ndarray, clean: CleanParams, dropped: dict, modified: dict) -> np.ndarray:
    """Rows with NaN/inf features: dropped, or left as NaN for the normalizer to impute."""
    finite = np.isfinite(X)
    bad_rows = ~finite.all(axis=1)
    if clean.nonfinite == "drop":
        dropped["nonfinite"] = int((keep & bad_rows).sum())
        return keep & ~bad_rows
    # impute: leave NaN for the normalizer to fill with the *train* median (no leakage)
    modified["cells_to_impute"] = int((~finite[keep]).sum())
    modified["rows_to_impute"] = int((keep & bad_rows).sum())
    X[~finite] = np.nan  # ±inf too
    return keep


def _value_range_rule(
    X: np.ndarray,
    keep: np.ndarray,
    value_range: tuple[float, float],
    clean: CleanParams,
    dropped: dict,
    modified: dict,
) -> np.ndarray:
    """Values outside `data.value_range`: clipped or their rows dropped; a large share stops the run."""
    lo, hi = value_range
    with np.errstate(invalid="ignore"):
        outside = lo > X
        outside |= hi < X
    share = float(outside[keep].sum()) / max(1, int(keep.sum()) * X.shape[1])
    if share > clean.max_out_of_range_share:
        observed = X[keep][np.isfinite(X[keep])]
        raise DistilflowError(
            f"{share:.1%} of the feature values fall outside data.value_range [{lo:g}, {hi:g}] (observed "
            f"[{observed.min():g}, {observed.max():g}]): set data.value_range to the data's range "
            f"(e.g. [{np.floor(observed.min()):g}, {np.ceil(observed.max()):g}]) or null, or raise "
            f"clean.max_out_of_range_share ({clean.max_out_of_range_share:g}) if clipping them is intended"
        )
    if clean.out_of_range == "drop":
        rows = outside.any(axis=1)
        dropped["out_of_range"] = int((keep & rows).sum())
        return keep & ~rows
    modified["cells_clipped"] = int(outside[keep].sum())
    np.clip(X, lo, hi, out=X)  # NaN stays NaN
    return keep


def _distinct_rows(
    X: np.ndarray, C: pd.DataFrame | None, labels: np.ndarray, keep: np.ndarray, clean: CleanParams, dropped: dict
) -> tuple[np.ndarray, np.ndarray]:
    """(kept row indices, their labels) once conflicting labels are resolved and exact duplicates collapsed."""
    # row hashes of every row, then only the kept ones: a row's hash does not depend on the others
    fkey = row_keys(pd.DataFrame(X, copy=False) if C is None else pd.concat([pd.DataFrame(X, copy=False), C], axis=1))
    rows = np.flatnonzero(keep)
    y = _uniform_labels(labels[rows])
    conflict_free = _resolve_conflicts(fkey[rows], y, clean.conflicting_labels)
    dropped["conflicting_labels"] = int((~conflict_free).sum())
    rows, y = rows[conflict_free], y[conflict_free]
    if clean.drop_duplicates:
        dup = pd.DataFrame({"k": fkey[rows], "y": y}).duplicated().to_numpy()
        dropped["duplicates"] = int(dup.sum())
        rows, y = rows[~dup], y[~dup]
    return rows, y


def _rare_class_rule(
    rows: np.ndarray, y: np.ndarray, clean: CleanParams, min_per_class: int, dropped: dict
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Classes too small to stratify: their rows dropped (returned as {class: rows}), or the run stopped."""
    need = max(min_per_class, clean.min_samples_per_class)
    counts = pd.Series(y).value_counts()
    rare = counts[counts < need]
    rare_classes = {str(k): int(v) for k, v in rare.items()}
    if not len(rare):
        return rows, y, rare_classes
    if clean.rare_classes == "fail":
        raise DistilflowError(
            f"too few samples to stratify: classes {rare_classes} have fewer than {need} rows "
            "(the split needs one per part); add data, or set clean.rare_classes=drop"
        )
    rare_rows = np.isin(y, rare.index.to_numpy())
    dropped["rare_classes"] = int(rare_rows.sum())
    return rows[~rare_rows], y[~rare_rows], rare_classes


def _check_enough_left(out: pd.DataFrame, rows_in: int, dropped: dict) -> None:
    """Cleaning that leaves no rows, or one class, stops the run saying what it dropped."""
    if len(out) == 0:
        raise DistilflowError(
            f"no rows left after cleaning ({rows_in} in): {_nonzero(dropped)}; check data.classes and data.value_range"
        )
    n_classes = out[LABEL].nunique()
    if n_classes < 2:
        raise DistilflowError(
            f"only {n_classes} class left after cleaning ({_nonzero(dropped)}); a classifier needs at least 2"
        )


def one_edit_apart(a: str, b: str) -> bool:
    """Whether one insertion, deletion or substitution turns `a` into `b` (case already folded)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def similar_label_pairs(counts: dict) -> list[tuple[str, int, str, int]]:
    """(small, its rows, big, its rows) for each text label one edit from a class `SIMILAR_LABEL_RATIO` times its size.

    `benigh` (4 rows) beside `benign` (200) is a typo, not a class. Only words count: numbers are not
    misspelt that way, and any two one-digit classes are one edit apart, so an imbalanced 0/1 label would be
    refused. The clean stage (clean.similar_labels: fail) and add-data both apply this rule.
    """
    words = [(str(k), int(v)) for k, v in counts.items() if _is_word(k)]
    return [
        (small, n_small, big, n_big)
        for small, n_small in words
        for big, n_big in words
        if n_big >= SIMILAR_LABEL_RATIO * n_small and one_edit_apart(small, big)
    ]


def _is_word(label) -> bool:
    try:
        float(str(label))
    except ValueError:
        return True
    return False


def _refuse_similar_labels(counts: pd.Series) -> None:
    """Stop the run naming every likely typo (`similar_label_pairs`), with the two ways to decide."""
    pairs = similar_label_pairs(counts.to_dict())
    if pairs:
        named = "; ".join(f"label {s!r} ({n} rows) is one edit away from {b!r} ({m} rows)" for s, n, b, m in pairs)
        raise DistilflowError(
            f"{named}: {'a typo' if len(pairs) == 1 else 'typos'}? Set data.classes to the intended labels (then "
            "typos count as invalid labels and are dropped), or set clean.similar_labels: keep if they are real "
            "classes"
        )


def _nonzero(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if v) or "nothing dropped"


def _uniform_labels(y: np.ndarray) -> np.ndarray:
    """All-int labels stay ints; any mix becomes strings (parquet needs one type)."""
    if all(isinstance(v, int) for v in y):
        return y.astype(np.int64)
    return np.array([str(v) for v in y], dtype=object)


def _resolve_conflicts(fkey: np.ndarray, y: np.ndarray, mode: str) -> np.ndarray:
    """Rows to keep where identical features carry different labels.

    A group keeps only its strict-majority label's rows (mode 'majority'), or
    is dropped whole when there is none or mode is 'drop'.
    """
    frame = pd.DataFrame({"k": fkey, "y": y})
    conflicted = (frame.groupby("k")["y"].transform("nunique") > 1).to_numpy()
    keep = np.ones(len(frame), dtype=bool)
    if not conflicted.any():
        return keep
    keep[conflicted] = False
    if mode == "majority":
        sub = frame[conflicted]
        counts = sub.groupby(["k", "y"]).size().rename("n").reset_index()
        counts["group"] = counts.groupby("k")["n"].transform("sum")
        winners = counts.loc[counts["n"] * 2 > counts["group"], ["k", "y"]]
        merged = sub.merge(winners, on=["k", "y"], how="left", indicator=True)
        keep[conflicted] = (merged["_merge"] == "both").to_numpy()
    return keep


# ----------------------------------------------------------------------------
# stages: path in, path out (the same functions for Prefect and DVC; see distilflow/stages.py)


def ingest_stage(source: Path, ingested: Path, data: DataParams, features: FeaturesParams | None = None) -> StageResult:
    """Read the raw table or image manifest into `label` + features (tables: columns dropped or kept as categories)."""
    plans: list[ColumnPlan] = []
    table = read_raw(source, data, features, plans)
    write_table(table, ingested)
    md5 = file_md5(source)
    columns = plans[0].report()
    if columns["dropped"]:
        log.warning(f"dropped feature columns: {_dropped_text(plans[0])}")
    lines = [f"- `{c}`: dropped, {why}" for c, why in columns["dropped"].items()]
    lines += [
        f"- `{c}`: categorical, {n} values (one-hot on train's values)" for c, n in columns["categorical"].items()
    ]
    return StageResult(
        metrics={
            "rows": len(table),
            "features": table.shape[1] - 1,
            "columns.dropped": len(columns["dropped"]),
            "columns.categorical": len(columns["categorical"]),
        },
        params={"source": str(source), "label_column": data.label_column, "image_shape": str(data.image_shape)},
        tags={"data_md5": md5},
        texts={"columns.md": "# Feature columns\n\n" + "\n".join(lines) + "\n"} if lines else {},
        info={"rows": len(table), "data_md5": md5, "columns": {k: v for k, v in columns.items() if k != "numeric"}},
    )


def clean_stage(
    ingested: Path,
    cleaned: Path,
    cleaning_report: Path,
    clean: CleanParams,
    classes: list | None,
    value_range: tuple[float, float] | None,
    min_per_class: int,
) -> StageResult:
    """Apply the cleaning rules; the report counts what each did (`min_per_class`: one row per split part)."""
    table, report = clean_table(read_table(ingested), clean, classes, value_range, min_per_class)
    write_table(table, cleaned)
    write_json(report, cleaning_report)
    if report["rare_classes_dropped"]:
        log.warning(f"dropped classes too small to stratify (class: rows): {report['rare_classes_dropped']}")
    metrics = {"rows_in": report["rows_in"], "rows_out": report["rows_out"]}
    metrics |= {f"dropped.{k}": v for k, v in report["dropped"].items()}
    metrics |= {f"modified.{k}": v for k, v in report["modified"].items()}
    return StageResult(
        metrics=metrics,
        params=clean.model_dump(mode="json"),
        artifacts=[str(cleaning_report)],
        texts={"cleaning_report.md": cleaning_table(report)},
        info=report,
    )


def split_stage(
    cleaned: Path, train: Path, val: Path, test: Path, split_report: Path, split: SplitParams, seed: int
) -> StageResult:
    """The frozen, stratified train/val/test split."""
    parts = stratified_split(read_table(cleaned), split, seed)
    report = {"sizes": {}, "hashes": {}, "class_counts": {}}
    paths = dict(zip(SPLITS, (train, val, test)))
    with ExitStack() as moves:  # all three files are written before any replaces its old version
        for name, frame in parts.items():
            frame.to_parquet(moves.enter_context(atomic_path(paths[name])), index=False)
    for name, frame in parts.items():
        report["sizes"][name] = len(frame)
        report["hashes"][name] = frame_hash(frame)
        report["class_counts"][name] = {str(k): int(v) for k, v in frame[LABEL].value_counts().sort_index().items()}
    write_json(report, split_report)
    return StageResult(
        metrics={f"rows.{k}": v for k, v in report["sizes"].items()},
        params=split.model_dump(mode="json") | {"seed": seed},
        tags={f"split_hash.{k}": v for k, v in report["hashes"].items()},
        artifacts=[str(split_report)],
        info=report,
    )


def normalize_stage(
    train: Path,
    preprocessor: Path,
    method: str,
    image_shape: tuple[int, int, int] | None,
    value_range: tuple[float, float] | None,
    select_k: int | None = None,
) -> StageResult:
    """Fit imputation, scaling, categoricals' one-hot and (select_k) the feature selection on the train split."""
    pre = fit_normalizer(read_table(train), method, image_shape, value_range, select_k)
    write_json(pre, preprocessor)
    info = {"method": method, "n_features": pre["n_inputs"], "classes": pre["classes"]}
    if pre.get("selection"):
        info["selection"] = pre["selection"]
        log.info(f"kept {len(pre['selected'])} of {pre['selection']['of']} features by mutual information (train)")
    return StageResult(
        metrics={"n_features": pre["n_inputs"], "n_classes": len(pre["classes"])},
        params={"method": method, "select_k": select_k},
        artifacts=[str(preprocessor)],
        info=info,
    )
