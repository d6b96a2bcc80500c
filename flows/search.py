"""The search flow: an Optuna study whose trials are Prefect tasks, on local worker processes or a Dask cluster.

Wiring only; the engine is tasks/search/:
1. the space, the study's name, the scheduler and the storage are checked
   before anything runs (`study.preflight`);
2. the stages upstream of what is searched run once as a normal run's tasks,
   under the project's run lock, and their outputs are snapshotted for the
   study, so every trial reads the same teacher and splits (`prepare`);
3. `driver.TrialBook` asks Optuna for trials; each runs as a Prefect task
   (`trial.run_trial`: the pipeline's own stage functions, in its own folder)
   on the task runner `search.runner` names, `search.workers` at a time; only
   this process writes to MLflow (a nested run per trial);
4. `finish` chooses and reports; a student search's pick is registered as
   `@challenger` through the pipeline's own register step.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.futures import as_completed
from pydantic import SecretStr

from distilflow.layout import Layout
from distilflow.params import Params
from distilflow.project import project_transaction
from distilflow.tracking import Tracker, lineage_tags
from flows.pipeline import register, run_stages
from tasks.registry.recovery import kill_dead_runs
from tasks.search import study as st
from tasks.search.driver import TrialBook, describe
from tasks.search.finish import finish, registration
from tasks.search.prepare import open_parent, prepare_study
from tasks.search.space import prepared_stages
from tasks.search.trial import TrialPayload, run_trial, worker_init


def task_runner(params: Params):
    """The Prefect task runner `search.runner` names."""
    cfg = params.search
    if cfg.runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=cfg.dask_address)
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=cfg.workers, initializer=worker_init, initargs=(cfg.threads_per_trial,))


@task(name="trial", persist_result=False)
def trial_task(payload: TrialPayload) -> dict:
    """One trial, on whichever worker the task runner gives it."""
    return run_trial(payload)


def run_search(params: Params, **kwargs) -> dict:
    """The search flow on the task runner `search.runner` names (what the CLI calls)."""
    return search.with_options(task_runner=task_runner(params))(params=params, **kwargs)


@flow(name="distilflow-search", log_prints=True)
def search(params: Params, root: str, tracking_uri: str | SecretStr, storage: SecretStr, raw_params: dict) -> dict:
    """Run (or resume) the study `params.search` declares; register (student) or write (teacher) its best."""
    layout = Layout(root)
    url = storage.get_secret_value()
    name, optuna_storage = st.preflight(params, url)
    with st.study_lock(url, optuna_storage, name, layout):
        tracker = Tracker(tracking_uri, layout.root)
        for run_id in kill_dead_runs(tracker):
            print(f"recovered: marked MLflow run {run_id} KILLED (its process is gone)")
        lineage = lineage_tags(layout.root, params)
        with project_transaction(params, layout, prepared_stages(params)):  # the project's outputs: one writer
            parent = open_parent(tracker, params, optuna_storage, name, url, lineage)
            try:
                run_stages(prepared_stages(params), params, layout, tracker, parent, lineage)
                study = prepare_study(params, layout, optuna_storage, name, parent)
            except BaseException:
                tracker.close(parent, "FAILED")
                raise
        with tracker.closing(parent):
            summary = _trials(TrialBook(params, study, tracker, parent, url, layout, name), params.search.workers)
            summary |= finish(params, layout, parent, study, name, raw_params)
            if params.search.target == "student":
                tparams, tlayout, tlineage = registration(
                    params, layout, parent, study, name, summary, lineage, raw_params
                )
                summary["registered"] = register(tparams, tlayout, tracker, parent, tlineage)
    return summary


def _trials(book: TrialBook, workers: int) -> dict:
    """Ask, run `workers` trials at a time on the task runner, tell; until the budget or the timeout is spent."""
    pending: dict = {}
    try:
        while True:
            while len(pending) < workers and book.can_ask():
                if (asked := book.ask()) is not None:
                    pending[trial_task.with_options(task_run_name=asked.name).submit(asked.payload)] = asked
            if not pending:
                break
            future = next(as_completed(list(pending)))
            asked = pending.pop(future)
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - a trial that raises fails alone; the study goes on
                book.fail(asked, describe(exc))
                continue
            book.tell(asked, outcome)
    except BaseException:
        book.abandon(list(pending.values()))
        raise
    return book.result()
