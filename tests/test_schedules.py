"""Scheduled runs fire: a real `prefect server` whose own scheduler creates the runs, and `distilflow serve` runs them.

Nothing is triggered by hand. Both crons are set to every minute, so the
server's scheduler has a run due within the test; the served deployments pick
it up like a nightly run. The first test checks that the scheduler created a
pipeline run that completed and registered a challenger; the second that a
scheduled promotion ran after it and made that challenger champion.
(tests/test_deployments.py covers prefect.yaml, the worker path and the crons.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import QUICK, REPO, edit_params

pytestmark = pytest.mark.slow
EVERY_MINUTE = "* * * * *"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port with its own home (database); yields (api url, env)."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        time.sleep(1)
    else:
        _stop(proc)
        pytest.fail("prefect server did not answer /health within 180 s")
    yield api, env, home / "server.log"
    _stop(proc)
    log.close()


def _flow_runs(api: str, deployment_name: str) -> list[dict]:
    body = {"deployments": {"name": {"any_": [deployment_name]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()


@pytest.fixture(scope="module")
def scheduled(prefect_server, tmp_path_factory, digits_csv):
    """A project served with both crons at every minute, watched until a scheduled promotion follows a pipeline."""
    api, env, server_log = prefect_server
    project = tmp_path_factory.mktemp("scheduled")
    (project / "data/raw").mkdir(parents=True)
    shutil.copy(digits_csv, project / "data/raw/digits.csv")
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    for section, values in QUICK.items():
        edit_params(project, **{section: values})
    edit_params(project, schedule={"train_cron": EVERY_MINUTE, "promote_cron": EVERY_MINUTE, "timezone": "UTC"})

    serve_log = open(project / "serve.log", "w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "distilflow", "serve", "--params", str(project / "params.yaml")],
        cwd=REPO,
        env=env,
        stdout=serve_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pipeline_done = promote_done = None
    deadline = time.time() + 420
    try:
        while time.time() < deadline and promote_done is None:
            assert serve.poll() is None, (project / "serve.log").read_text()[-3000:]
            time.sleep(5)
            pipelines = [r for r in _flow_runs(api, "nightly") if r["state_type"] == "COMPLETED"]
            if pipelines and pipeline_done is None:
                pipeline_done = pipelines[0]
            if pipeline_done is not None:
                promotes = [
                    r
                    for r in _flow_runs(api, "promote")
                    if r["state_type"] == "COMPLETED" and r["start_time"] > pipeline_done["end_time"]
                ]
                promote_done = promotes[0] if promotes else None
    finally:
        _stop(serve)
        serve_log.close()
    logs = f"serve.log:\n{(project / 'serve.log').read_text()[-3000:]}\nserver.log:\n{server_log.read_text()[-2000:]}"
    return {"api": api, "project": project, "pipeline": pipeline_done, "promote": promote_done, "logs": logs}


def test_the_servers_scheduler_creates_the_pipeline_run_and_serve_completes_it(scheduled):
    run = scheduled["pipeline"]
    assert run is not None, f"no scheduled pipeline run completed within 7 minutes\n{scheduled['logs']}"
    assert run["auto_scheduled"] is True  # created by the server's scheduler, not by a person or a test
    assert run["parameters"] == {"params_file": str((scheduled["project"] / "params.yaml").resolve())}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{scheduled['project'] / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'distilflow-digits'")
    assert versions and all(v.tags.get("registration") == "complete" for v in versions)


def test_a_scheduled_promotion_runs_after_the_scheduled_pipeline(scheduled):
    run = scheduled["promote"]
    assert run is not None, f"no scheduled promotion completed after the pipeline\n{scheduled['logs']}"
    assert run["auto_scheduled"] is True

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{scheduled['project'] / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("distilflow-digits", "champion")
    assert champion.tags["promotion.decision"] == "promoted" and champion.tags["promotion.by"] == "schedule:promote"
    assert champion.tags["registration"] == "complete"
