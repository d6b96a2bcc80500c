"""Row selection by content: the frozen stratified split and label budgets.

Every choice here depends only on a row's content and a salt (or a seed),
never on row order, machine or library RNG state.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

from distilflow.errors import DistilflowError
from distilflow.params import SplitParams
from tasks.preprocessing import LABEL  # the one name of the label column

SPLITS = ("train", "val", "test")


def row_keys(frame: pd.DataFrame, salt: int | str | None = None) -> np.ndarray:
    """One uint64 per row from its content; a salt gives a different, stable order.

    pandas' own `hash_key` only salts string columns, so the salt is mixed in
    explicitly: XOR, then pandas' uint64 mixing function.
    """
    keys = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    if salt is None:
        return keys
    mixed = int.from_bytes(hashlib.sha256(str(salt).encode()).digest()[:8], "little")
    return pd.util.hash_array(keys ^ np.uint64(mixed))


def _quota(n: int, fraction: float) -> int:
    return 0 if fraction == 0 else max(1, math.floor(n * fraction + 0.5))


def _rank_within_class(y: np.ndarray, key: np.ndarray) -> np.ndarray:
    frame = pd.DataFrame({"y": y, "k": key})
    frame = frame.sort_values(["y", "k"], kind="stable")
    ranks = frame.groupby("y", sort=False).cumcount()
    return ranks.reindex(range(len(y))).to_numpy()


def stratified_split(df: pd.DataFrame, split: SplitParams, seed: int) -> dict[str, pd.DataFrame]:
    """Per-class train/val/test split by salted content hash.

    Each row's place depends only on its own content and the salt, never on
    row order, machine or library RNG, so the test split is frozen: the same
    cleaned data gives the same test rows everywhere. `split.test_seed` salts
    the test choice; `seed` salts train/val among the rest.
    """
    y = df[LABEL].to_numpy()
    counts = df[LABEL].value_counts()
    small = counts[counts < split.n_parts]
    if len(small):
        raise DistilflowError(
            f"too few samples to stratify: classes { ({str(k): int(v) for k, v in small.items()}) } "
            f"have fewer than {split.n_parts} rows (one per split part)"
        )
    n_per_row = counts.reindex(y).to_numpy()
    n_test = np.array([_quota(n, split.test) for n in n_per_row])
    n_val = np.array([_quota(n, split.val) for n in n_per_row])
    if np.any(n_per_row - n_test - n_val < 1):
        raise DistilflowError("split.train is too small: some class gets no training rows; raise split.train")

    test_key = row_keys(df, salt=split.test_seed)
    rank = _rank_within_class(y, test_key)
    is_test = rank < n_test
    val_key = row_keys(df, salt=f"trainval-{seed}")
    rest = ~is_test
    rank_rest = np.full(len(df), -1)
    rank_rest[rest] = _rank_within_class(y[rest], val_key[rest])
    is_val = rest & (rank_rest < n_val)
    part = np.where(is_test, "test", np.where(is_val, "val", "train"))
    out = {}
    for name in SPLITS:
        mask = part == name
        # order by content hash, so a split's bytes do not depend on input order
        order = np.argsort(test_key[mask], kind="stable")
        out[name] = df.take(np.flatnonzero(mask)[order]).reset_index(drop=True)  # one copy, not two
    return out


def label_budget_subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of at most `per_class` rows of each class, drawn with `seed` (low-label setting)."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))
