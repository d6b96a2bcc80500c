"""Scheduled deployments: the pipeline nightly, then promotion of its challenger.

Two ways to run them, both with the crons from `params.yaml: schedule`:
- `python -m distilflow serve`: one long-lived process serves both deployments;
- `prefect.yaml` + a worker: `prefect work-pool create distilflow --type process`,
  `prefect deploy --all`, `prefect worker start --pool distilflow`
  (tests/test_deployments.py checks that prefect.yaml's crons match params.yaml).

The entry points take a params *file* (what a deployment can carry as a
parameter) and load it at this edge, like the CLI does. Each deployment has a
concurrency limit of one run, and registration/promotion of one model are
serialised by flows/locks.py:registry_lock on top.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import SecretStr

from distilflow.errors import DistilflowError
from distilflow.layout import Layout
from distilflow.params import Params, load_params
from distilflow.settings import Settings

TRAIN, PROMOTE = "nightly", "promote"


def _load(params_file: str, overrides: list[str] | None) -> tuple[Params, Path, str]:
    params = load_params(params_file, overrides or [])
    root = Path(params_file).resolve().parent
    return params, root, Layout(root).tracking_uri(Settings.from_env().tracking_uri)  # the deployment's edge


@flow(name="distilflow-scheduled-pipeline", log_prints=True)
def scheduled_pipeline(
    params_file: str = "params.yaml", overrides: list[str] | None = None, stop_after: str | None = None
) -> dict:
    """The pipeline as a deployment runs it: params from a file, tracking from the environment or the embedded store."""
    from flows.pipeline import pipeline

    params, root, uri = _load(params_file, overrides)
    return pipeline(params=params, root=str(root), tracking_uri=SecretStr(uri), stop_after=stop_after)


@flow(name="distilflow-scheduled-promote", log_prints=True)
def scheduled_promote(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Promotion of the newest challenger, as a deployment runs it."""
    from flows.registry import promote
    from tasks.registry.promotion import NoChallenger
    from tasks.registry.registration import UnknownModel

    params, root, uri = _load(params_file, overrides)
    try:
        return promote(params=params, root=str(root), tracking_uri=SecretStr(uri), actor="schedule:promote")
    except (
        NoChallenger,
        UnknownModel,
    ) as exc:  # nothing new (or nothing registered yet): not a failure of the schedule
        print(f"nothing to promote: {exc}")
        return {"decision": "none", "reasons": str(exc)}


def deployments(params: Params, params_file: str) -> list:
    """The two deployments with the params' crons and a concurrency limit of one run each."""
    from prefect.schedules import Cron

    common = dict(
        parameters={"params_file": str(Path(params_file).resolve())},
        concurrency_limit=1,
        tags=["distilflow", params.data.dataset_name],
    )
    return [
        scheduled_pipeline.to_deployment(
            TRAIN,
            schedules=[Cron(params.schedule.train_cron, timezone=params.schedule.timezone)],
            description="distilflow pipeline: data → teacher → student → int8 → register",
            **common,
        ),
        scheduled_promote.to_deployment(
            PROMOTE,
            schedules=[Cron(params.schedule.promote_cron, timezone=params.schedule.timezone)],
            description="promote the challenger if it passes the gates",
            **common,
        ),
    ]


FLOWS = {TRAIN: "distilflow-scheduled-pipeline", PROMOTE: "distilflow-scheduled-promote"}


def _existing(worker_managed: bool) -> list[str]:
    """Our deployments already on the API that a worker (True) or `serve` (False) runs."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = []
    with get_client(sync_client=True) as client:
        for name, flow_name in FLOWS.items():
            try:
                dep = client.read_deployment_by_name(f"{flow_name}/{name}")
            except ObjectNotFound:
                continue
            if bool(dep.work_pool_name) == worker_managed:
                found.append(
                    f"{flow_name}/{name}" + (f" (work pool {dep.work_pool_name})" if dep.work_pool_name else "")
                )
    return found


def serve(params: Params, params_file: str) -> None:
    """Serve both deployments from this process until interrupted (Prefect's `serve`).

    Refuses deployments a worker runs (`make worker`): the same names from two
    places would have each run the other's runs from the wrong folder.
    """
    from prefect import serve as prefect_serve

    if taken := _existing(worker_managed=True):
        raise DistilflowError(
            f"{', '.join(taken)} already run on a worker (`make worker`); use the worker, or delete "
            "them first (`prefect deployment delete <flow>/<name>`) to serve them from here"
        )
    prefect_serve(*deployments(params, params_file))


def deploy_for_worker(params: Params, params_file: str) -> int:
    """`prefect deploy --all` from prefect.yaml, unless `serve` runs the same deployments (one or the other)."""
    import subprocess
    import sys

    if taken := _existing(worker_managed=False):
        raise DistilflowError(
            f"{', '.join(taken)} are served by `python -m distilflow serve`; stop it and delete them "
            "(`prefect deployment delete <flow>/<name>`) to run them on a worker instead"
        )
    root = Path(params_file).resolve().parent
    prefect = Path(sys.executable).with_name("prefect")
    return subprocess.run([str(prefect), "--no-prompt", "deploy", "--all"], cwd=root).returncode
