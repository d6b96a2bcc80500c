"""The search space: params paths with distributions, checked by the params schema before any trial starts.

A dimension is a params path (`distill.temperature`) with `int`, `float` or
`choice` (distilflow/params.py:Dimension). Before the first trial, every path
must exist, both bounds (or every choice) must pass the same typed params
model a normal run uses, and the stages that read the path must be ones the
search reruns: a student search reruns distill → select on one teacher, a
teacher search reruns the fine-tune.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from distilflow.errors import DistilflowError
from distilflow.params import Dimension, Params
from distilflow.stages import STAGES, Stage, stages_for

# the stages a trial reruns, per target; everything upstream runs once, before the trials
TRIAL_STAGES = {
    "student": ("distill", "prune", "quantize", "evaluate", "select"),
    "teacher": ("finetune",),
}
PREPARED_UP_TO = {"student": "finetune", "teacher": "backbone"}
HOW = {
    "student": "a student search tunes distill, prune, quantize and select keys on one teacher",
    "teacher": "a teacher search tunes the fine-tune (train.*)",
}


def readers(key: str) -> list[str]:
    """The stages whose declared params read `key` (the key itself, a section above it, or a value below it)."""
    out = []
    for stage in STAGES:
        for read in stage.params.values():
            if key == read or key.startswith(read + ".") or read.startswith(key + "."):
                out.append(stage.name)
                break
    return out


def _check_value(params: Params, where: str, key: str, value: Any) -> None:
    try:
        params.with_values({key: value}, source=where)
    except DistilflowError as exc:
        detail = str(exc).splitlines()[0].split(": ", 1)[-1]
        raise DistilflowError(f"{where}: {value!r} is not a valid {key} ({detail})") from None


def _check_path(params: Params, where: str, key: str, target: str, searched: bool = True) -> None:
    try:
        value = params.get(key)
    except DistilflowError as exc:
        raise DistilflowError(f"{where}: {exc}") from None
    if isinstance(value, BaseModel):
        raise DistilflowError(
            f"{where}: '{key}' is a section; name one value in it (e.g. '{key}.{next(iter(value.model_fields))}')"
        )
    read = readers(key)
    if not read:
        raise DistilflowError(f"{where}: no stage reads '{key}', so trials could not differ by it")
    names = [s.name for s in STAGES]
    once = names[: names.index(PREPARED_UP_TO[target]) + 1]
    upstream = [name for name in read if name in once]
    other = "teacher" if target == "student" else "student"
    if upstream:
        raise DistilflowError(
            f"{where}: '{key}' is read by {', '.join(upstream)}, which runs once before a {target} search's trials "
            f"({HOW[target]}; search.target: {other} if you meant that)"
        )
    if searched and not any(name in TRIAL_STAGES[target] for name in read):  # a fixed value may be moot
        raise DistilflowError(
            f"{where}: no stage a {target} trial runs reads '{key}' ({HOW[target]}; "
            f"search.target: {other} if you meant that)"
        )


def validate_space(params: Params) -> dict[str, Dimension]:
    """The space of `params.search`, every path and bound checked; a DistilflowError names the first bad key."""
    cfg = params.search
    if not cfg.space:
        raise DistilflowError(
            "search.space is empty: declare at least one params path, e.g. "
            "search.space: {distill.temperature: {float: [1, 8]}}"
        )
    for key, dim in cfg.space.items():
        where = f"search.space.{key}"
        _check_path(params, where, key, cfg.target)
        for value in dim.values_to_check():
            _check_value(params, where, key, value)
        if dim.kind == "float" and dim.float_range[0] < dim.float_range[1]:
            low, high = dim.float_range  # a fractional value: an int key would take the bounds, not what is sampled
            _check_value(params, where, key, low + (high - low) * 0.37)
    for key, value in cfg.fixed.items():
        where = f"search.fixed.{key}"
        if key in cfg.space:
            raise DistilflowError(f"{where}: '{key}' is both searched and fixed; keep one")
        _check_path(params, where, key, cfg.target, searched=False)
        _check_value(params, where, key, value)
    if cfg.target == "student" and not params.distill.enabled:
        raise DistilflowError(
            "search.target=student needs distill.enabled=true: with no student there is nothing to search"
        )
    return dict(cfg.space)


def suggest(trial, space: dict[str, Dimension]) -> dict[str, Any]:
    """One value per dimension from an Optuna trial (its sampler decides): {params path: value}."""
    values = {}
    for key, dim in space.items():
        if dim.kind == "int":
            low, high = dim.int_range
            values[key] = trial.suggest_int(key, low, high, log=dim.log, step=int(dim.step or 1))
        elif dim.kind == "float":
            low, high = dim.float_range
            values[key] = trial.suggest_float(key, low, high, log=dim.log, step=dim.step)
        else:
            values[key] = trial.suggest_categorical(key, dim.choice)
    return values


def trial_params(params: Params, values: dict[str, Any]) -> Params:
    """The params a trial runs with: the project's, `search.fixed`, then the trial's values."""
    return params.with_values({**params.search.fixed, **values}, source="search trial")


def trial_stages(params: Params) -> list[Stage]:
    """The stages a trial reruns with its params, in order."""
    return [s for s in stages_for(params) if s.name in TRIAL_STAGES[params.search.target]]


def prepared_stages(params: Params) -> list[Stage]:
    """The stages that run once, on the project's params, before any trial."""
    return stages_for(params, PREPARED_UP_TO[params.search.target])
