"""What every flow shares: running a content-cached stage safely."""

from __future__ import annotations

from distilflow.records import StageResult


def run_stage(task, **kwargs) -> tuple[StageResult, bool]:
    """Run a task; if its cache hit points at files since changed, run it afresh."""
    state = task(**kwargs, return_state=True)
    result = state.result()
    cached = state.name == "Cached"
    if cached and not result.outputs_intact():
        result, cached = task.with_options(refresh_cache=True)(**kwargs), False
    return result, cached
