"""Scheduled deployments on a real Prefect API: prefect.yaml through `prefect deploy` and a worker, and `serve`'s."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distilflow.params import load_params
from flows.deployments import PROMOTE, TRAIN, deployments
from tests.conftest import REPO, edit_params

ENTRYPOINTS = {TRAIN: "flows/deployments.py:scheduled_pipeline", PROMOTE: "flows/deployments.py:scheduled_promote"}


def prefect_yaml() -> dict:
    return {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def test_prefect_yaml_matches_params_yaml():
    """prefect.yaml cannot read params.yaml, so the crons are written twice; this keeps them equal."""
    params = load_params(REPO / "params.yaml")
    deps = prefect_yaml()
    assert set(deps) == {TRAIN, PROMOTE}
    for name, cron in ((TRAIN, params.schedule.train_cron), (PROMOTE, params.schedule.promote_cron)):
        assert deps[name]["schedules"] == [{"cron": cron, "timezone": params.schedule.timezone}]
        assert deps[name]["concurrency_limit"] == 1 and deps[name]["entrypoint"] == ENTRYPOINTS[name]


def test_a_worker_deploy_refuses_deployments_that_serve_runs(prefect_api, project):
    from distilflow.errors import DistilflowError
    from flows.deployments import deploy_for_worker

    params = load_params(project / "params.yaml")
    for dep in deployments(params, str(project / "params.yaml")):
        dep.apply()  # what `distilflow serve` registers: no work pool
    with pytest.raises(DistilflowError, match="are served by `python -m distilflow serve`"):
        deploy_for_worker(params, str(project / "params.yaml"))


def test_serve_deployments_are_created_with_the_params_schedules(prefect_api, project):
    from prefect.client.orchestration import get_client

    edit_params(
        project, schedule={"train_cron": "15 1 * * 1-5", "promote_cron": "45 1 * * 1-5", "timezone": "Europe/Paris"}
    )
    params = load_params(project / "params.yaml")
    with get_client(sync_client=True) as client:
        for dep in deployments(params, str(project / "params.yaml")):
            dep.apply()
        for flow, name, cron in (
            ("distilflow-scheduled-pipeline", TRAIN, "15 1 * * 1-5"),
            ("distilflow-scheduled-promote", PROMOTE, "45 1 * * 1-5"),
        ):
            created = client.read_deployment_by_name(f"{flow}/{name}")
            assert [(s.schedule.cron, s.schedule.timezone) for s in created.schedules] == [(cron, "Europe/Paris")]
            assert created.parameters == {"params_file": str((project / "params.yaml").resolve())}
            assert created.global_concurrency_limit is not None and created.global_concurrency_limit.limit == 1


@pytest.mark.slow
def test_prefect_yaml_deploys_and_a_worker_completes_a_triggered_run(prefect_api, project, tmp_path):
    """`prefect deploy --all` from prefect.yaml, then a process worker runs the pipeline deployment (data half)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    code = tmp_path / "code"  # deploy from a copy: the worker runs the code from where it was deployed
    for rel in ("distilflow", "tasks", "flows", "prefect.yaml", "params.yaml", "pyproject.toml"):
        src = REPO / rel
        (
            shutil.copytree(src, code / rel, ignore=shutil.ignore_patterns("__pycache__"))
            if src.is_dir()
            else shutil.copy(src, code / rel)
        )
    env = {
        **os.environ,
        "PREFECT_API_URL": str(get_current_settings().api.url),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }

    def prefect(*args, timeout=240):
        proc = subprocess.run(
            ["prefect", "--no-prompt", *args], cwd=code, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    prefect("work-pool", "create", "distilflow", "--type", "process", "--overwrite")
    prefect("deploy", "--all")
    params = load_params(REPO / "params.yaml")
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name(f"distilflow-scheduled-pipeline/{TRAIN}")
        promote = client.read_deployment_by_name(f"distilflow-scheduled-promote/{PROMOTE}")
        assert [s.schedule.cron for s in nightly.schedules] == [params.schedule.train_cron]
        assert [s.schedule.cron for s in promote.schedules] == [params.schedule.promote_cron]
        assert nightly.global_concurrency_limit.limit == 1 and nightly.work_pool_name == "distilflow"
        run = client.create_flow_run_from_deployment(
            nightly.id, parameters={"params_file": str(project / "params.yaml"), "stop_after": "normalize"}
        )

    prefect("worker", "start", "--pool", "distilflow", "--type", "process", "--run-once", timeout=400)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), state
    assert (project / "data/split/test.parquet").is_file() and (project / "mlflow.db").is_file()

    # `serve` does not take over deployments a worker runs (it would run them from the wrong folder)
    from distilflow.errors import DistilflowError
    from flows.deployments import serve

    with pytest.raises(DistilflowError, match="already run on a worker"):
        serve(params, str(project / "params.yaml"))
