"""The code part of a cache key follows a task's project imports."""

from pathlib import Path

from distilflow.caching import project_imports
from tests.conftest import REPO


def names(module: str) -> set[str]:
    return {str(p.relative_to(REPO)) for p in project_imports(REPO / module)}


def test_a_model_task_depends_on_the_modules_it_uses():
    finetune = names("tasks/finetune.py")
    assert {"tasks/models.py", "tasks/backbones.py", "tasks/engine.py", "distilflow/params.py"} <= finetune
    assert "tasks/quantize.py" not in finetune and "flows/pipeline.py" not in finetune


def test_imports_inside_functions_count_too():
    # tasks/inference.py imports load_classifier inside load_predictor
    assert "tasks/backbones.py" in names("tasks/inference.py")
    assert "tasks/plots.py" in names("tasks/distill.py")


def test_data_stages_do_not_depend_on_model_code():
    assert not {p for p in names("tasks/data.py") if Path(p).name in ("models.py", "finetune.py")}
