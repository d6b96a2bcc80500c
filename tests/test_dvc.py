"""`dvc repro` in a temporary copy of the repo: real DVC, real git."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distilflow.layout import Layout
from tests.conftest import QUICK, REPO, edit_params

TRACKED = [
    "distilflow",
    "tasks",
    "flows",
    "cli",
    "params.yaml",
    "dvc.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "data/raw/digits.csv.dvc",
    "data/raw/.gitignore",
]


def sh(cwd: Path, *cmd: str) -> str:
    """Run a command in `cwd` with this venv first on PATH; its output, or a failed assertion."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def dvc_repo(tmp_path, digits_csv) -> Path:
    for rel in TRACKED:
        src, dst = REPO / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            if src.is_dir()
            else shutil.copy(src, dst)
        )
    shutil.copy(digits_csv, tmp_path / "data/raw/digits.csv")
    for section, values in QUICK.items():  # a short pipeline: built-in teacher, few epochs
        edit_params(tmp_path, **{section: values})
    sh(tmp_path, sys.executable, "-m", "distilflow", "dvc-yaml")
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "init")
    return tmp_path


def test_the_committed_dvc_yaml_is_generated_from_the_stage_declarations():
    """dvc.yaml is written from distilflow/stages.py (`python -m distilflow dvc-yaml`): paths are declared once."""
    from distilflow.dvcfile import dvc_yaml
    from distilflow.params import load_params

    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(load_params(REPO / "params.yaml"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    layout = Layout(REPO)
    rel = lambda p: str(p.relative_to(layout.root))  # noqa: E731
    assert list(stages) == [
        "ingest",
        "clean",
        "split",
        "normalize",
        "baseline",
        "backbone",
        "finetune",
        "transfer_gain",
        "distill",
        "quantize",
        "evaluate",
        "select",
    ]
    assert stages["split"]["outs"] == [rel(layout.split(s)) for s in ("train", "val", "test")] + [
        rel(layout.split_report)
    ]
    assert stages["finetune"]["deps"][:5] == [
        rel(layout.path(n)) for n in ("train", "val", "test", "preprocessor", "backbone")
    ]
    assert "tasks/engine.py" in stages["distill"]["deps"] and "distill" in stages["distill"]["params"]
    assert stages["evaluate"]["metrics"] == [{"reports/metrics.json": {"cache": False}}]


@pytest.mark.slow
def test_raw_data_md5_matches_the_committed_dvc_file(digits_csv):
    from distilflow.hashing import file_md5

    committed = yaml.safe_load((REPO / "data/raw/digits.csv.dvc").read_text())["outs"][0]["md5"]
    assert file_md5(digits_csv) == committed


@pytest.mark.slow
def test_repro_twice_then_a_param_change_reruns_only_downstream(dvc_repo):
    first = sh(dvc_repo, "dvc", "repro")
    for stage in (
        "ingest",
        "clean",
        "split",
        "normalize",
        "backbone",
        "finetune",
        "distill",
        "quantize",
        "evaluate",
        "select",
    ):
        assert f"Running stage '{stage}'" in first
    assert Layout(dvc_repo).preprocessor.exists()

    second = sh(dvc_repo, "dvc", "repro")
    assert "Running stage" not in second
    assert "Data and pipelines are up to date" in second

    sh(dvc_repo, "git", "add", "-A")
    sh(dvc_repo, "git", "commit", "-qm", "repro")
    before = yaml.safe_load((dvc_repo / "params.yaml").read_text())["normalize"]["method"]
    after = "minmax" if before != "minmax" else "standard"
    edit_params(dvc_repo, normalize={"method": after})
    diff = sh(dvc_repo, "dvc", "params", "diff")
    assert "normalize.method" in diff and before in diff and after in diff
    third = sh(dvc_repo, "dvc", "repro")
    assert "Running stage 'normalize'" in third and "Running stage 'finetune'" in third
    assert all(f"Running stage '{s}'" not in third for s in ("ingest", "clean", "split", "backbone"))


@pytest.mark.slow
def test_push_and_pull_through_the_default_local_remote(dvc_repo):
    sh(dvc_repo, "dvc", "repro")
    sh(dvc_repo, "dvc", "push")
    assert any((dvc_repo / ".dvc-storage").rglob("*")), "the default remote lives in .dvc-storage/"
    shutil.rmtree(dvc_repo / ".dvc/cache")
    shutil.rmtree(dvc_repo / "data/split")
    (dvc_repo / "data/raw/digits.csv").unlink()
    sh(dvc_repo, "dvc", "pull")
    assert (dvc_repo / "data/split/test.parquet").exists() and (dvc_repo / "data/raw/digits.csv").exists()


@pytest.mark.slow
def test_exp_run_with_an_override_reruns_exactly_the_affected_stages_and_records_metrics(dvc_repo, tmp_path):
    from distilflow.params import load_params

    sh(dvc_repo, "dvc", "repro")
    sh(dvc_repo, "git", "add", "-A")
    sh(dvc_repo, "git", "commit", "-qm", "repro")
    changed = load_params(dvc_repo / "params.yaml").distill.temperature + 1  # never the default itself
    out = sh(dvc_repo, "dvc", "exp", "run", "-S", f"distill.temperature={changed}")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"distill", "quantize", "evaluate", "select"}, out
    assert load_params(dvc_repo / "params.yaml").distill.temperature == changed  # DVC's rewrite still parses

    shown = sh(dvc_repo, "dvc", "exp", "show", "--md", "--no-pager")
    assert "distill.temperature" in shown and "student_int8.accuracy" in shown and "test.accuracy" in shown
    metrics = sh(dvc_repo, "dvc", "metrics", "show", "--md")
    for name in ("reports/metrics.json", "reports/teacher.json", "reports/student.json", "reports/quantize.json"):
        assert name in metrics
    sh(dvc_repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "teacher_history.csv" in html and "pareto.png" in html


@pytest.mark.slow
def test_dvc_repro_right_after_a_distilflow_run_has_nothing_to_do(dvc_repo):
    env_run = sh(dvc_repo, sys.executable, "-m", "distilflow", "run")
    assert "dvc.lock: updated" in env_run
    again = sh(dvc_repo, "dvc", "repro")
    assert "Running stage" not in again and "Data and pipelines are up to date" in again
