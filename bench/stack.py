"""8. The team stack: concurrent pipeline runs on the PostgreSQL-backed servers vs the embedded SQLite default.

Side by side in one benchmark run, alternating: a batch of `concurrency`
pipeline runs (`python -m distilflow run`, short settings, each in its own
project folder with its own `data.name`, so no two share an experiment or a
registered model) started at once

- on the stack (`python -m stack up --only postgres,mlflow,prefect`): every run
  goes to the one MLflow server on PostgreSQL and the one Prefect server on
  PostgreSQL, through `MLFLOW_TRACKING_URI` and `PREFECT_API_URL` only;
- on the default: no variables, so each run opens its project's embedded
  SQLite store and a temporary Prefect API on the user's one Prefect home
  (shared by the runs of a batch, as on one person's machine).

Each batch gets a fresh Prefect home and fresh project folders, so nothing is
answered from an earlier batch's cache. Reported per contender: errors (a run
that exits non-zero, registers nothing, or leaves an MLflow run RUNNING; must
be 0 on PostgreSQL), the batch's wall time, throughput (runs that registered
a model, per hour of batch wall time), and each run's wall time.

TODO(search): the search's throughput (trials per hour on the stack's Dask
workers with the Optuna storage on PostgreSQL) belongs here too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, check, client_env, distilflow_command, make_project, summarize
from distilflow.layout import Layout
from distilflow.settings import ENV
from stack.components import read_env

OVERRIDES = [
    "backbone.spec=builtin:cnn",
    "backbone.width=16",
    "train.epochs=3",
    "train.warmup_epochs=0",
    "transfer.enabled=false",
    "distill.epochs=3",
    "distill.gain_label_budgets=[]",
    "quantize.calibration_size=64",
    "evaluate.repeats=5",
    "select.max_drop=0.1",
]
CONTENDERS = ("postgresql_stack", "sqlite_default")  # the first runs first in even rounds


def _running_runs(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=1000)) if ids else 0


def _batch(label: str, work: Path, digits: Path, n: int, env_extra: dict[str, str]) -> dict:
    """`n` pipeline runs started at once; their outcome and times."""
    home = work / "prefect-home"
    home.mkdir(parents=True)
    procs = []
    t0 = time.perf_counter()
    for i in range(n):
        name = f"digits{label}{i}"
        project = make_project(work / f"p{i}", digits)
        cmd = distilflow_command("run", params=project / "params.yaml", overrides=[*OVERRIDES, f"data.name={name}"])
        env = {**client_env(), "PREFECT_HOME": str(home), **env_extra}
        log = work / f"run{i}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append((project, log, time.perf_counter(), proc))
    ended: dict[int, float] = {}
    deadline = time.perf_counter() + 1800
    while len(ended) < len(procs) and time.perf_counter() < deadline:
        for i, (_, _, _, proc) in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.perf_counter()
        time.sleep(0.2)
    walls, errors, reasons = [], 0, []
    for i, (project, log, started, proc) in enumerate(procs):
        if i not in ended:
            proc.kill()
        rc = proc.wait()
        walls.append(ended.get(i, time.perf_counter()) - started)
        text = log.read_text(errors="replace")
        if rc != 0 or "registered: " not in text:
            errors += 1
            said = [line for line in text.splitlines() if line.startswith("distilflow: error:")]
            last = (said or text.splitlines() or ["no output"])[-1]
            reasons.append(f"exit {rc}: {last[:200]}")
        elif ENV["tracking_uri"] not in env_extra:
            left = _running_runs(Layout(project).tracking_uri())
            if left:
                errors += 1
                reasons.append(f"{left} MLflow run(s) left RUNNING")
    batch_s = time.perf_counter() - t0
    if ENV["tracking_uri"] in env_extra:
        left = _running_runs(env_extra[ENV["tracking_uri"]])
        if left:
            errors += 1
            reasons.append(f"{left} MLflow run(s) left RUNNING on the server")
    return {"batch_s": batch_s, "run_s": walls, "errors": errors, "reasons": reasons, "runs": n}


def _stack_up(stack_dir: Path) -> None:
    """`python -m stack up` with PostgreSQL, MLflow and Prefect only, on free ports, in `stack_dir`."""
    up = subprocess.run(
        [
            sys.executable,
            "-m",
            "stack",
            "up",
            "--dir",
            str(stack_dir),
            "--auto-ports",
            "--only",
            "postgres,mlflow,prefect",
        ],
        cwd=REPO,
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if up.returncode != 0:
        raise RuntimeError(f"the stack did not start: {up.stderr.strip()[-300:]}")


def _stack_down(stack_dir: Path) -> None:
    """`python -m stack down --purge`: servers stopped, their data gone."""
    subprocess.run(
        [sys.executable, "-m", "stack", "down", "--dir", str(stack_dir), "--purge"],
        cwd=REPO,
        env=client_env(),
        capture_output=True,
        timeout=300,
    )


def _alternating_batches(
    work: Path, digits: Path, stack_env: dict[str, str], concurrency: int, rounds: int
) -> dict[str, list[dict]]:
    """`rounds` rounds of one batch per contender, the order swapped every round."""
    results: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    for r in range(rounds):
        order = list(CONTENDERS) if r % 2 == 0 else list(reversed(CONTENDERS))
        for name in order:
            print(f"  stack: round {r + 1}/{rounds}, {concurrency} concurrent runs on {name} ...", flush=True)
            extra = stack_env if name == "postgresql_stack" else {}
            # the label keeps experiments and models of different batches apart on the shared server too
            label = f"{'pg' if extra else 'sq'}{r}x"
            results[name].append(_batch(label, work / f"{name}-{r}", digits, concurrency, extra))
    return results


def _contender(batches: list[dict]) -> dict:
    """One contender's errors, batch wall time, throughput and run wall times over its batches."""
    # runs that registered a model, per hour of the batch's wall time: a failed run adds nothing
    throughput = [max(b["runs"] - b["errors"], 0) / b["batch_s"] * 3600 for b in batches]
    return {
        "errors": sum(b["errors"] for b in batches),
        "error_reasons": [x for b in batches for x in b["reasons"]],
        "batch_s": summarize([b["batch_s"] for b in batches]),
        "runs_per_hour": summarize(throughput),
        "run_s": summarize([s for b in batches for s in b["run_s"]]),
    }


def _targets(out: dict, ratio: float, concurrency: int) -> list[dict]:
    """No errors on the stack; its throughput at least 0.9× the SQLite default's."""
    return [
        check(
            "stack.postgres_errors",
            f"errors in {concurrency} concurrent pipeline runs on the PostgreSQL-backed MLflow + Prefect servers",
            out["postgresql_stack"]["errors"],
            "<=",
            0,
            unit="",
        ),
        check(
            "stack.throughput_vs_sqlite",
            f"throughput of {concurrency} concurrent runs on the stack / on the embedded SQLite default",
            ratio,
            ">=",
            0.9,
            note=f"{out['postgresql_stack']['runs_per_hour']['median']:.0f} vs "
            f"{out['sqlite_default']['runs_per_hour']['median']:.0f} runs/hour; SQLite errors: "
            f"{out['sqlite_default']['errors']}",
        ),
    ]


def run(concurrency: int = 4, rounds: int = 1, workdir: Path | None = None) -> dict:
    """`rounds` alternating pairs of batches (stack, SQLite default) of `concurrency` runs each."""
    from tasks.data import export_digits

    work = Path(workdir or tempfile.mkdtemp(prefix="bench-stack-"))
    work.mkdir(parents=True, exist_ok=True)
    digits = export_digits(work / "digits.csv")
    # the stack's PostgreSQL runs as the postgres user, which must walk into its folder: a 0711 folder of
    # its own in the temp dir (the bench's work folder is private, 0700)
    stack_home = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    os.chmod(stack_home, 0o711)
    stack_dir = stack_home / "stack"
    _stack_up(stack_dir)
    try:
        stack_env = read_env(stack_dir / "env")
        stack_env = {k: stack_env[k] for k in (ENV["tracking_uri"], ENV["prefect_api_url"])}
        results = _alternating_batches(work, digits, stack_env, concurrency, rounds)
    finally:
        _stack_down(stack_dir)
        shutil.rmtree(stack_home, ignore_errors=True)
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    out = {name: _contender(batches) for name, batches in results.items()}
    ratio = out["postgresql_stack"]["runs_per_hour"]["median"] / out["sqlite_default"]["runs_per_hour"]["median"]
    return {
        "setting": f"{concurrency} concurrent short pipeline runs (builtin CNN, 3 epochs), {rounds} alternating "
        "round(s); each run its own project and data.name; a fresh Prefect home per batch",
        "concurrency": concurrency,
        "rounds": rounds,
        "contenders": out,
        "throughput_ratio": ratio,
        "targets": _targets(out, ratio, concurrency),
    }


if __name__ == "__main__":  # python -m bench.stack [CONCURRENCY] [ROUNDS]: this family alone, printed as JSON
    args = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(run(*args), indent=2))
