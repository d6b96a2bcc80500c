"""A declared stage (distilflow/stages.py) as a Prefect task: wiring around tasks/stage_runner.py.

The task adds only what Prefect is for: the task's name (the stage's, no
random suffix), its cache key (the code, the *content* of what it reads, the
params it reads), a retry for I/O, and the edges to the tasks whose outputs
it reads (`wait_for`), so the UI draws the DAG.
"""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE

from distilflow.caching import retry_unless_user_error, stage_cache_key
from distilflow.layout import Layout
from distilflow.params import Params
from distilflow.records import StageResult
from distilflow.stages import BY_NAME, PRETRAIN, Stage
from tasks import stage_runner
from tasks.stage_runner import FUNCTIONS, RUNTIME, stage_kwargs


def _as_task(stage: Stage):
    @functools.wraps(FUNCTIONS[stage.name])  # Prefect reads the stage function's own signature through __wrapped__
    def run(**kwargs) -> StageResult:
        return stage_runner.call_stage(stage, kwargs)  # by attribute: the fault-injection driver replaces it

    if stage.name in RUNTIME:  # resolves against the registry each run: never answered from the cache
        return task(name=stage.name, task_run_name=stage.name, cache_policy=NO_CACHE)(run)
    retry = dict(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_unless_user_error)
    return task(
        name=stage.name,
        task_run_name=stage.name,
        persist_result=True,
        cache_key_fn=functools.partial(stage_cache_key, stage),
        **(retry if stage.name == "ingest" else {}),
    )(run)


TASKS = {name: _as_task(stage) for name, stage in {**BY_NAME, "pretrain": PRETRAIN}.items()}


def run_task(stage: Stage, params: Params, layout: Layout, wait_for: list | None = None, **runtime):
    """Run `stage` as its Prefect task; returns (result, cached, state).

    A cache hit whose output files were since changed or deleted runs afresh.
    """
    kwargs = stage_kwargs(stage, params, layout) | runtime
    state = TASKS[stage.name](**kwargs, wait_for=wait_for or [], return_state=True)
    result = state.result()
    cached = state.name == "Cached"
    if cached and not result.outputs_intact():
        state = TASKS[stage.name].with_options(refresh_cache=True)(**kwargs, wait_for=wait_for or [], return_state=True)
        result, cached = state.result(), False
    return result, cached, state
