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
    assert data["classes"] is None  # a likely typo: left for the user to decide
    assert data["name"] == "clinic-export" and data["source"] == "data/raw/clinic-export.csv"
    params = load_params(proposal)  # a valid params file, for a table
    assert params.normalize.method == "standard" and params.backbone.spec == "builtin:cnn"
    assert not params.transfer.enabled and params.registered_model() == "distilflow-clinic-export"


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
