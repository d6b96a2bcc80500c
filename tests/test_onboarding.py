"""`distilflow add-data FILE`: inspect, copy under data/raw/, `dvc add`, propose params; all or nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from distilflow.params import load_params
from tests.conftest import REPO

DVC = str(Path(sys.executable).parent / "dvc")


def _add(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distilflow", "add-data", *args, "--params", str(project / "params.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )


@pytest.fixture
def dvc_project(tmp_path) -> Path:
    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=project, check=True)
    return project


def _clinic(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame(
        {
            "patient": range(n),
            "site": rng.choice(["north", "south"], n),
            "age": rng.integers(20, 90, n),
            "Outcome": rng.choice(["benign", "malignant"], n),
        }
    )
    frame.loc[:3, "Outcome"] = "benigh"
    with open(path, "w", encoding="utf-8-sig") as f:  # a BOM and ';', as a spreadsheet exports it
        frame.to_csv(f, sep=";", index=False)
    return path


def test_a_spreadsheet_export_is_read_right_copied_tracked_and_proposed(dvc_project, tmp_path):
    source = _clinic(tmp_path / "Clinic Export.csv")
    proc = _add(dvc_project, str(source))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "separator ';', UTF-8 with a BOM (handled)" in out and "label column: Outcome" in out
    assert "'benigh' (4 rows) is one edit from 'benign'" in out
    target = dvc_project / "data/raw/clinic-export.csv"
    assert target.read_bytes() == source.read_bytes()
    assert (dvc_project / "data/raw/clinic-export.csv.dvc").is_file()  # dvc add ran
    proposal = dvc_project / "params.clinic-export.yaml"
    data = yaml.safe_load(proposal.read_text())["data"]
    assert data["separator"] == ";" and data["label_column"] == "Outcome" and data["image_shape"] is None
    assert data["classes"] == ["benign", "malignant"]  # the likely typo left out, and named where it was left out
    assert "# left out: 'benigh' (4 rows), one edit from 'benign'" in proposal.read_text()
    assert data["name"] == "clinic-export" and data["source"] == "data/raw/clinic-export.csv"
    params = load_params(proposal)  # a valid params file, for a table
    assert params.normalize.method == "standard" and params.backbone.spec == "builtin:cnn"
    assert not params.transfer.enabled and params.registered_model() == "distilflow-clinic-export"


def test_the_proposal_for_a_file_with_a_typo_passes_the_clean_stage(dvc_project, tmp_path):
    """add-data never writes params that clean.similar_labels: fail would stop: the typo's rows are dropped."""
    from tasks.data import clean_table, read_raw

    assert _add(dvc_project, str(_clinic(tmp_path / "c.csv"))).returncode == 0
    params = load_params(dvc_project / "params.c.yaml")
    assert params.clean.similar_labels == "fail"
    table = read_raw(dvc_project / params.data.source, params.data, params.features)
    out, report = clean_table(table, params.clean, params.data.classes, params.data.value_range, 3)
    assert report["dropped"]["invalid_label"] == 4 and set(out["label"]) == {"benign", "malignant"}


def test_pixels_are_recognised_as_images_with_their_range(dvc_project, tmp_path):
    from tasks.data import export_digits

    source = export_digits(tmp_path / "digits.csv")
    proc = _add(dvc_project, str(source), "--name", "mydigits")
    assert proc.returncode == 0, proc.stderr
    params = load_params(dvc_project / "params.mydigits.yaml")
    assert params.data.image_shape == (8, 8, 1) and params.data.value_range == (0.0, 16.0)
    assert params.data.classes == list(range(10)) and params.normalize.method == "per_channel"
    assert params.data.label_column == "label"


def test_a_failed_dvc_add_leaves_nothing_behind(tmp_path):
    project = tmp_path / "p"
    (project / ".dvc").mkdir(parents=True)  # looks like DVC, is not a git repository: `dvc add` refuses
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    proc = _add(project, str(_clinic(tmp_path / "c.csv")))
    assert proc.returncode == 1 and proc.stderr.count("distilflow: error:") == 1, proc.stderr
    assert "`dvc add data/raw/c.csv` failed (nothing added)" in proc.stderr and "Traceback" not in proc.stderr
    assert not (project / "data/raw/c.csv").exists() and not (project / "params.c.yaml").exists()


@pytest.mark.parametrize(
    ("frame", "args", "message"),
    [
        (pd.DataFrame({"a": [0.1, 0.2, 0.3], "b": [1.5, 2.5, 3.5]}), [], "no column looks like the label"),
        (pd.DataFrame({"label": [1, 2], "x": [0.1, 0.2]}), ["--label", "kind"], "--label 'kind' is not a column"),
        (pd.DataFrame({"label": [], "x": []}), [], "has a header but no rows"),
    ],
)
def test_bad_files_are_one_line_and_write_nothing(dvc_project, tmp_path, frame, args, message):
    source = tmp_path / "bad.csv"
    frame.to_csv(source, index=False)
    proc = _add(dvc_project, str(source), *args)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (dvc_project / "data").exists() and not (dvc_project / "params.bad.yaml").exists()


def test_another_file_under_the_same_name_needs_force(dvc_project, tmp_path):
    first = _clinic(tmp_path / "c.csv")
    assert _add(dvc_project, str(first)).returncode == 0
    other = tmp_path / "other" / "c.csv"
    other.parent.mkdir()
    pd.DataFrame({"label": [1, 2] * 20, "x": np.arange(40) * 0.5}).to_csv(other, index=False)
    proc = _add(dvc_project, str(other))
    assert proc.returncode == 1 and "exists; --force rewrites it" in proc.stderr
    assert (dvc_project / "data/raw/c.csv").read_bytes() == first.read_bytes()
    assert _add(dvc_project, str(other), "--force").returncode == 0
    assert (dvc_project / "data/raw/c.csv").read_bytes() == other.read_bytes()


# ----------------------------------------------------------------------------
# which column is the label (tasks/onboarding.py's module docstring says how it is chosen)


def _pixels(n: int = 300) -> pd.DataFrame:
    """scikit-learn's digits upsampled to 28x28, as `p0..p783` in 0..255: 17 values each, like the issue's export."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images[:n], np.ones((4, 4)))[:, 2:30, 2:30]
    pixels = np.round(images * 255 / 16).astype(np.int64).reshape(n, -1)
    return pd.DataFrame(pixels, columns=[f"p{i}" for i in range(784)]), digits.target[:n]


def test_a_label_named_digit_before_784_pixel_columns_is_the_label_and_the_image_is_the_pixels(tmp_path):
    """The issue's export: the label first as `digit`, then `p0..p783` (each pixel has few whole values too)."""
    from tasks.onboarding import describe, inspect_file

    pixels, digit = _pixels()
    pixels.insert(0, "digit", digit)
    pixels.to_csv(tmp_path / "export.csv", index=False)
    report = inspect_file(tmp_path / "export.csv")
    assert report["label"] == "digit" and report["data"]["classes"] == list(range(10)) and not report["typos"]
    assert report["data"]["image_shape"] == [28, 28, 1] and report["data"]["value_range"] == [0.0, 255.0]
    lines = describe(report)
    assert "label column: digit (named like a label; the first column)" in lines
    assert any(
        line.startswith("images: [28, 28, 1] from the 784 columns p0 … p783, in the file's order") for line in lines
    )
    p783 = next(r for r in report["label_candidates"] if r["column"] == "p783")
    assert p783["why"][:2] == ["the last column", "one of the numbered columns p0..p783"]


def test_an_unnamed_label_after_the_pixels_is_the_label(tmp_path):
    from tasks.onboarding import inspect_file

    pixels, digit = _pixels()
    pixels["kind"] = digit  # no label's name: its place and the pixels' numbered run decide
    pixels.to_parquet(tmp_path / "export.parquet", index=False)
    report = inspect_file(tmp_path / "export.parquet")
    assert report["label"] == "kind" and report["data"]["image_shape"] == [28, 28, 1]
    assert report["image_columns"] == {
        "count": 784,
        "first": "p0",
        "last": "p783",
        "numbered_in_order": True,
        "odd": [],
    }


def test_a_wrong_label_shows_in_the_image_line_and_a_warning(tmp_path):
    """What the issue saw (`--label p783` now, by hand): the image built from `digit` plus p0..p782."""
    from tasks.onboarding import describe, inspect_file

    pixels, digit = _pixels(100)
    pixels.insert(0, "digit", digit)
    pixels.to_csv(tmp_path / "export.csv", index=False)
    lines = describe(inspect_file(tmp_path / "export.csv", label="p783"))
    assert any(line.startswith("images: [28, 28, 1] from the 784 columns digit … p782,") for line in lines)
    assert "WARNING: digit is in the image but not numbered like the other columns: is the label column right?" in lines


def test_a_label_in_the_middle_of_a_table_is_found_by_its_name(tmp_path):
    from tasks.onboarding import inspect_file

    rng = np.random.default_rng(0)
    n = 300
    pd.DataFrame(
        {
            "sex": rng.choice(["f", "m"], n),  # few values, and first
            "age": rng.integers(20, 90, n),
            "Diagnosis": rng.choice(["benign", "malignant"], n),
            "bmi": rng.normal(25, 4, n).round(1),
            "smoker": rng.choice(["yes", "no"], n),  # few values, and last
        }
    ).to_csv(tmp_path / "t.csv", index=False)
    report = inspect_file(tmp_path / "t.csv")
    assert report["label"] == "Diagnosis" and report["data"]["image_shape"] is None
    assert [r["column"] for r in report["label_candidates"]] == ["sex", "smoker"]  # age: too many values


def test_pixel_columns_out_of_their_numbers_order_are_named_in_a_warning(tmp_path):
    from tasks.onboarding import describe, inspect_file

    pixels, digit = _pixels(100)
    pixels = pixels[sorted(pixels.columns)]  # p0, p1, p10, p100, ...: a spreadsheet's sort
    pixels["label"] = digit
    pixels.to_csv(tmp_path / "sorted.csv", index=False)
    lines = describe(inspect_file(tmp_path / "sorted.csv"))
    assert any(line.startswith("images: [28, 28, 1] from the 784 columns p0 … p99,") for line in lines)
    assert any(line.startswith("WARNING: the pixel columns are not in their numbers' order") for line in lines)


def _no_clear_label(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 200
    pd.DataFrame(
        {
            "weight": rng.normal(70, 10, n),
            "site": rng.choice(["north", "south", "east"], n),
            "visits": rng.integers(0, 6, n),
            "height": rng.normal(170, 9, n),
        }
    ).to_csv(path, index=False)
    return path


def _two_close(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 200
    pd.DataFrame(
        {"site": rng.choice(["north", "south"], n), "x": rng.normal(size=n), "status": rng.choice(["a", "b"], n)}
    ).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("make", "label", "message"),
    [
        (
            _no_clear_label,
            "visits",
            "add-data: no column is clearly the label: 'site', 'visits' have few values, but none is named like a "
            "label or placed first or last; name it with --label",
        ),
        (
            _two_close,
            "status",
            "add-data: the label could be 'site' (the first column) or 'status' (the last column); name it with "
            "--label site (or --label status)",
        ),
    ],
)
def test_no_clear_label_stops_with_one_line_asking_for_label(dvc_project, tmp_path, make, label, message):
    source = make(tmp_path / "t.csv")
    proc = _add(dvc_project, str(source))
    assert proc.returncode == 1 and proc.stderr.strip() == f"distilflow: error: {message}", proc.stderr
    assert proc.stdout == "" and not (dvc_project / "data").exists() and not (dvc_project / "params.t.yaml").exists()
    proc = _add(dvc_project, str(source), "--label", label)  # what the line asks for
    assert proc.returncode == 0 and f"label column: {label} (given with --label)" in proc.stdout, proc.stderr
    assert load_params(dvc_project / "params.t.yaml").data.label_column == label
