"""The study and where it lives: storage, the one-driver lock, the sampler, and how trials are told.

The study lives in Optuna RDB storage (SQLite in the project by default,
PostgreSQL for a team), so a killed search resumes: completed trials are
kept, and a trial that was running is marked failed and not counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from distilflow.errors import DistilflowError
from distilflow.layout import Layout
from distilflow.locks import file_lock
from distilflow.params import Params
from distilflow.redact import redact
from distilflow.settings import Settings
from distilflow.uris import sqlite_path, sqlite_uri
from tasks.search import front as fr
from tasks.search.space import validate_space


def storage_url(params: Params, layout: Layout, settings: Settings) -> str:
    """$DISTILFLOW_SEARCH_STORAGE, else `search.storage`, else the catalog's SQLite file in `.distilflow/`."""
    return settings.search_storage or params.search.storage or sqlite_uri(layout.search_db)


def with_environment(params: Params, settings: Settings) -> Params:
    """$DISTILFLOW_DASK_ADDRESS, when set, sends the trials to that Dask scheduler (search.runner=dask)."""
    if not settings.dask_address:
        return params
    return params.with_values({"search.runner": "dask", "search.dask_address": settings.dask_address})


def study_name(params: Params) -> str:
    """`search.study_name`, or `<experiment>-<target>`; also a folder name, so checked."""
    name = params.search.study_name or f"{params.experiment_name()}-{params.search.target}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name):
        raise DistilflowError(f"search.study_name {name!r}: use letters, digits, '_', '.', '-' (it names a folder)")
    return name


def open_storage(url: str):
    """Optuna's RDB storage at `url`, or one clear line saying why it cannot be opened."""
    import optuna

    kwargs: dict = {}
    if (db := sqlite_path(url)) is not None:
        kwargs = {"connect_args": {"timeout": 60}}  # trial processes write their epochs beside the driver
        db.parent.mkdir(parents=True, exist_ok=True)
    elif url.startswith("postgresql"):
        kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:  # noqa: BLE001 - any driver's error: one line, credentials hidden
        detail = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise DistilflowError(f"search storage {redact(url)} could not be opened: {detail}") from None


def check_scheduler(address: str, timeout_s: float = 10.0) -> int:
    """The number of Dask workers at `address`; a clear error if none answers within `timeout_s`."""
    from distributed import Client

    try:
        with Client(address, timeout=f"{timeout_s}s") as client:
            workers = len(client.scheduler_info().get("workers", {}))
    except (OSError, TimeoutError) as exc:
        raise DistilflowError(
            f"search.dask_address {address}: no Dask scheduler answered within {timeout_s:.0f} s "
            f"({str(exc).splitlines()[0][:200]})"
        ) from None
    if workers == 0:
        raise DistilflowError(f"search.dask_address {address}: the scheduler answers but has no workers")
    return workers


def preflight(params: Params, url: str):
    """Everything checkable before a trial (or the shared stages) runs: the space, the name, the scheduler, storage."""
    validate_space(params)
    name = study_name(params)
    if params.search.runner == "dask":
        check_scheduler(params.search.dask_address)
    return name, open_storage(url)


@contextmanager
def study_lock(url: str, storage, name: str, layout: Layout) -> Iterator[None]:
    """One driver per study: an flock beside a SQLite file; a PostgreSQL advisory lock (freed if we die) on a server."""
    if not url.startswith("postgresql"):
        lock = layout.studies / f"{name}.lock"  # beside the study's folder (a name may hold dots)
        with file_lock(lock, 0, f"study {name}", "another search", "search.study_name", wait=False):
            yield
        return
    import sqlalchemy as sa

    with storage.engine.connect() as conn:
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(hashtext(:n))"), {"n": f"distilflow:{name}"})
        if not got.scalar():
            raise DistilflowError(f"study {name} is being run by another `distilflow search` (another machine?)")
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:n))"), {"n": f"distilflow:{name}"})


def study_config(params: Params) -> dict:
    """What a study is: resuming it with other settings would mix incomparable trials."""
    cfg = params.search
    return {
        "target": cfg.target,
        "objectives": cfg.objectives,
        "space": {k: v.model_dump(mode="json", by_alias=True) for k, v in cfg.space.items()},
        "fixed": cfg.fixed,
        "select": params.select.model_dump(mode="json"),
    }


def sampler(params: Params):
    """The sampler `search.sampler` names; TPE and NSGA-II read each trial's constraint (`Trial.set_constraint`)."""
    import optuna

    cfg = params.search
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=params.seed)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=params.seed, population_size=max(4, min(50, cfg.n_trials // 3)))
    return optuna.samplers.TPESampler(
        seed=params.seed,
        n_startup_trials=max(3, min(10, cfg.n_trials // 3)),
        constant_liar=cfg.workers > 1,  # trials in flight count as pessimistic guesses, so workers spread out
    )


def open_study(params: Params, storage, name: str, teacher_val: float):
    """Create the study, or load it after checking it was started with the same space and policy."""
    import optuna

    directions = fr.directions(params)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler(params))
        started = study.user_attrs.get("distilflow.config")
        if started != study_config(params) or [d.name.lower() for d in study.directions] != directions:
            raise DistilflowError(
                f"study {name} was started with another search setup (space, objectives, fixed values or select "
                f"policy): set search.study_name to start a new study, or restore the settings it ran with"
            )
        return study
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler(params), directions=directions)
    study.set_user_attr("distilflow.config", study_config(params))
    study.set_user_attr("teacher_val_accuracy", teacher_val)
    return study


def parent_run_id(storage, name: str) -> str | None:
    """The MLflow run of an existing study (a resumed search reopens it), or None for a new one."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage).user_attrs.get("mlflow.parent_run_id")
    except KeyError:
        return None


def fail_interrupted(study) -> list[int]:
    """Trials left RUNNING by a killed search: failed, not counted (we hold the study's lock, so none is live)."""
    from optuna.trial import TrialState

    numbers = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted: its search process was stopped")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        numbers.append(t.number)
    return numbers


def tell_pruned(study, trial, reason: str) -> None:
    """Record a trial the median rule stopped. Optuna's samplers cannot weigh a PRUNED trial in a
    multi-objective study (TPE asks for the study's single direction and raises), so there it is told
    FAIL with `pruned` set: the report, MLflow and the budget still count it as pruned."""
    from optuna.trial import TrialState

    study._storage.set_trial_user_attr(trial._trial_id, "reason", reason)
    if len(study.directions) > 1:
        study._storage.set_trial_user_attr(trial._trial_id, "pruned", True)
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, state=TrialState.PRUNED)


def is_pruned(trial) -> bool:
    """Whether the median rule stopped this trial (either way `tell_pruned` records it)."""
    from optuna.trial import TrialState

    return trial.state == TrialState.PRUNED or (trial.state == TrialState.FAIL and bool(trial.user_attrs.get("pruned")))


def finished_count(study) -> int:
    """Trials that count against `search.n_trials`: complete or pruned."""
    from optuna.trial import TrialState

    return sum(t.state == TrialState.COMPLETE or is_pruned(t) for t in study.get_trials(deepcopy=False))
