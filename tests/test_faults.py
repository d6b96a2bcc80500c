"""Fault injection: kill -9 at each stage boundary and inside register and promote, then run again.

Each time, what is left must be what an uninterrupted run leaves: no MLflow run
left RUNNING, no version left pending, one complete version per model with
@challenger on the product, no lock held, no temporary server left running.
The kill points come from tests/fault_driver.py, which pauses the real CLI at
one named place so the test can kill it exactly there.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from distilflow.hashing import path_hash
from distilflow.io import read_json
from distilflow.layout import Layout
from distilflow.locks import file_lock
from tests.conftest import QUICK, REPO, edit_params

pytestmark = pytest.mark.slow
NAME = "distilflow-digits"


@pytest.fixture
def quick(project):
    for section, values in QUICK.items():
        edit_params(project, **{section: values})
    return project


def _env(project: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["PREFECT_HOME"] = str(project / ".prefect")
    return env


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distilflow", *args, "--params", str(project / "params.yaml")],
        cwd=REPO,
        env=_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _kill_at(project: Path, point: str, *args: str) -> None:
    """Run the CLI until it reaches `point`, then SIGKILL its process group, as a lost machine or an OOM would."""
    marker = project / "paused"
    marker.unlink(missing_ok=True)
    log = open(project / f"killed-at-{point}.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fault_driver",
            point,
            str(marker),
            "--",
            *args,
            "--params",
            str(project / "params.yaml"),
        ],
        cwd=REPO,
        env=_env(project),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, (project / f"killed-at-{point}.log").read_text()[-3000:]
        assert time.time() < deadline, f"never reached {point}"
        time.sleep(0.1)
    helpers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    time.sleep(1)
    # the temporary Prefect API lives in a session of its own (Ctrl-C must not reach it), and dies with its parent
    assert not [p for p in helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _assert_like_an_uninterrupted_run(project: Path) -> None:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    for name in (NAME, f"{NAME}-teacher", f"{NAME}-student"):
        versions = client.search_model_versions(f"name = '{name}'")
        assert [v.tags.get("registration") for v in versions] == ["complete"], name
    product = client.get_model_version_by_alias(NAME, "challenger")
    layout = Layout(project)
    pick = read_json(layout.selection)["pick"]["candidate"]
    assert product.tags["model_hash"] == path_hash(layout.candidates / pick)[:16] + path_hash(layout.preprocessor)[:16]
    with file_lock(project / ".distilflow/run.lock", 1, "project", "a run", "-", wait=False):
        pass  # nothing holds the project


@pytest.mark.parametrize("point", ["clean", "finetune", "quantize", "select", "register"])
def test_kill_9_at_a_stage_boundary_or_inside_register_then_a_rerun_completes_the_same(quick, point):
    _kill_at(quick, point, "run")
    rerun = _cli(quick, "run")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "recovered: marked MLflow run" in rerun.stdout + rerun.stderr  # the killed run's parent, at least
    if point == "register":
        assert "a registration a crashed run left pending" in rerun.stdout + rerun.stderr
    _assert_like_an_uninterrupted_run(quick)


def test_kill_9_inside_promote_is_finished_by_the_next_promotion(quick):
    assert _cli(quick, "run").returncode == 0
    _kill_at(quick, "promote", "promote", "--by", "alice")
    client = MlflowClient(f"sqlite:///{quick / 'mlflow.db'}")
    assert "champion" not in client.get_registered_model(NAME).aliases  # killed before the alias moved
    again = _cli(quick, "promote", "--by", "bob")
    out = again.stdout + again.stderr
    assert f"recovered: finished the interrupted promotion of {NAME} v1" in out
    # bob's promotion had seen v1 as the challenger: it reports that alice's decided it, and changes nothing more
    assert again.returncode == 1 and "already decided by another promotion (promoted by alice" in out
    assert {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()} == {"champion": "1"}
    audit = client.get_experiment_by_name("distilflow-registry-audit")
    records = client.search_runs([audit.experiment_id])
    assert [(r.data.tags["distilflow.audit.by"], r.data.tags["distilflow.audit.state"]) for r in records] == [
        ("alice", "done")
    ]
    assert not [r for r in client.search_runs([audit.experiment_id]) if r.info.status == "RUNNING"]


def test_a_second_run_in_the_same_project_waits_or_fails_with_one_line(quick):
    with file_lock(quick / ".distilflow/run.lock", 5, "project", "the test", "-"):
        busy = _cli(quick, "run", "--stop-after", "normalize", "--set", "run_lock.on_busy=fail")
    assert busy.returncode == 1 and "Traceback" not in busy.stderr
    error = busy.stderr.strip().splitlines()[-1]
    assert error.startswith("distilflow: error: project ") and f"busy: another run (pid {os.getpid()}" in error
    assert not (quick / "data/split").exists()  # it did nothing


def _tree(project: Path) -> dict[str, str]:
    """Every pipeline output's content hash (what a failed run must leave exactly as it was)."""
    layout = Layout(project)
    roots = [project / d for d in ("data/interim", "data/split", "artifacts", "reports")]
    files = sorted(p for root in roots if root.exists() for p in root.rglob("*") if p.is_file())
    skip = ("checkpoints",)
    return {str(p.relative_to(layout.root)): path_hash(p) for p in files if not any(s in p.parts for s in skip)}


@pytest.mark.parametrize("stage", ["clean", "split", "finetune", "quantize", "select"])
def test_a_failing_stage_leaves_every_output_as_it_was(quick, stage):
    assert _cli(quick, "run").returncode == 0
    before = _tree(quick)
    # a changed param reruns every stage from `stage`'s inputs on; the injected failure stops the run at `stage`
    change = "clean.drop_duplicates=false" if stage == "clean" else "split.test_seed=3"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fault_driver",
            f"fail-{stage}",
            str(quick / "unused"),
            "--",
            "run",
            "--params",
            str(quick / "params.yaml"),
            "--set",
            change,
        ],
        cwd=REPO,
        env=_env(quick),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"distilflow: error: injected failure in {stage}"
    assert _tree(quick) == before
    client = MlflowClient(f"sqlite:///{quick / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
