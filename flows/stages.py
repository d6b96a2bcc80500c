"""Running a declared stage (distilflow/stages.py): as a Prefect task, or plainly (DVC, the bench).

The stage function gets exactly the arguments its declaration names: the
catalog paths it reads and writes and the params values it reads. The Prefect
task around it adds only what Prefect is for: the task's name (the stage's,
no random suffix), its cache key (the code, the *content* of what it reads,
the params it reads), a retry for I/O, and the edges to the tasks whose
outputs it reads (`wait_for`), so the UI draws the DAG.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

from prefect import task

from distilflow.caching import retry_unless_user_error, stage_cache_key
from distilflow.hashing import path_hash
from distilflow.layout import Layout
from distilflow.params import Params
from distilflow.records import StageResult
from distilflow.stages import BY_NAME, PRETRAIN, Stage
from flows import backbone
from tasks import baseline, data, distill, evaluate, finetune, prune, quantize, select, transfer
from tasks import pretrain as pretrain_stage

FUNCTIONS: dict[str, Callable[..., StageResult]] = {
    "ingest": data.ingest_stage,
    "clean": data.clean_stage,
    "split": data.split_stage,
    "normalize": data.normalize_stage,
    "baseline": baseline.baseline_stage,
    "backbone": backbone.backbone_stage,
    "finetune": finetune.finetune_stage,
    "transfer_gain": transfer.transfer_gain_stage,
    "distill": distill.distill_stage,
    "prune": prune.prune_stage,
    "quantize": quantize.quantize_stage,
    "evaluate": evaluate.evaluate_stage,
    "select": select.select_stage,
    "pretrain": pretrain_stage.pretrain_stage,
}
RUNTIME = {"backbone": ("tracker", "root")}  # objects a stage needs that are not files or params (never in a key)


def stage_kwargs(stage: Stage, params: Params, layout: Layout) -> dict:
    """The arguments of `stage`'s function for these params: paths by catalog name, params by key."""
    kwargs = {}
    for arg, name in stage.dep_names(params).items():
        if name is None:
            kwargs[arg] = None
        elif name.startswith("param:"):
            kwargs[arg] = layout.resolve(params.get(name.removeprefix("param:")))
        else:
            kwargs[arg] = layout.path(name)
    kwargs |= {arg: layout.path(name) for arg, name in stage.outs.items()}
    kwargs |= {name: layout.path(name) for name in stage.scratch}
    return kwargs | stage.param_values(params)


def _call(stage: Stage, fn: Callable[..., StageResult], kwargs: dict) -> StageResult:
    started = time.time()
    result = fn(**kwargs)
    result.outputs = {str(kwargs[arg]): path_hash(kwargs[arg]) for arg in stage.outs if Path(kwargs[arg]).exists()}
    result.started_ms, result.ended_ms = int(started * 1000), int(time.time() * 1000)
    return result


def run_plain(stage: Stage, params: Params, layout: Layout, **runtime) -> StageResult:
    """The stage without Prefect (what `python -m distilflow stage NAME` and the bench's plain pipeline run)."""
    return _call(stage, FUNCTIONS[stage.name], stage_kwargs(stage, params, layout) | runtime)


def _as_task(stage: Stage):
    fn = FUNCTIONS[stage.name]

    @functools.wraps(fn)  # Prefect reads the stage function's own signature through __wrapped__
    def run(**kwargs) -> StageResult:
        return _call(stage, FUNCTIONS[stage.name], kwargs)  # looked up per call (the bench times FUNCTIONS)

    if stage.name in RUNTIME:  # resolves against the registry each run: never answered from the cache
        from prefect.cache_policies import NO_CACHE

        return task(name=stage.name, task_run_name=stage.name, cache_policy=NO_CACHE)(run)
    retry = (
        dict(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_unless_user_error)
        if stage.name == "ingest"
        else {}
    )
    return task(
        name=stage.name,
        task_run_name=stage.name,
        persist_result=True,
        cache_key_fn=functools.partial(stage_cache_key, stage),
        **retry,
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
