"""A declared stage (distilflow/stages.py) run as a plain call: what Prefect's task, DVC and a search trial all run.

The stage function gets exactly the arguments its declaration names: the
catalog paths it reads and writes and the params values it reads, plus the
runtime objects in `RUNTIME` (never part of a key). `call_stage` records the
content hashes of what it wrote and when it ran. flows/stages.py wraps the same
call as a Prefect task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from distilflow.hashing import path_hash
from distilflow.layout import Layout
from distilflow.params import Params
from distilflow.records import StageResult
from distilflow.stages import Stage
from tasks import backbone_source, baseline, data, distill, evaluate, finetune, prune, quantize, select, transfer
from tasks import pretrain as pretrain_stage

FUNCTIONS: dict[str, Callable[..., StageResult]] = {
    "ingest": data.ingest_stage,
    "clean": data.clean_stage,
    "split": data.split_stage,
    "normalize": data.normalize_stage,
    "baseline": baseline.baseline_stage,
    "backbone": backbone_source.backbone_stage,
    "finetune": finetune.finetune_stage,
    "transfer_gain": transfer.transfer_gain_stage,
    "distill": distill.distill_stage,
    "prune": prune.prune_stage,
    "quantize": quantize.quantize_stage,
    "evaluate": evaluate.evaluate_stage,
    "select": select.select_stage,
    "pretrain": pretrain_stage.pretrain_stage,
}
RUNTIME = {"backbone": ("tracker",)}  # objects a stage needs that are not files or params (never in a key)


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


def call_stage(stage: Stage, kwargs: dict) -> StageResult:
    """Call the stage's function (looked up per call: the bench times FUNCTIONS), then record what it wrote."""
    started = time.time()
    result = FUNCTIONS[stage.name](**kwargs)
    result.outputs = {str(kwargs[arg]): path_hash(kwargs[arg]) for arg in stage.outs if Path(kwargs[arg]).exists()}
    result.started_ms, result.ended_ms = int(started * 1000), int(time.time() * 1000)
    return result


def run_plain(stage: Stage, params: Params, layout: Layout, **runtime) -> StageResult:
    """The stage without Prefect (what `python -m distilflow stage NAME`, a search trial and the bench run)."""
    return call_stage(stage, stage_kwargs(stage, params, layout) | runtime)
