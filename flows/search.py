"""The search flow: an Optuna study whose trials are Prefect tasks, on local worker processes or a Dask cluster.

1. The space is checked against the params schema before anything runs.
2. The stages upstream of what is searched run once (cached like any run),
   under the project's run lock, and their outputs are snapshotted for the
   study: every trial reads the same teacher and splits.
3. Optuna asks for a trial; the trial (flows/trial.py) runs the pipeline's own
   stage functions with its params in its own folder, on a worker; Optuna is
   told the result. `search.workers` trials are in flight at once. Trials hand
   their results back, and only this process writes to MLflow: one nested run
   per trial under the search's run, so SQLite never sees concurrent writers.
4. A student search re-measures the best trials one at a time, applies
   `select:` to all their candidates, and registers the pick as
   `@challenger` through the normal registration; a teacher search writes the
   best fine-tune as a params file.

The study lives in Optuna RDB storage, so a killed search resumes: completed
trials are kept, a trial that was running is marked failed and not counted.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, task
from pydantic import SecretStr

from distilflow.errors import DistilflowError
from distilflow.hashing import path_hash
from distilflow.io import read_json, write_json, write_text
from distilflow.layout import Layout
from distilflow.locks import file_lock
from distilflow.params import Params
from distilflow.redact import redact
from distilflow.stages import BY_NAME
from distilflow.tracking import Tracker, lineage_tags
from flows.pipeline import project_transaction, register, run_stages
from flows.trial import TrialPayload, link_inputs, run_trial, shared_names
from tasks.search import front as fr
from tasks.search.report import search_markdown, search_plot, searched_params
from tasks.search.space import prepared_stages, suggest, trial_params, validate_space

SEARCH_DIR = ".distilflow/search"
STORAGE_ENV = "DISTILFLOW_SEARCH_STORAGE"  # a database URL with a password belongs here, not in params.yaml
DASK_ENV = "DISTILFLOW_DASK_ADDRESS"  # a team's scheduler (python -m stack up writes it): trials run there
PLOT, REPORT, SUMMARY, SEARCHED = (
    "reports/search_pareto.png",
    "reports/search.md",
    "reports/search.json",
    "params.searched.yaml",
)


def storage_url(params: Params, root: Path) -> str:
    """$DISTILFLOW_SEARCH_STORAGE, else `search.storage`, else a SQLite file in the project's .distilflow/."""
    return os.environ.get(STORAGE_ENV) or params.search.storage or f"sqlite:///{root / '.distilflow' / 'search.db'}"


def with_environment(params: Params) -> Params:
    """$DISTILFLOW_DASK_ADDRESS, when set, sends the trials to that Dask scheduler (search.runner=dask)."""
    address = os.environ.get(DASK_ENV)
    return params.with_values({"search.runner": "dask", "search.dask_address": address}) if address else params


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
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # trial processes write their epochs beside the driver
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif url.startswith("postgresql"):
        kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:  # noqa: BLE001 - any driver's error: one line, credentials hidden
        detail = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise DistilflowError(f"search storage {redact(url)} could not be opened: {detail}") from None


@contextmanager
def study_lock(url: str, storage, name: str, root: Path) -> Iterator[None]:
    """One driver per study: an flock beside a SQLite file; a PostgreSQL advisory lock (freed if we die) on a server."""
    if url.startswith("postgresql"):
        import sqlalchemy as sa

        with storage.engine.connect() as conn:
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(hashtext(:n))"), {"n": f"distilflow:{name}"})
            if not got.scalar():
                raise DistilflowError(f"study {name} is being run by another `distilflow search` (another machine?)")
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:n))"), {"n": f"distilflow:{name}"})
        return
    with file_lock(
        root / SEARCH_DIR / f"{name}.lock", 0, f"study {name}", "another search", "search.study_name", wait=False
    ):
        yield


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


def _worker_init(threads: int) -> None:
    """A local trial worker: ends if the search process is killed, trains on `threads` threads, logs like the CLI."""
    import ctypes
    import signal

    import torch

    from distilflow.errors import quiet_user_error_tracebacks

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    torch.set_num_threads(threads)
    quiet_user_error_tracebacks()


def task_runner(params: Params):
    """The Prefect task runner `search.runner` names."""
    cfg = params.search
    if cfg.runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=cfg.dask_address)
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=cfg.workers, initializer=_worker_init, initargs=(cfg.threads_per_trial,))


@task(name="trial", persist_result=False)
def trial_task(payload: TrialPayload) -> dict:
    """One trial, on whichever worker the task runner gives it."""
    return run_trial(payload)


def _config(params: Params) -> dict:
    """What a study is: resuming it with other settings would mix incomparable trials."""
    cfg = params.search
    return {
        "target": cfg.target,
        "objectives": cfg.objectives,
        "space": {k: v.model_dump(mode="json", by_alias=True) for k, v in cfg.space.items()},
        "fixed": cfg.fixed,
        "select": params.select.model_dump(mode="json"),
    }


def _sampler(params: Params):
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

    sampler = _sampler(params)
    directions = fr.directions(params)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        started = study.user_attrs.get("distilflow.config")
        if started != _config(params) or [d.name.lower() for d in study.directions] != directions:
            raise DistilflowError(
                f"study {name} was started with another search setup (space, objectives, fixed values or select "
                f"policy): set search.study_name to start a new study, or restore the settings it ran with"
            )
        return study
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions)
    study.set_user_attr("distilflow.config", _config(params))
    study.set_user_attr("teacher_val_accuracy", teacher_val)
    return study


def fail_interrupted(study) -> list[int]:
    """Trials left RUNNING by a killed search: failed, not counted (we hold the study's lock, so none is live)."""
    from optuna.trial import TrialState

    numbers = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted: its search process was stopped")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        numbers.append(t.number)
    return numbers


def snapshot(layout: Layout, folder: Path, names: list[str], recorded: dict | None) -> dict[str, str]:
    """Copy the prepared outputs into the study's folder once; {name: content hash}. A resumed study's must match."""
    current = {n: path_hash(layout.path(n)) for n in names}
    if recorded is not None and recorded != current:
        changed = sorted(n for n in names if recorded.get(n) != current[n])
        raise DistilflowError(
            f"the project's {', '.join(changed)} changed since this study started (new data or teacher): "
            "set search.study_name to start a new study on them"
        )
    target = Layout(folder)
    for n in names:
        src, dst = layout.path(n), target.path(n)
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        shutil.copytree(src, tmp) if src.is_dir() else shutil.copy2(src, tmp)
        tmp.rename(dst)
    return current


def _log_trial(tracker: Tracker, run, outcome: dict, values: dict, error: str | None) -> None:
    """A trial's nested run: its values, per-epoch curves, final figures and state."""
    from mlflow.entities import Metric

    run.log_params(values)
    tags = {"distilflow.trial.state": outcome["state"], "distilflow.trial.host": str(outcome.get("host", ""))}
    if error:
        tags |= {"distilflow.trial.error": error[:4000], "mlflow.note.content": f"Failed: {error[:4000]}"}
    if outcome.get("reason"):
        tags["distilflow.trial.reason"] = str(outcome["reason"])[:4000]
    o = outcome.get("objective") or {}
    if o.get("variant"):
        tags["distilflow.trial.candidate"] = o["variant"]
    run.set_tags(tags)
    metrics = {
        k: float(o[k])
        for k in ("val_accuracy", "val_macro_f1", "latency_b1_ms", "latency_b256_ms", "size_bytes", "test_accuracy")
        if k in o
    }
    metrics |= {f"seconds.{k}": v for k, v in outcome.get("stage_s", {}).items()}
    if "seconds" in outcome:
        metrics["seconds"] = outcome["seconds"]
    if "feasible" in o:
        metrics["feasible"] = float(bool(o["feasible"]))
    run.log_metrics(metrics)
    epochs = [
        Metric(f"{stage}.{k}", float(v), int(row.get("ended_ms", 0)), int(row["epoch"]))
        for stage, rows in outcome.get("history", {}).items()
        for row in rows
        for k, v in row.items()
        if k not in ("epoch", "ended_ms") and isinstance(v, (int, float))
    ]
    epochs += [Metric("pruner.val_accuracy", v, 0, int(e)) for e, v in outcome.get("curve", {}).items()]
    for i in range(0, len(epochs), 500):
        run.client.log_batch(run.run_id, metrics=epochs[i : i + 500])
    tracker.close(run, "FAILED" if outcome["state"] == "failed" else "FINISHED")


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


def _summaries(study, teacher_val: float, params: Params) -> list[dict]:
    """Every trial of the study (this session's and earlier ones') as the report's rows."""
    from optuna.trial import TrialState

    states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in states:
            continue
        state = "pruned" if is_pruned(t) else states[t.state]
        o = t.user_attrs.get("objective")
        note = t.user_attrs.get("fail_reason") or t.user_attrs.get("reason", "")
        out.append(
            {
                "number": t.number,
                "state": state,
                "values": dict(t.params),
                "objective": o,
                "seconds": t.user_attrs.get("seconds", 0.0),
                "note": note,
            }
        )
    done = [r for r in out if r["state"] == "complete" and r["objective"]]
    if params.search.target == "student" and done:
        cost = fr.OBJECTIVE_FIELD[params.select.objective]
        mask = fr.pareto_mask([r["objective"]["val_accuracy"] for r in done], [r["objective"][cost] for r in done])
        for r, m in zip(done, mask):
            r["front"] = m
    return out


def preflight(params: Params, url: str):
    """Everything checkable before a trial (or the shared stages) runs: the space, the name, the scheduler, storage."""
    validate_space(params)
    name = study_name(params)
    if params.search.runner == "dask":
        check_scheduler(params.search.dask_address)
    return name, open_storage(url)


def run_search(params: Params, **kwargs) -> dict:
    """The search flow on the task runner `search.runner` names (what the CLI calls)."""
    return search.with_options(task_runner=task_runner(params))(params=params, **kwargs)


@flow(name="distilflow-search", log_prints=True)
def search(params: Params, root: str, tracking_uri: str | SecretStr, storage: SecretStr, raw_params: dict) -> dict:
    """Run (or resume) the study `params.search` declares; register (student) or write (teacher) its best."""
    layout = Layout(root)
    url = storage.get_secret_value()
    name, optuna_storage = preflight(params, url)
    with study_lock(url, optuna_storage, name, layout.root):
        return _search(params, layout, tracking_uri, url, optuna_storage, name, raw_params)


def _search(params, layout, tracking_uri, url, optuna_storage, name, raw_params) -> dict:
    from tasks.registry.recovery import kill_dead_runs

    tracker = Tracker(tracking_uri, layout.root)
    for run_id in kill_dead_runs(tracker):
        print(f"recovered: marked MLflow run {run_id} KILLED (its process is gone)")
    folder = layout.root / SEARCH_DIR / name
    lineage = lineage_tags(layout.root, params)
    prepared = prepared_stages(params)
    with project_transaction(params, layout, prepared):  # the project's outputs: one writer at a time
        parent, study = _open(params, layout, tracker, optuna_storage, name, url, lineage, prepared, folder)
    status = "FAILED"
    try:
        summary = _trials(params, layout, tracker, parent, study, url, folder, name)
        summary |= _finish(params, layout, tracker, parent, study, folder, name, lineage, raw_params)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(parent, status)
    return summary


def _open(params, layout, tracker, optuna_storage, name, url, lineage, prepared, folder):
    """Prepare the shared inputs, open the study (and its MLflow parent run, reopened on resume)."""
    teacher_val = None
    tags = {**lineage, "distilflow.search.study": name, "distilflow.search.storage": redact(url)}
    parent_id = None
    try:
        import optuna

        existing = optuna.load_study(study_name=name, storage=optuna_storage)
        parent_id = existing.user_attrs.get("mlflow.parent_run_id")
    except KeyError:
        pass
    parent = tracker.reopen(parent_id) if parent_id else None
    if parent is None:
        parent = tracker.open(params.experiment_name(), f"search-{name}", tags=tags)
        parent.log_params({f"search.{k}": v for k, v in params.search.model_dump(mode="json").items()})
        parent.set_tags(
            {
                "mlflow.note.content": f"`distilflow search`: study `{name}` ({params.search.target}); one nested "
                "run per trial. The pick and every trial: `search.md`; the front: `search_pareto.png`."
            }
        )
    try:
        results, ran = run_stages(prepared, params, layout, tracker, parent, lineage)
        if params.search.target == "student":
            teacher_val = float(read_json(layout.teacher_metrics)["val.accuracy"])
        names = shared_names(prepared)
        study = open_study(params, optuna_storage, name, teacher_val or 0.0)
        study.set_user_attr("mlflow.parent_run_id", parent.run_id)
        recorded = study.user_attrs.get("distilflow.inputs")
        hashes = snapshot(layout, folder / "inputs", names, recorded)
        if recorded is None:
            study.set_user_attr("distilflow.inputs", hashes)
        for number in fail_interrupted(study):
            print(f"recovered: trial {number} of study {name} was interrupted; marked failed (not counted)")
    except BaseException:
        tracker.close(parent, "FAILED")
        raise
    return parent, study


def _trials(params, layout, tracker, parent, study, url, folder, name) -> dict:
    """Ask, run `workers` at a time, tell; until n_trials trials have finished (or the timeout)."""
    from optuna.trial import TrialState
    from prefect.futures import as_completed

    from tasks.engine import progress

    cfg = params.search
    space = dict(cfg.space)
    finished = sum(t.state == TrialState.COMPLETE or is_pruned(t) for t in study.get_trials(deepcopy=False))
    budget = max(0, cfg.n_trials - finished)
    deadline = time.monotonic() + cfg.timeout_s if cfg.timeout_s else None
    teacher_val = float(study.user_attrs.get("teacher_val_accuracy", 0.0))
    shared = study.user_attrs["distilflow.inputs"]
    forced = {"train.threads": cfg.threads_per_trial, "evaluate.threads": cfg.threads_per_trial}
    if cfg.target == "student":
        forced["quantize.teacher"] = False  # the teacher's int8 is the same in every trial: not rebuilt per trial
    pending: dict = {}
    asked = 0
    errors: list[str] = []
    bar = progress(budget, f"search {name}")
    bar.unit = "trial"
    if finished:
        print(f"resuming study {name}: {finished} trial(s) already finished, {budget} to go")

    def submit() -> None:
        nonlocal asked
        trial = study.ask()
        asked += 1
        values = suggest(trial, space)
        run = tracker.open(
            "",
            f"trial-{trial.number:04d}",
            tags={"optuna.study": name, "optuna.trial": str(trial.number)},
            parent=parent,
        )
        try:
            tparams = trial_params(params, values).with_values(forced, source="search trial")
        except DistilflowError as exc:  # a combination the schema's cross-checks refuse
            _fail(trial, run, values, str(exc))
            return
        payload = TrialPayload(
            number=trial.number,
            trial_id=trial._trial_id,
            study_id=study._study_id,
            storage=url,
            params=tparams.model_dump(mode="json"),
            values=values,
            trial_dir=str(folder / f"trial-{trial.number:04d}"),
            snapshot=str(folder / "inputs"),
            shared=shared,
            threads=cfg.threads_per_trial,
        )
        future = trial_task.with_options(task_run_name=f"trial-{trial.number:04d}").submit(payload)
        pending[future] = (trial, run, values)

    def _fail(trial, run, values, error: str) -> None:
        errors.append(f"trial {trial.number}: {error}")
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", error[:2000])
        study.tell(trial, state=TrialState.FAIL)
        _log_trial(tracker, run, {"state": "failed"}, values, error)
        print(f"trial {trial.number} failed: {error.splitlines()[0][:300]}")
        bar.update(1)

    try:
        while True:
            while len(pending) < cfg.workers and asked < budget and not (deadline and time.monotonic() > deadline):
                submit()
            if not pending:
                break
            future = next(as_completed(list(pending)))
            trial, run, values = pending.pop(future)
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - a trial that raises fails alone; the study goes on
                _fail(
                    trial,
                    run,
                    values,
                    f"{type(exc).__name__}: {exc}" if not isinstance(exc, DistilflowError) else str(exc),
                )
                continue
            storage = study._storage
            storage.set_trial_user_attr(trial._trial_id, "seconds", outcome["seconds"])
            # the stages' own compute: what the study's bookkeeping (ask → tell) is measured against (bench/search.py)
            storage.set_trial_user_attr(trial._trial_id, "compute_s", sum(outcome.get("stage_s", {}).values()))
            storage.set_trial_user_attr(trial._trial_id, "host", outcome["host"])
            storage.set_trial_user_attr(trial._trial_id, "pid", outcome["pid"])
            if outcome["state"] == "pruned":
                tell_pruned(study, trial, outcome["reason"])
            else:
                o = outcome["objective"]
                storage.set_trial_user_attr(trial._trial_id, "objective", o)
                if cfg.target == "student":
                    trial.set_constraint("accuracy_floor", fr.constraint(params, o, teacher_val))
                study.tell(trial, fr.trial_values(params, o))
            _log_trial(tracker, run, outcome, values, None)
            bar.update(1)
    except BaseException:
        for _trial, run, _values in pending.values():
            tracker.close(run, "KILLED")
        raise
    finally:
        bar.close()
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        first = errors[0] if errors else "no trial completed (all pruned?)"
        raise DistilflowError(f"search {name}: every trial failed, nothing registered; {first}")
    return {"study": name, "trials_this_session": asked, "failed_this_session": len(errors)}


def _reevaluate(params, folder, numbers: list[int], study) -> list[dict]:
    """Re-measure the shortlisted trials one at a time (the project's evaluate settings), then their select."""
    from flows.stages import run_plain

    rows = []
    shared = study.user_attrs["distilflow.inputs"]
    for number in numbers:
        trial = study.trials[number]
        tparams = trial_params(params, dict(trial.params))
        layout = link_inputs(folder / "inputs", folder / f"trial-{number:04d}", shared)
        run_plain(BY_NAME["evaluate"], tparams, layout)
        run_plain(BY_NAME["select"], tparams, layout)
        for r in read_json(layout.compression_json):
            if isinstance(r.get("candidate"), str) and r["candidate"]:
                rows.append({**r, "variant": f"trial {number}: {r['variant']}", "trial": number, "local": r["variant"]})
    return rows


def _finish(params, layout, tracker, parent, study, folder, name, lineage, raw_params) -> dict:
    """Choose, report and (student) register; (teacher) write the best fine-tune as a params file."""
    from tasks.candidates import dominated, majority_macro_f1, select_product

    cfg = params.search
    teacher_val = float(study.user_attrs.get("teacher_val_accuracy", 0.0))
    trials = _summaries(study, teacher_val, params)
    info = {
        "study": name,
        "target": cfg.target,
        "sampler": cfg.sampler,
        "seed": params.seed,
        "pruner": cfg.pruner,
        "runner": cfg.runner,
        "workers": cfg.workers,
        "threads": cfg.threads_per_trial,
        "teacher_val_accuracy": teacher_val,
        "eval_threads": params.evaluate.threads,
        "eval_repeats": params.evaluate.repeats,
    }
    summary: dict = {"trials": trials}
    keys = list(cfg.space)
    if cfg.target == "teacher":
        best = max(
            (t for t in trials if t["state"] == "complete"),
            key=lambda t: (t["objective"]["val_accuracy"], -t["number"]),
        )
        info["teacher_val_accuracy"] = best["objective"]["val_accuracy"]
        info["objectives_text"] = "validation accuracy of the fine-tuned teacher (maximized)"
        info["pick_text"] = (
            f"Trial {best['number']}: validation accuracy {best['objective']['val_accuracy']:.4f} with "
            + ", ".join(f"`{k}={v}`" for k, v in best["values"].items())
            + f". Written to `{SEARCHED}`: `python -m distilflow run --params {SEARCHED}` trains with it."
        )
        header = (
            f"written by `distilflow search` (study {name}, trial {best['number']}, validation accuracy "
            f"{best['objective']['val_accuracy']:.4f}); run it with: python -m distilflow run --params {SEARCHED}"
        )
        write_text(searched_params(raw_params, best["values"], header), layout.root / SEARCHED)
        summary |= {"best": best, "params_file": str(layout.root / SEARCHED)}
        objective = None
    else:
        cost = fr.OBJECTIVE_FIELD[params.select.objective]
        done = [
            {
                "number": t["number"],
                "val_accuracy": t["objective"]["val_accuracy"],
                "cost": t["objective"][cost],
                "feasible": t["objective"]["feasible"],
            }
            for t in trials
            if t["state"] == "complete"
        ]
        numbers = fr.shortlist(done, cfg.reevaluate_top)
        print(f"re-measuring trials {numbers} one at a time before the pick")
        rows = _reevaluate(params, folder, numbers, study)
        snap = Layout(folder / "inputs")
        majority = majority_macro_f1(read_json(snap.split_report)["class_counts"]["val"])
        choice = select_product(rows, teacher_val, majority, params.select)
        info["reevaluated"] = numbers
        info["objectives_text"] = (
            f"validation accuracy (max) vs {params.select.objective} (min), constraint select.max_drop "
            f"{params.select.max_drop}"
            if cfg.objectives == "pareto"
            else f"{params.select.objective} (min) subject to validation accuracy ≥ teacher − {params.select.max_drop}"
        )
        info["pick_text"] = f"**{choice['reason']}**" if choice["pick"] else f"**Nothing ships:** {choice['reason']}"
        info["plot"] = Path(PLOT).name
        search_plot(trials, layout.root / PLOT, cfg.threads_per_trial)
        summary["choice"] = choice
        objective = params.select.objective
        if choice["pick"] is not None:
            pick_row = next(r for r in rows if r["variant"] == choice["pick"]["variant"])
            choice["dominated_by"] = dominated(choice["pick"], choice["verdicts"])
            summary["pick_trial"] = pick_row["trial"]
    write_text(search_markdown(info, trials, keys, objective), layout.root / REPORT)
    write_json(
        {"info": info, "trials": trials, **{k: v for k, v in summary.items() if k != "trials"}}, layout.root / SUMMARY
    )
    for path in (REPORT, SUMMARY, PLOT, SEARCHED):
        if (layout.root / path).exists():
            parent.log_artifact(layout.root / path)
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "failed")}
    parent.log_metrics({f"trials.{k}": v for k, v in counts.items()})
    if cfg.target == "teacher":
        parent.log_metrics({"best.val_accuracy": summary["best"]["objective"]["val_accuracy"]})
        return summary
    choice = summary["choice"]
    if choice["pick"] is None:
        parent.set_tags({"registration": "refused", "selection.reason": choice["reason"][:4000]})
        from tasks.register import NotRegistered

        raise NotRegistered(f"search {name}: nothing registered: {choice['reason']}")
    number = summary["pick_trial"]
    trial = study.trials[number]
    values = dict(trial.params)
    header = (
        f"written by `distilflow search` (study {name}, trial {number}: the registered pick); "
        f"run it with: python -m distilflow run --params {SEARCHED}"
    )
    write_text(searched_params(raw_params, values, header), layout.root / SEARCHED)
    parent.log_artifact(layout.root / SEARCHED)
    parent.log_metrics(
        {
            "product.val_accuracy": choice["pick"]["val_accuracy"],
            "product.latency_b1_ms": choice["pick"]["latency_b1_ms"],
            "product.size_bytes": choice["pick"]["size_bytes"],
            "product.test_accuracy": choice["pick"]["test_accuracy"],
        }
    )
    # the raw data by absolute path: registration reads an example row from it, and the trial folder is elsewhere
    tparams = trial_params(params, values).with_values({"data.source": str(layout.resolve(params.data.source))})
    tlayout = Layout(folder / f"trial-{number:04d}")
    _own_selection(tlayout, choice, number)
    search_lineage = {
        **lineage,
        "search.study": name,
        "search.trial": str(number),
        "search.trials": str(len(trials)),
        "search.report": REPORT,
    }
    for extra in (layout.root / REPORT, layout.root / PLOT):
        shutil.copy2(extra, tlayout.reports / extra.name)
    summary["registered"] = register(tparams, tlayout, tracker, parent, search_lineage)
    return summary


def _own_selection(tlayout: Layout, choice: dict, number: int) -> None:
    """The trial's selection.json, saying the search's pick and why (registration reads it from there)."""
    own = read_json(tlayout.selection)
    local = choice["pick"]["variant"].removeprefix(f"trial {number}: ")
    verdict = next(v for v in own["verdicts"] if v["variant"] == local)
    own |= {"pick": verdict, "reason": choice["reason"], "search_policy": choice["policy"]}
    write_json(own, tlayout.selection)


def print_summary(summary: dict, uri: str) -> None:
    """What `distilflow search` prints at the end."""
    trials = summary["trials"]
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "failed")}
    print(
        f"study {summary['study']}: {len(trials)} trials ({counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['failed']} failed); report: {REPORT}"
    )
    if "best" in summary:
        best = summary["best"]
        print(f"best teacher: trial {best['number']} (validation accuracy {best['objective']['val_accuracy']:.4f})")
        print(f"its params: {summary['params_file']} (python -m distilflow run --params {SEARCHED})")
    if summary.get("choice"):
        print(f"product: {summary['choice']['reason']}")
    if summary.get("registered"):
        reg = summary["registered"]
        state = "unchanged" if reg["unchanged"] else "@challenger"
        print(f"registered: {reg['model']} version {reg['version']} ({state}) in {redact(uri)}")
    sys.stdout.flush()
