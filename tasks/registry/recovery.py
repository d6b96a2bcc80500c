"""What a crashed process leaves in the registry, cleaned up by the next one that takes the lock.

A process killed outright (kill -9, a lost machine) can leave:
- MLflow runs still RUNNING: each run records `distilflow.host` and
  `distilflow.pid`, so a run of a process on this machine that no longer
  exists is marked KILLED;
- model versions still `registration=pending`: registration marks versions
  complete only at its end, so a pending version whose register run is no
  longer running was abandoned half-way, and is deleted (with any alias on it);
- a promotion recorded as intent but not applied: finished by
  `tasks/registry/promotion.py:finish_interrupted`.
"""

from __future__ import annotations

import socket

from distilflow.locks import process_alive


def kill_dead_runs(tracker) -> list[str]:
    """Mark KILLED every RUNNING run whose process, on this machine, is gone; returns their ids."""
    client = tracker.client
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(
        experiments, f"attributes.status = 'RUNNING' and tags.`distilflow.host` = '{host}'", max_results=1000
    )
    killed = []
    for run in runs:
        pid = run.data.tags.get("distilflow.pid", "")
        if pid.isdigit() and not process_alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    return killed


def remove_abandoned_versions(tracker, model: str) -> list[str]:
    """Delete the `registration=pending` versions of `model` (and its references) whose register run has ended."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    removed = []
    for name in (model, f"{model}-teacher", f"{model}-student"):
        try:
            versions = client.search_model_versions(f"name = '{name}'", max_results=1000)
        except MlflowException:
            continue
        for mv in versions:
            if mv.tags.get("registration") != "pending":
                continue
            try:
                running = mv.run_id and client.get_run(mv.run_id).info.status == "RUNNING"
            except MlflowException:
                running = False
            if running:
                continue  # a registration in progress (under the lock, so on another store's lock: leave it)
            for alias, version in (client.get_registered_model(name).aliases or {}).items():
                if str(version) == str(mv.version):
                    client.delete_registered_model_alias(name, alias)
            client.delete_model_version(name, mv.version)
            removed.append(f"{name} v{mv.version}")
    return removed


def recover_crashed(tracker, model: str) -> list[str]:
    """Clean what crashed processes left for `model`; one line per thing done (nothing when all is well)."""
    from tasks.registry.promotion import finish_interrupted

    lines = [f"recovered: marked MLflow run {r} KILLED (its process is gone)" for r in kill_dead_runs(tracker)]
    lines += [
        f"recovered: removed {v}, a registration a crashed run left pending"
        for v in remove_abandoned_versions(tracker, model)
    ]
    lines += [
        f"recovered: finished the interrupted promotion of {model} v{v}" for v in finish_interrupted(tracker, model)
    ]
    return lines
