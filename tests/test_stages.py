"""One declaration per stage (distilflow/stages.py): the functions' arguments, the layering, Prefect kept out."""

import inspect
import subprocess
import sys

import pytest

from distilflow.params import Params
from distilflow.stages import BY_NAME, PRETRAIN, STAGES, stages_for, upstream
from tasks.stage_runner import FUNCTIONS, RUNTIME
from tests.conftest import REPO

OPTIONAL = {"on_epoch"}  # callbacks a caller may pass (the search's pruner); never part of what a stage reads


@pytest.mark.parametrize("stage", [*STAGES, PRETRAIN], ids=lambda s: s.name)
def test_a_stage_function_takes_exactly_what_its_declaration_names(stage):
    params = set(inspect.signature(FUNCTIONS[stage.name]).parameters) - OPTIONAL - set(RUNTIME.get(stage.name, ()))
    declared = set(stage.deps) | set(stage.outs) | set(stage.params) | set(stage.scratch)
    assert params == declared


def test_the_dag_follows_the_params_switches():
    names = lambda p: [s.name for s in stages_for(p)]  # noqa: E731
    default = Params()
    assert names(default) == [
        "ingest",
        "clean",
        "split",
        "normalize",
        "baseline",
        "backbone",
        "finetune",
        "transfer_gain",
        "distill",
        "quantize",
        "evaluate",
        "select",
    ]
    builtin = Params.model_validate(
        {"backbone": {"spec": "builtin:cnn"}, "prune": {"enabled": True}, "evaluate": {"baseline": False}}
    )
    assert names(builtin) == [
        "ingest",
        "clean",
        "split",
        "normalize",
        "backbone",
        "finetune",
        "distill",
        "prune",
        "quantize",
        "evaluate",
        "select",
    ]
    assert upstream(BY_NAME["quantize"], builtin) == ["split", "normalize", "distill", "prune", "finetune"]
    assert upstream(BY_NAME["quantize"], default) == ["split", "normalize", "distill", "finetune"]
    assert upstream(BY_NAME["select"], default) == ["evaluate", "finetune", "split"]
    assert names(default)[: len(stages_for(default, "normalize"))] == [s.name for s in stages_for(default, "normalize")]


@pytest.mark.parametrize("module", ["tasks.kd", "tasks.distill", "tasks.engine", "tasks.data", "distilflow.params"])
def test_importing_pure_logic_does_not_import_prefect(module):
    code = (
        f"import sys, {module}; assert 'prefect' not in sys.modules, sorted(m for m in sys.modules if 'prefect' in m)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
