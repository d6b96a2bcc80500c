"""The command line as a person meets it: help texts, and Ctrl-C in the middle of a run."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from cli.parser import build_parser
from tests.conftest import QUICK, REPO, edit_params


def _subcommands():
    parser = build_parser("distilflow")
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_command_has_a_description_and_only_relevant_options(name):
    sub = _subcommands()[name]
    help_text = sub.format_help()
    assert sub.description and len(sub.description) > 30, name
    if name in ("promote", "rollback", "audit", "score", "serve", "serve-model", "deploy"):
        assert "train.epochs" not in help_text  # a registry command is not about training
    if name in ("rollback", "audit", "score"):
        assert "--set" not in help_text


def test_top_level_help_lists_every_command_with_a_summary():
    text = build_parser("distilflow").format_help()
    for name in _subcommands():
        assert name in text
    assert "--help" in text and "README.md" in text


@pytest.mark.slow
def test_ctrl_c_during_training_ends_in_one_line_within_seconds_and_leaves_nothing_running(project):
    """A terminal's Ctrl-C reaches the whole foreground process group, as here."""
    from mlflow.tracking import MlflowClient

    for section, values in QUICK.items():
        edit_params(project, **{section: values})
    edit_params(project, train={"epochs": 40, "warmup_epochs": 0, "patience": 40})  # still training when interrupted
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["PREFECT_HOME"] = str(project / ".prefect")
    proc = subprocess.Popen(
        [sys.executable, "-m", "distilflow", "run", "--params", str(project / "params.yaml")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stderr:  # Prefect logs its lines to stderr
        lines.append(line)
        if "backbone: ran" in line:
            break
    time.sleep(2)  # inside the fine-tune's epochs
    assert proc.poll() is None, "".join(lines)
    helpers = psutil.Process(proc.pid).children(recursive=True)
    assert helpers, "the temporary Prefect API runs as a child of the command"
    interrupted = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    seconds = time.monotonic() - interrupted
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["distilflow: interrupted"], err[-3000:]  # one line after the Ctrl-C
    assert "Traceback" not in out + err
    assert seconds < 10, f"took {seconds:.1f} s to stop"  # ~3 s here; the bound leaves room for a slow CI host
    time.sleep(1)
    assert not [p for p in helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    assert any(r.info.status == "KILLED" for r in runs)
