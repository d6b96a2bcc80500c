"""Cleaning rules, split properties and normalization, on small hand-built frames."""

import numpy as np
import pandas as pd
import pytest

from distilflow.errors import DistilflowError
from distilflow.params import CleanParams, DataParams, SplitParams
from tasks.data import DROP_RULES, clean_table, normalize_label
from tasks.preprocessing import apply_normalizer, fit_normalizer
from tasks.splits import LABEL, stratified_split

DATA = DataParams(image_shape=None, value_range=(0, 10), classes=[0, 1, 2])
CLEAN = CleanParams()


def frame(rows):
    """rows: (label, f0, f1) tuples; labels stay raw text, as ingest leaves them."""
    df = pd.DataFrame(rows, columns=[LABEL, "f0", "f1"])
    df[LABEL] = df[LABEL].map(lambda v: None if v is None else str(v))
    return df


def run_clean(rows, min_per_class=1, data=DATA, **clean_kw):
    out, report = clean_table(frame(rows), CleanParams(**clean_kw), data.classes, data.value_range, min_per_class)
    assert report["rows_in"] - sum(report["dropped"].values()) == report["rows_out"] == len(out)
    return out, report


def filler(n=3):
    """Clean rows of classes 1 and 2, so tests can focus on class 0."""
    return [(c, 0.25 + 0.1 * i, 0.05 + 0.5 * c) for c in (1, 2) for i in range(n)]


@pytest.mark.parametrize(
    "raw,expected",
    [(" 7 ", 7), ("7.0", 7), (7, 7), ("Cat ", "cat"), ("", None), (None, None), ("nan", None), ("7.5", "7.5")],
)
def test_normalize_label(raw, expected):
    assert normalize_label(raw) == expected


def test_missing_and_invalid_labels():
    rows = filler() + [
        (" 0 ", 1.0, 1.0),
        ("0.0", 2.0, 2.0),
        (None, 3.0, 3.0),
        ("", 4.0, 4.0),
        ("ten", 5.0, 5.0),
        ("3", 6.0, 6.0),
    ]
    out, rep = run_clean(rows)
    assert rep["dropped"]["missing_label"] == 2
    assert rep["dropped"]["invalid_label"] == 2
    assert sorted(out[LABEL].unique()) == [0, 1, 2]
    assert (out[LABEL] == 0).sum() == 2
    assert out[LABEL].dtype == np.int64


def test_nonfinite_drop():
    rows = filler() + [(0, np.nan, 1.0), (0, np.inf, 1.0), (0, -np.inf, 2.0), (0, 1.0, 1.0)]
    out, rep = run_clean(rows, nonfinite="drop")
    assert rep["dropped"]["nonfinite"] == 3
    assert np.isfinite(out[["f0", "f1"]].to_numpy()).all()


def test_nonfinite_impute_keeps_rows_and_leaves_nan_for_the_train_median():
    rows = filler() + [(0, np.nan, 1.0), (0, np.inf, np.nan), (0, 1.0, 1.0)]
    out, rep = run_clean(rows, nonfinite="impute")
    assert rep["dropped"]["nonfinite"] == 0
    assert rep["modified"]["cells_to_impute"] == 3 and rep["modified"]["rows_to_impute"] == 2
    assert out[["f0", "f1"]].isna().sum().sum() == 3  # inf became NaN too


def test_out_of_range_clip_and_drop():
    rows = filler() + [(0, -5.0, 1.0), (0, 11.0, 12.0), (0, 3.0, 3.0)]
    out, rep = run_clean(rows, out_of_range="clip", max_out_of_range_share=1.0)  # a tiny table: 3 of 18 values
    assert rep["dropped"]["out_of_range"] == 0 and rep["modified"]["cells_clipped"] == 3
    zero = out[out[LABEL] == 0].sort_values("f0")
    assert zero["f0"].tolist() == [0.0, 3.0, 10.0] and zero["f1"].max() == 10.0
    out, rep = run_clean(rows, out_of_range="drop", max_out_of_range_share=1.0)
    assert rep["dropped"]["out_of_range"] == 2 and (out[LABEL] == 0).sum() == 1


def test_a_value_range_that_does_not_fit_the_data_stops_the_run_naming_the_observed_range():
    """0..255 pixels with the digits' [0, 16]: clipping would flatten most of the image, in training and serving."""
    rows = [(c, 1.0 + c + 0.1 * i, 200.0) for c in (0, 1, 2) for i in range(4)]
    with pytest.raises(
        DistilflowError,
        match=r"50.0% of the feature values fall outside data.value_range \[0, 10\] "
        r"\(observed \[1, 200\]\): set data.value_range",
    ):
        run_clean(rows)
    out, rep = run_clean(rows, max_out_of_range_share=1.0)  # on purpose: clipped, and counted
    assert rep["modified"]["cells_clipped"] > 0


def test_exact_duplicates_keep_one():
    rows = filler() + [(0, 1.0, 1.0)] * 4 + [(0, 2.0, 2.0)]
    out, rep = run_clean(rows)
    assert rep["dropped"]["duplicates"] == 3
    assert (out[LABEL] == 0).sum() == 2
    _, rep = run_clean(rows, drop_duplicates=False)
    assert rep["dropped"]["duplicates"] == 0


def test_conflicting_labels_majority_and_no_majority():
    # group A: three say 0, one says 1 -> strict majority 0 keeps 3 rows (then 2 duplicates go)
    # group B: one says 0, one says 2 -> no strict majority: whole group dropped
    rows = filler() + [(0, 9.0, 9.0)] * 3 + [(1, 9.0, 9.0)] + [(0, 8.0, 8.0), (2, 8.0, 8.0)] + [(0, 7.0, 7.0)]
    out, rep = run_clean(rows)
    assert rep["dropped"]["conflicting_labels"] == 3
    assert rep["dropped"]["duplicates"] == 2
    kept = out[(out["f0"] == 9.0)]
    assert kept[LABEL].tolist() == [0]
    assert not (out["f0"] == 8.0).any()
    _, rep = run_clean(rows, conflicting_labels="drop")
    assert rep["dropped"]["conflicting_labels"] == 6


def test_rare_classes_drop_with_names_or_fail():
    rows = filler(3) + [(0, 1.0, 1.0)]
    out, rep = run_clean(rows, min_per_class=3)
    assert rep["dropped"]["rare_classes"] == 1 and rep["rare_classes_dropped"] == {"0": 1}
    assert 0 not in set(out[LABEL])
    with pytest.raises(DistilflowError, match=r"too few samples to stratify: classes \{'0': 1\}"):
        run_clean(rows, min_per_class=3, rare_classes="fail")
    _, rep = run_clean(rows, min_per_class=1, min_samples_per_class=2)
    assert rep["dropped"]["rare_classes"] == 1


def test_all_rules_together_add_up():
    rows = filler(4) + [
        (None, 1, 1),
        ("x", 1, 1),
        (0, np.nan, 1),
        (0, 20, 1),
        (0, 5, 5),
        (0, 5, 5),
        (1, 6, 6),
        (2, 6, 6),
        (0, 4, 4),
        (0, 3, 3),
    ]
    out, rep = run_clean(rows, out_of_range="drop", max_out_of_range_share=0.05)  # 1 value in 32
    assert rep["rows_in"] == 18
    assert {k: v for k, v in rep["dropped"].items() if v} == {
        "missing_label": 1,
        "invalid_label": 1,
        "nonfinite": 1,
        "out_of_range": 1,
        "conflicting_labels": 2,
        "duplicates": 1,
    }
    assert rep["rows_out"] == 11 and set(rep["dropped"]) == set(DROP_RULES)


def test_emptied_by_cleaning_is_a_clear_error():
    with pytest.raises(DistilflowError, match="no rows left after cleaning"):
        run_clean([("ten", 1.0, 1.0), ("eleven", 2.0, 2.0)])
    with pytest.raises(DistilflowError, match="only 1 class left"):
        run_clean([(0, 1.0, 1.0), (0, 2.0, 2.0)])


# ---------------------------------------------------------------------------- split


def blobs(n_per_class=(50, 30, 7), seed=0):
    rng = np.random.default_rng(seed)
    parts = [
        pd.DataFrame({LABEL: c, "f0": rng.normal(c, 1, n), "f1": rng.normal(0, 1, n)})
        for c, n in enumerate(n_per_class)
    ]
    return pd.concat(parts, ignore_index=True)


SPLIT = SplitParams(train=0.6, val=0.2, test=0.2)


def test_split_is_disjoint_complete_and_stratified():
    df = blobs()
    parts = stratified_split(df, SPLIT, seed=1)
    keys = {name: set(map(tuple, p.to_numpy().tolist())) for name, p in parts.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    assert sum(len(p) for p in parts.values()) == len(df)
    counts = df[LABEL].value_counts()
    for name, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        got = parts[name][LABEL].value_counts()
        for c, n in counts.items():
            assert abs(got.get(c, 0) - n * frac) <= 1, (name, c)


def test_split_is_deterministic_and_test_is_frozen():
    df = blobs()
    a = stratified_split(df, SPLIT, seed=1)
    b = stratified_split(df.sample(frac=1, random_state=3).reset_index(drop=True), SPLIT, seed=1)
    c = stratified_split(df, SPLIT, seed=2)
    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(a[name], b[name])  # row order does not matter
    pd.testing.assert_frame_equal(a["test"], c["test"])  # the training seed never moves test rows
    assert not a["val"].equals(c["val"])  # ...but it does re-draw train/val
    d = stratified_split(df, SplitParams(train=0.6, val=0.2, test=0.2, test_seed=9), seed=1)
    assert not a["test"].equals(d["test"])


def test_split_rejects_classes_too_small_to_stratify():
    with pytest.raises(DistilflowError, match=r"too few samples to stratify: classes \{'2': 2\}"):
        stratified_split(blobs((10, 10, 2)), SPLIT, seed=0)


def test_split_with_no_validation_part():
    parts = stratified_split(blobs((10, 10, 2)), SplitParams(train=0.5, val=0.0, test=0.5), seed=0)
    assert len(parts["val"]) == 0 and len(parts["test"]) == 11


# ---------------------------------------------------------------------------- normalize


def test_scaler_statistics_are_the_train_statistics():
    df = blobs()
    parts = stratified_split(df, SPLIT, seed=0)
    pre = fit_normalizer(parts["train"], "standard", None)
    train_x = parts["train"][["f0", "f1"]].to_numpy()
    np.testing.assert_allclose(pre["shift"], train_x.mean(axis=0))
    np.testing.assert_allclose(pre["scale"], train_x.std(axis=0))
    assert not np.allclose(pre["shift"], df[["f0", "f1"]].to_numpy().mean(axis=0))
    z = apply_normalizer(pre, parts["train"])
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    assert pre["classes"] == [0, 1, 2]


def test_minmax_and_per_channel():
    train = pd.DataFrame({LABEL: [0, 1, 0], "r": [0.0, 10.0, 5.0], "g": [2.0, 4.0, 6.0]})
    mm = fit_normalizer(train, "minmax", None)
    assert mm["shift"] == [0.0, 2.0] and mm["scale"] == [10.0, 4.0]
    # a 1x1 image with 2 channels: per-channel stats equal per-feature ones here
    pc = fit_normalizer(train, "per_channel", (1, 1, 2))
    np.testing.assert_allclose(pc["shift"], [5.0, 4.0])
    # 2 pixels x 1 channel share one mean
    pc1 = fit_normalizer(train, "per_channel", (1, 2, 1))
    assert pc1["shift"][0] == pc1["shift"][1] == pytest.approx(27 / 6)


def test_imputation_uses_the_train_median_and_constant_features_pass():
    train = pd.DataFrame({LABEL: [0, 1, 0, 1], "a": [1.0, np.nan, 3.0, 10.0], "k": [4.0, 4.0, 4.0, 4.0]})
    pre = fit_normalizer(train, "none", None)
    assert pre["impute"] == [3.0, 4.0] and pre["scale"] == [1.0, 1.0]
    z = apply_normalizer(pre, pd.DataFrame({"a": [np.nan, np.inf], "k": [4.0, 4.0]}))
    assert z[:, 0].tolist() == [3.0, 3.0]
    with pytest.raises(DistilflowError, match="missing feature columns"):
        apply_normalizer(pre, pd.DataFrame({"a": [1.0]}))


def test_values_too_large_to_scale_stop_at_normalize_naming_the_column():
    """1e308 with no value range: the standard deviation overflows; training on NaN is not an option."""
    train = pd.DataFrame({LABEL: [0, 1, 0, 1], "f0": [1.0, 2.0, 3.0, 1e308], "f1": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(DistilflowError, match=r"column\(s\) \['f0'\] have values too large to scale"):
        fit_normalizer(train, "standard", None)
    pre = fit_normalizer(train.assign(f0=[1.0, 2.0, 3.0, 4.0]), "standard", None)
    with pytest.raises(DistilflowError, match="input column 'f0' holds a value too large"):
        apply_normalizer(pre, train.assign(f0=[1.0, 2.0, 3.0, np.finfo(np.float64).max]))


def test_the_served_preprocessing_clips_to_the_value_range_as_cleaning_did():
    train = pd.DataFrame({LABEL: [0, 1, 0, 1], "f0": [0.0, 4.0, 8.0, 10.0], "f1": [1.0, 2.0, 3.0, 4.0]})
    pre = fit_normalizer(train, "minmax", None, value_range=(0.0, 10.0))
    raw = pd.DataFrame({"f0": [250.0, -7.0], "f1": [2.0, 2.0]})
    clipped = pd.DataFrame({"f0": [10.0, 0.0], "f1": [2.0, 2.0]})
    np.testing.assert_array_equal(apply_normalizer(pre, raw), apply_normalizer(pre, clipped))


def test_a_tiny_label_one_edit_from_a_big_one_is_flagged_as_a_typo():
    rows = [("benign", 0.1 * i, 1.0) for i in range(30)] + [("malignant", 5 + 0.1 * i, 2.0) for i in range(20)]
    rows += [("benigh", 3.3, 3.3), ("benigh", 3.4, 3.4)]
    data = DataParams(image_shape=None, value_range=None, classes=None)
    with pytest.raises(DistilflowError, match=r"label 'benigh' \(2 rows\) is one edit away from 'benign' \(30 rows\)"):
        run_clean(rows, data=data)
    out, _ = run_clean(rows, data=data, similar_labels="keep")
    assert set(out[LABEL]) == {"benign", "malignant", "benigh"}
    # with the classes given, the typo is an invalid label, counted and dropped
    out, rep = run_clean(rows, data=data.model_copy(update={"classes": ["benign", "malignant"]}))
    assert rep["dropped"]["invalid_label"] == 2


def test_every_likely_typo_is_named_in_the_one_error():
    rows = [("benign", 0.1 * i, 1.0) for i in range(30)] + [("malignant", 5 + 0.1 * i, 2.0) for i in range(20)]
    rows += [("benigh", 3.3, 3.3), ("malignat", 7.7, 7.7)]
    data = DataParams(image_shape=None, value_range=None, classes=None)
    with pytest.raises(DistilflowError) as caught:
        run_clean(rows, data=data)
    message = str(caught.value)
    assert "label 'benigh' (1 rows) is one edit away from 'benign' (30 rows)" in message
    assert "label 'malignat' (1 rows) is one edit away from 'malignant' (20 rows)" in message
    assert "typos?" in message and "clean.similar_labels: keep" in message


def test_numbers_are_never_refused_as_typos():
    """0 beside 1, or 10 beside 0, is a class, not a typo: an imbalanced 0/1 label is common (fraud, faults)."""
    rows = [(0, 0.01 * i, 1.0) for i in range(200)] + [(1, 5 + 0.1 * i, 2.0) for i in range(5)]
    rows += [(10, 9 + 0.1 * i, 3.0) for i in range(3)]
    data = DataParams(image_shape=None, value_range=None, classes=None)
    out, _ = run_clean(rows, data=data)
    assert out[LABEL].value_counts().to_dict() == {0: 200, 1: 5, 10: 3}


def test_a_semicolon_csv_gets_an_error_naming_the_separator(tmp_path):
    from tasks.data import read_raw

    path = tmp_path / "t.csv"
    path.write_bytes("\ufefflabel;a;b\n0;1;2\n1;3;4\n".encode())  # with Excel's byte-order mark
    with pytest.raises(DistilflowError, match=r"looks ';'-separated.*set data.separator: ';'"):
        read_raw(path, DataParams(source=str(path), image_shape=None, value_range=None))
    table = read_raw(path, DataParams(source=str(path), image_shape=None, value_range=None, separator=";"))
    assert list(table.columns) == ["label", "a", "b"]  # the BOM is not part of the first column's name
