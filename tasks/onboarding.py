"""`distilflow add-data`: look at a new data file and propose the `data:` params that read it right.

Pure inspection (the file is read, nothing is written): separator and BOM,
the label column, then (the label known) whether the other columns are an
image and in what order, the observed value range, class counts and labels
that look like typos of another. The CLI (cli/add_data.py) copies the file,
`dvc add`s it and writes the proposal as a params file for the user to confirm.

How the label column is chosen (`rank_label_candidates`, `choose_label`): a
candidate is a column named like a label, or one with few values (whole
numbers or text). Each scores the evidence a person would weigh:

- its name is a label's (`label`, `target`, `class`, `y`, `digit`, `diagnosis`, ...): +4;
  one of those as a word of its name (`target_class`, `DiagnosisCode`): +2;
- it is the first or the last column: +1;
- it is one of a run of numbered columns with one prefix (`p0..p783`, `px_12`): -3;
- it shares its value range with many other columns (pixels, one-hot flags): -2.

The best candidate is the label when its score is positive and at least
`CLEAR_LEAD` ahead of the next; otherwise add-data stops and asks for
`--label`, naming the candidates, rather than guess.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from distilflow.errors import DistilflowError
from tasks.data import normalize_label, similar_label_pairs, sniff_separator

LABEL_NAMES = ("label", "labels", "target", "class", "classes", "y", "digit", "diagnosis", "category", "outcome")
PIXEL_RANGES = ((0.0, 1.0), (0.0, 16.0), (0.0, 255.0), (0.0, 65535.0))  # the usual encodings of a pixel
# the evidence's points (module docstring); a lead of 2 means more than the position alone
NAME, NAME_WORD, EDGE, IN_RUN, SHARED_RANGE = 4, 2, 1, -3, -2
RUN_MIN = 4  # numbered columns with one prefix that make a run (p0, p1, p2, p3)
SHARED_MIN = 5  # columns with one [min, max] that make a block (pixels, flags)
CLEAR_LEAD = 2
MAX_CLASSES_PROPOSED = 50  # more classes than this: data.classes is left null (any label)
NUMBERED = re.compile(r"(.*?)(\d+)")


def _sniff(path: Path) -> tuple[str, bool]:
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


def _numbered_runs(columns: list[str]) -> dict[str, str]:
    """{column: its run, as `p0..p783`} for the columns in a run of `RUN_MIN` or more numbered names."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for c in columns:
        m = NUMBERED.fullmatch(c)
        if m:
            groups.setdefault(m.group(1), []).append((int(m.group(2)), c))
    runs = {}
    for members in groups.values():
        if len(members) >= RUN_MIN:
            span = f"{min(members)[1]}..{max(members)[1]}"
            runs |= {c: span for _, c in members}
    return runs


def _shared_ranges(frame: pd.DataFrame) -> dict[str, tuple[int, float, float]]:
    """{numeric column: (how many columns have its [min, max], min, max)}."""
    numeric = frame.select_dtypes("number")
    if numeric.shape[1] == 0:
        return {}
    ranges = {str(c): (float(lo), float(hi)) for c, lo, hi in zip(numeric.columns, numeric.min(), numeric.max())}
    sizes = Counter(ranges.values())
    return {c: (sizes[r], *r) for c, r in ranges.items()}


def _name_evidence(name: str) -> tuple[int, str | None]:
    lowered = name.strip().lower()
    if lowered in LABEL_NAMES:
        return NAME, "named like a label"
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name.strip()).lower())
    if any(w in LABEL_NAMES and len(w) > 1 for w in words):  # `y` as a word is as often a coordinate
        return NAME_WORD, "a label's name in its name"
    return 0, None


def _evidence(name: str, position: str | None, run: str | None, shared: tuple | None) -> tuple[int, list[str]]:
    """(score, the reasons in words) for one candidate column."""
    score, named = _name_evidence(name)
    why = [named] if named else []
    if position:
        score += EDGE
        why.append(f"the {position} column")
    if run:
        score += IN_RUN
        why.append(f"one of the numbered columns {run}")
    if shared and shared[0] >= SHARED_MIN:
        score += SHARED_RANGE
        why.append(f"one of {shared[0]} columns in [{shared[1]:g}, {shared[2]:g}]")
    return score, why


def rank_label_candidates(frame: pd.DataFrame) -> list[dict]:
    """The columns that could be the label, best first: {"column", "score", "why"} (see the module docstring)."""
    columns = [str(c) for c in frame.columns]
    runs, shared, distinct = _numbered_runs(columns), _shared_ranges(frame), frame.nunique()
    limit = max(2, min(100, len(frame) // 5))
    ranked = []
    for i, (name, raw) in enumerate(zip(columns, frame.columns)):
        s = frame[raw]
        whole = pd.api.types.is_integer_dtype(s) or not pd.api.types.is_numeric_dtype(s)
        if not _name_evidence(name)[0] and not (whole and 2 <= distinct[raw] <= limit):
            continue
        position = "first" if i == 0 else "last" if i == len(columns) - 1 else None
        score, why = _evidence(name, position, runs.get(name), shared.get(name))
        ranked.append({"column": name, "score": score, "why": why})
    return sorted(ranked, key=lambda r: -r["score"])  # stable: equal scores keep the file's order


def _said(candidate: dict) -> str:
    return f"{candidate['column']!r} ({'; '.join(candidate['why']) or 'few values'})"


def choose_label(ranked: list[dict], columns: list[str]) -> str:
    """The best candidate, or a DistilflowError asking for `--label` when none is clearly the label."""
    if not ranked:
        shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
        raise DistilflowError(f"add-data: no column looks like the label (columns: {shown}); name it with --label")
    best = ranked[0]
    if best["score"] <= 0:
        names = ", ".join(repr(r["column"]) for r in ranked[:4]) + (", ..." if len(ranked) > 4 else "")
        raise DistilflowError(
            f"add-data: no column is clearly the label: {names} have few values, but none is named like a label "
            "or placed first or last; name it with --label"
        )
    if len(ranked) > 1 and best["score"] - ranked[1]["score"] < CLEAR_LEAD:
        raise DistilflowError(
            f"add-data: the label could be {_said(best)} or {_said(ranked[1])}; name it with --label "
            f"{best['column']} (or --label {ranked[1]['column']})"
        )
    return best["column"]


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


def image_columns(columns: list[str]) -> dict:
    """Which columns form the image, as read (file order): {"count", "first", "last", "numbered_in_order", "odd"}.

    `numbered_in_order` is False when the file does not list the pixels in their numbers' order (p0, p10,
    p100, ...): the image is read in file order all the same. `odd` names the columns outside the pixels'
    numbered run (`digit` among p0..p782 when the label column is wrong).
    """
    found = [NUMBERED.fullmatch(c) for c in columns]
    prefixes = Counter(m.group(1) for m in found if m)
    prefix = prefixes.most_common(1)[0][0] if prefixes else None
    pixels = [int(m.group(2)) for m in found if m and m.group(1) == prefix]
    numbered = len(pixels) * 2 > len(columns)  # most columns are one run: the others stand out
    odd = [c for c, m in zip(columns, found) if not (m and m.group(1) == prefix)] if numbered else []
    return {
        "count": len(columns),
        "first": columns[0],
        "last": columns[-1],
        "numbered_in_order": not numbered or pixels == sorted(pixels),
        "odd": odd,
    }


def _proposed_classes(labels: pd.Series, typos: list) -> list | None:
    """data.classes: the labels seen, less the likely typos (they then count as invalid labels and are dropped).

    With typos found it is always written: left null, clean.similar_labels: fail would stop the run.
    """
    suspects = {small for small, *_ in typos}
    classes = sorted(labels.unique().tolist(), key=lambda v: (isinstance(v, str), v))
    if typos:
        return [c for c in classes if str(c) not in suspects]
    return classes if len(classes) <= MAX_CLASSES_PROPOSED else None


def _checked_path(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DistilflowError(f"add-data: {path} is not a file")
    if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise DistilflowError(f"add-data: {path.name}: a .csv or .parquet table is expected")
    return path


def inspect_file(path: Path, label: str | None = None) -> dict:
    """What the file looks like and the `data:` params that read it (see the module docstring)."""
    path = _checked_path(path)
    separator, bom = _sniff(path)
    frame = _read(path, separator)
    if len(frame) == 0:
        raise DistilflowError(f"add-data: {path} has a header but no rows")
    frame.columns = [str(c) for c in frame.columns]
    ranked = rank_label_candidates(frame)
    given = label is not None
    if not given:
        label = choose_label(ranked, list(frame.columns))
    elif label not in frame.columns:
        cols = ", ".join(frame.columns[:8]) + (", ..." if len(frame.columns) > 8 else "")
        raise DistilflowError(f"add-data: --label {label!r} is not a column of {path.name} (columns: {cols})")
    labels = frame[label].map(normalize_label).dropna()
    counts = labels.astype(str).value_counts()
    typos = similar_label_pairs(counts.to_dict())
    features = frame.drop(columns=[label])  # the image check comes once the label is known
    manifest = "path" in features.columns
    shape, pixel_range = (None, None) if manifest else _image_shape(features)
    numeric = features.select_dtypes("number")
    finite = numeric.to_numpy(dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    data = {
        "source": None,  # set by the caller: where the file lands in the project
        "label_column": label,
        "separator": separator,
        "image_shape": shape,
        "value_range": pixel_range,
        "classes": _proposed_classes(labels, typos),
        "name": None,
    }
    return {
        "rows": len(frame),
        "columns": len(frame.columns),
        "bom": bom,
        "separator": separator,
        "label_candidates": [r for r in ranked if r["column"] != label],
        "label": label,
        "label_why": ["given with --label"] if given else next(r["why"] for r in ranked if r["column"] == label),
        "manifest": manifest,
        "image_columns": image_columns(list(features.columns)) if shape else None,
        "class_counts": {str(k): int(v) for k, v in counts.items()},
        "typos": typos,
        "observed_range": [float(finite.min()), float(finite.max())] if finite.size else None,
        "non_numeric": [str(c) for c in features.columns if c not in numeric.columns],
        "data": data,
        "normalize": {"method": "per_channel" if shape else "standard"},
        # a table has no pretrained backbone to start from: the built-in MLP, and no pretrained-vs-scratch check
        "overrides": {} if shape or manifest else {"backbone": {"spec": "builtin:cnn"}, "transfer": {"enabled": False}},
    }


def _label_lines(report: dict) -> list[str]:
    given = report["label_why"] == ["given with --label"]
    lines = [f"label column: {report['label']} ({'; '.join(report['label_why']) or 'few values'})"]
    others = report["label_candidates"]
    if others and not given:
        shown = ", ".join([_said(others[0])] + [r["column"] for r in others[1:3]])
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        lines.append(f"  other candidates: {shown}{more}; --label names another")
    return lines


def _image_lines(report: dict) -> list[str]:
    d, cols = report["data"], report["image_columns"]
    lines = [
        f"images: {d['image_shape']} from the {cols['count']} columns {cols['first']} … {cols['last']}, in the "
        f"file's order, row by row (H, then W, then C); whole numbers in {d['value_range']}"
    ]
    if cols["odd"]:
        shown = ", ".join(cols["odd"][:3]) + (f" and {len(cols['odd']) - 3} more" if len(cols["odd"]) > 3 else "")
        lines.append(
            f"WARNING: {shown} {'is' if len(cols['odd']) == 1 else 'are'} in the image but not numbered like the "
            "other columns: is the label column right?"
        )
    if not cols["numbered_in_order"]:
        lines.append(
            "WARNING: the pixel columns are not in their numbers' order: the images are read in the file's order; "
            "reorder the file's columns if that is wrong"
        )
    return lines


def describe(report: dict) -> list[str]:
    """The inspection as the lines the CLI prints."""
    sep = {"\t": "tab", ",": "','", ";": "';'", "|": "'|'"}.get(report["separator"], repr(report["separator"]))
    lines = [
        f"rows: {report['rows']:,}, columns: {report['columns']}, separator {sep}"
        + (", UTF-8 with a BOM (handled)" if report["bom"] else ""),
        *_label_lines(report),
        "classes: "
        + ", ".join(f"{k} ({v})" for k, v in list(report["class_counts"].items())[:20])
        + (" ..." if len(report["class_counts"]) > 20 else ""),
    ]
    if report["data"]["image_shape"]:
        lines += _image_lines(report)
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
    for small, n_small, big, n_big in report["typos"]:
        lines.append(
            f"WARNING: class {small!r} ({n_small} rows) is one edit from {big!r} ({n_big} rows): a typo? "
            f"data.classes leaves it out, so its rows count as invalid labels and are dropped; add it to "
            "data.classes if it is a real class"
        )
    return lines
