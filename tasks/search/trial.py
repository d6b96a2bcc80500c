"""One search trial, in whatever process runs it (a local worker or a Dask worker): the pipeline's own stages.

A trial gets its data by path. Its folder is a project layout of its own
(`.distilflow/search/<study>/trial-NNNN/`, the catalog's `trial`) whose
shared inputs (the splits, the preprocessor, the teacher: what runs once
before the trials) are hard links to the study's snapshot of them
(`snapshot`), so the trial runs exactly the stage functions a normal run
does (tasks/stage_runner.py:run_plain), with its params.
On another machine, the project must be at the same path (shared storage):
the trial checks its inputs are there and are the ones the study was started
on, and says so if not.
"""

from __future__ import annotations

import inspect
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from distilflow.errors import DistilflowError
from distilflow.hashing import path_hash
from distilflow.io import read_json
from distilflow.layout import PATHS, Layout
from distilflow.params import Params
from tasks.search.pruning import EpochReporter, TrialPruned
from tasks.search.space import trial_stages
from tasks.stage_runner import FUNCTIONS, run_plain


@dataclass(frozen=True)
class TrialPayload:
    """All a trial needs, picklable: it may cross to another process or machine."""

    number: int
    trial_id: int
    study_id: int
    storage: str  # the Optuna storage URL (the trial reports its epochs there, for the pruner)
    params: dict  # the trial's full params (project params + search.fixed + its values), as JSON
    values: dict  # its searched values
    trial_dir: str
    snapshot: str
    shared: dict[str, str] = field(default_factory=dict)  # catalog name -> content hash, in the snapshot
    threads: int = 1


def worker_init(threads: int) -> None:
    """A local trial worker: ends if the search process is killed, trains on `threads` threads, logs like the CLI."""
    import ctypes
    import signal

    import torch

    from distilflow.errors import quiet_user_error_tracebacks

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    torch.set_num_threads(threads)
    quiet_user_error_tracebacks()


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


def link_inputs(snapshot: Path, trial_dir: Path, shared: dict[str, str]) -> Layout:
    """The trial's layout: its shared inputs linked to the snapshot (checked by content hash)."""
    source, layout = Layout(snapshot), Layout(trial_dir)
    for name, digest in shared.items():
        src = source.path(name)
        if not src.exists():
            raise DistilflowError(
                f"trial input {src} is missing on {socket.gethostname()}: a search on several machines needs the "
                "project on shared storage at the same path on every worker"
            )
        if path_hash(src) != digest:
            raise DistilflowError(
                f"trial input {src} on {socket.gethostname()} is not the one the study started on "
                "(its content changed): start a new study (search.study_name)"
            )
        dst = layout.path(name)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            _hardlink(src, dst)
    return layout


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def _hardlink(src: Path, dst: Path) -> None:
    """`src` at `dst` as hard links (real files, no copy: MLflow refuses symlinks that leave a folder)."""
    tmp = dst.with_name(dst.name + f".{os.getpid()}.partial")
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(tmp))
    try:
        tmp.rename(dst)
    except OSError:  # a concurrent re-evaluation linked it first
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _objective_source(params: Params, layout: Layout) -> dict:
    """What the sampler is told: the trial's pick by `select:` (or, if it picked none, its most accurate)."""
    if params.search.target == "teacher":
        metrics = read_json(layout.teacher_metrics)
        return {"val_accuracy": float(metrics["val.accuracy"]), "feasible": True, "pick": None}
    selection = read_json(layout.selection)
    pick = selection["pick"]
    if pick is None:
        best = max(selection["verdicts"], key=lambda v: (v["val_accuracy"], v["val_macro_f1"]))
        return {**best, "feasible": False, "pick": None, "reason": selection["reason"]}
    return {**pick, "feasible": True, "pick": pick["variant"], "reason": selection["reason"]}


def run_trial(payload: TrialPayload) -> dict:
    """Run the trial's stages; {"state": "complete"|"pruned", "objective", "history", "stage_s", ...}.

    A stage that raises fails the trial (the exception propagates, so Prefect
    records the task as failed); the pruner's stop is an outcome, not an error.
    """
    import optuna
    import torch

    started = time.time()
    torch.set_num_threads(payload.threads)
    params = Params.model_validate(payload.params)
    trial_dir = Path(payload.trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    layout = link_inputs(Path(payload.snapshot), trial_dir, payload.shared)
    storage = optuna.storages.get_storage(payload.storage)
    cfg = params.search
    reporter = EpochReporter(
        storage,
        payload.study_id,
        payload.trial_id,
        cfg.prune_warmup_epochs,
        cfg.prune_startup_trials,
        enabled=cfg.pruner != "none",
    )
    history: dict[str, list[dict]] = {}
    stage_s: dict[str, float] = {}
    outcome = {"number": payload.number, "host": socket.gethostname(), "pid": os.getpid(), "trial_dir": str(trial_dir)}
    try:
        for stage in trial_stages(params):
            watch = {"on_epoch": reporter} if "on_epoch" in inspect.signature(FUNCTIONS[stage.name]).parameters else {}
            t0 = time.perf_counter()
            result = run_plain(stage, params, layout, **watch)
            stage_s[stage.name] = time.perf_counter() - t0
            if result.history:
                history[stage.name] = result.history
        outcome |= {"state": "complete", "objective": _objective_source(params, layout)}
    except TrialPruned as stop:
        outcome |= {"state": "pruned", "reason": str(stop)}
    finally:
        shutil.rmtree(layout.path("checkpoints"), ignore_errors=True)
    return outcome | {"curve": reporter.curve, "history": history, "stage_s": stage_s, "seconds": time.time() - started}


def shared_names(prepared) -> list[str]:
    """The catalog names the prepared stages write: what every trial reads from the snapshot."""
    return [name for stage in prepared for name in stage.outs.values() if name in PATHS]
