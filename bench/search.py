"""9. The search: searched product vs the fixed default recipe, TPE vs random, parallel efficiency, bookkeeping.

Every figure comes from the real command line (`python -m distilflow run` /
`search`, subprocesses, a fresh project per seed), in one benchmark run:

- **product**: per seed, the default recipe (`run`) and the search's
  registered pick (`search`, TPE) on the same project: test accuracy drop vs
  the fp32 teacher (chosen on validation, reported on test), batch-1 and
  batch-256 speed-up over the teacher's fp32 runtime (median, and at the
  minimum: a verdict that holds at the median only is called fragile), size
  ratio. Latencies are those the pipeline's own evaluate measured, teacher
  and candidate in one process.
- **hypervolume**: the same trial budget with `search.sampler=random`; both
  fronts are scored against one shared reference point.
- **parallel efficiency**: the same random proposals (seeded, pruner off)
  with 1 and 2 local workers, and on a Dask LocalCluster of 1 and 2
  single-threaded worker processes (DISTILFLOW_DASK_ADDRESS); trials per hour
  over the span from the first trial's start to the last one's end.
- **bookkeeping**: per trial of the 1-worker study, Optuna's ask → tell time
  minus the stages' own compute, over that compute (Optuna + Prefect +
  MLflow + process hand-off).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import REPO, check, client_env, distilflow_command, make_project, summarize
from distilflow.layout import Layout
from distilflow.uris import sqlite_uri


def distilflow(project: Path, *args: str, overrides: list[str], env: dict[str, str] | None = None):
    """`python -m distilflow ARGS --params PROJECT/params.yaml --set ...`; (exit code, output)."""
    cmd = distilflow_command(*args, params=project / "params.yaml", overrides=overrides)
    proc = subprocess.run(
        cmd, cwd=REPO, env=env or client_env(PREFECT_HOME=str(project / ".prefect")), capture_output=True, text=True
    )
    return proc.returncode, proc.stdout + proc.stderr


def trials_of(project: Path, study: str, storage: str | None = None) -> list:
    """The study's finished trials, read back from its Optuna storage."""
    import optuna
    from optuna.trial import TrialState

    url = storage or sqlite_uri(Layout(project).search_db)
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in optuna.load_study(study_name=study, storage=url).trials if t.state in done]


def trials_per_hour(trials: list) -> float:
    """Finished trials over the span from the first start to the last end."""
    span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    return len(trials) / span.total_seconds() * 3600


def bookkeeping(trials: list) -> list[float]:
    """(ask → tell) − the stages' compute, over that compute, per completed trial."""
    out = []
    for t in trials:
        compute = t.user_attrs.get("compute_s")
        if t.state.name == "COMPLETE" and compute:
            wall = (t.datetime_complete - t.datetime_start).total_seconds()
            out.append((wall - compute) / compute)
    return out


def _rows(path: Path) -> dict[str, dict]:
    from distilflow.io import read_json

    return {r["variant"]: r for r in read_json(path)}


def product_figures(compression_json: Path, variant: str) -> dict:
    """The product row against the fp32 teacher's row of the same evaluate run."""
    rows = _rows(compression_json)
    p, t = rows[variant], rows["teacher fp32"]
    return {
        "variant": variant,
        "test_accuracy": p["accuracy"],
        "teacher_test_accuracy": t["accuracy"],
        "drop_pts": (t["accuracy"] - p["accuracy"]) * 100,
        "speedup_b1": t["latency_b1_median_ms"] / p["latency_b1_median_ms"],
        "speedup_b1_at_min": t["latency_b1_min_ms"] / p["latency_b1_min_ms"],
        "speedup_b256": t["latency_b256_median_ms"] / p["latency_b256_median_ms"],
        "speedup_b256_at_min": t["latency_b256_min_ms"] / p["latency_b256_min_ms"],
        "smaller": t["file_bytes"] / p["file_bytes"],
        "latency_b1_ms": {k: p[f"latency_b1_{k}_ms"] for k in ("min", "median", "max")},
        "latency_b256_ms": {k: p[f"latency_b256_{k}_ms"] for k in ("min", "median", "max")},
        "teacher_latency_b1_ms": {k: t[f"latency_b1_{k}_ms"] for k in ("min", "median", "max")},
        "teacher_latency_b256_ms": {k: t[f"latency_b256_{k}_ms"] for k in ("min", "median", "max")},
    }


def _default_product(project: Path) -> dict:
    from distilflow.io import read_json

    pick = read_json(Layout(project).selection)["pick"]
    return product_figures(Layout(project).compression_json, pick["variant"])


def _searched_product(project: Path, study: str) -> dict:
    from distilflow.io import read_json

    summary = read_json(Layout(project).search_json)
    pick, number = summary["choice"]["pick"], summary["pick_trial"]
    trial_dir = Layout(project).trial(study, number)
    local = pick["variant"].split(": ", 1)[1]
    return {"trial": number, **product_figures(Layout(trial_dir).compression_json, local)}


def shared_hypervolume(fronts: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Each study's hypervolume against one reference: just below the worst accuracy, just above the worst cost."""
    from tasks.search.front import hypervolume

    points = [p for pts in fronts.values() for p in pts]
    reference = (min(a for a, _ in points) - 1e-3, max(c for _, c in points) * 1.05)
    return {name: hypervolume(pts, reference) for name, pts in fronts.items()}


def _points(trials: list, cost_field: str) -> list[tuple[float, float]]:
    return [
        (t.user_attrs["objective"]["val_accuracy"], t.user_attrs["objective"][cost_field])
        for t in trials
        if t.state.name == "COMPLETE" and t.user_attrs.get("objective")
    ]


def _search(project: Path, study: str, overrides: list[str], env: dict | None = None) -> tuple[list, str]:
    t0 = time.perf_counter()
    rc, out = distilflow(project, "search", overrides=[*overrides, f"search.study_name={study}"], env=env)
    print(f"    search {study}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    trials = trials_of(project, study)
    if not trials:
        raise RuntimeError(f"search {study} finished no trial (exit {rc}): {out[-600:]}")
    return trials, out


def _dask_cluster(workers: int):
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    )


def _one_seed(work: Path, seed: int, base: list[str], n_trials: int, cost: str) -> dict:
    """On a fresh project: the default recipe's product, the TPE search's pick, and both samplers' hypervolumes."""
    project = make_project(work / f"seed{seed}")
    common = [*base, f"seed={seed}"]
    print(f"  search: seed {seed}: the default recipe ...", flush=True)
    rc, out = distilflow(project, "run", overrides=common)
    if rc != 0:
        raise RuntimeError(f"the default recipe failed (exit {rc}): {out[-600:]}")
    default = _default_product(project)
    budget = [f"search.n_trials={n_trials}", "search.workers=2"]
    tpe, _ = _search(project, f"tpe{seed}", [*common, *budget, "search.sampler=tpe"])
    searched = _searched_product(project, f"tpe{seed}")
    rnd, _ = _search(project, f"random{seed}", [*common, *budget, "search.sampler=random"])
    volumes = shared_hypervolume({"tpe": _points(tpe, cost), "random": _points(rnd, cost)})
    return {"seed": seed, "default": default, "searched": searched, "hypervolume": volumes}


def _parallel_efficiency(project: Path, fair: list[str]) -> tuple[dict[str, float], list[float]]:
    """Trials per hour with 1 and 2 local workers, then 1 and 2 Dask workers; the 1-worker study's bookkeeping."""
    rates, overhead = {}, []
    for workers in (1, 2):
        trials, _ = _search(project, f"local{workers}", [*fair, f"search.workers={workers}"])
        rates[f"local_{workers}"] = trials_per_hour(trials)
        if workers == 1:
            overhead = bookkeeping(trials)
    for workers in (1, 2):
        with _dask_cluster(workers) as cluster:
            env = client_env(PREFECT_HOME=str(project / ".prefect"), DISTILFLOW_DASK_ADDRESS=cluster.scheduler_address)
            trials, _ = _search(project, f"dask{workers}", [*fair, f"search.workers={workers}"], env=env)
        rates[f"dask_{workers}"] = trials_per_hour(trials)
    return rates, overhead


def _product_targets(products: list[tuple[dict, dict]]) -> list[dict]:
    """The searched product against the teacher (accuracy drop, speed-ups, size), the default recipe's as notes."""
    med = statistics.median
    targets = [
        check(
            "search.accuracy_drop",
            "searched product: test accuracy drop vs the fp32 teacher (median over seeds)",
            med([s["drop_pts"] for _, s in products]),
            "<=",
            1.0,
            unit="pts",
            note=f"default recipe: {med([d['drop_pts'] for d, _ in products]):.2f} pts",
        )
    ]
    for b in ("b1", "b256"):
        at_median = med([s[f"speedup_{b}"] for _, s in products])
        at_min = med([s[f"speedup_{b}_at_min"] for _, s in products])
        fragile = at_median >= 10 > at_min
        targets.append(
            check(
                f"search.speedup_{b}",
                f"searched product vs the teacher's fp32 runtime, batch {b[1:]} (median latencies)",
                at_median,
                ">=",
                10.0,
                note=f"at the minimum latencies: {at_min:.1f}×"
                + (" — FRAGILE: holds at the median, not at the minimum" if fragile else "")
                + f"; default recipe {med([d[f'speedup_{b}'] for d, _ in products]):.1f}×",
            )
        )
    targets.append(
        check(
            "search.smaller",
            "searched product vs the teacher: file size ratio",
            med([s["smaller"] for _, s in products]),
            ">=",
            50.0,
            note=f"default recipe {med([d['smaller'] for d, _ in products]):.1f}×",
        )
    )
    return targets


def _hypervolume_target(hv: list[dict[str, float]], n_trials: int) -> dict:
    """TPE's front against RandomSampler's at the same budget, median over seeds."""
    return check(
        "search.hypervolume_vs_random",
        f"TPE front's hypervolume / RandomSampler's at {n_trials} trials (val accuracy ↑, batch-1 latency ↓)",
        statistics.median([v["tpe"] / v["random"] if v["random"] else float("inf") for v in hv]),
        ">=",
        1.0,
        note=", ".join(f"tpe {v['tpe']:.4g} vs random {v['random']:.4g}" for v in hv),
    )


def _parallel_targets(rates: dict[str, float], overhead: list[float]) -> list[dict]:
    """2 workers against 1, locally and on Dask; the bookkeeping per trial."""
    return [
        check(
            "search.parallel_local",
            "trials per hour, 2 local workers / 1 (2 cores, 1 thread per trial)",
            rates["local_2"] / rates["local_1"],
            ">=",
            1.7,
            note=f"{rates['local_1']:.0f} → {rates['local_2']:.0f} trials/hour",
        ),
        check(
            "search.parallel_dask",
            "trials per hour, Dask LocalCluster of 2 worker processes / 1",
            rates["dask_2"] / rates["dask_1"],
            ">=",
            1.6,
            note=f"{rates['dask_1']:.0f} → {rates['dask_2']:.0f} trials/hour",
        ),
        check(
            "search.bookkeeping",
            "per trial: (Optuna ask → tell) − the stages' compute, over that compute (digits, 1 worker)",
            statistics.median(overhead) * 100 if overhead else float("nan"),
            "<=",
            5.0,
            unit="%",
            note=f"{len(overhead)} trials" + (f", {summarize([o * 100 for o in overhead])}" if overhead else ""),
        ),
    ]


def run(
    seeds=(0,),
    n_trials: int = 8,
    parallel_trials: int = 4,
    quick: bool = True,
    workdir: Path | None = None,
) -> dict:
    """The search family (see the module docstring); `quick` shortens every trial's epochs."""
    from bench.orchestration import QUICK_OVERRIDES
    from tasks.search.front import OBJECTIVE_FIELD

    work = Path(workdir or tempfile.mkdtemp(prefix="bench-search-"))
    base = list(QUICK_OVERRIDES if quick else [])  # the orchestration family's short settings
    try:
        per_seed = [_one_seed(work, seed, base, n_trials, OBJECTIVE_FIELD["latency_b1"]) for seed in seeds]
        # parallel efficiency and bookkeeping, on seed 0's project (its teacher is cached): same proposals
        fair = [*base, f"seed={seeds[0]}", "search.sampler=random", "search.pruner=none"]
        fair += [f"search.n_trials={parallel_trials}", "search.reevaluate_top=1", "search.threads_per_trial=1"]
        rates, overhead = _parallel_efficiency(work / f"seed{seeds[0]}", fair)
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    products = [(s["default"], s["searched"]) for s in per_seed]
    targets = _product_targets(products)
    targets.append(_hypervolume_target([s["hypervolume"] for s in per_seed], n_trials))
    targets += _parallel_targets(rates, overhead)
    return {
        "setting": f"digits demo, seeds {list(seeds)}, {n_trials} trials per study (2 local workers), "
        f"{parallel_trials} trials per parallel-efficiency study"
        + (" — quick: 3-epoch teacher and students" if quick else ""),
        "seeds": per_seed,
        "trials_per_hour": rates,
        "bookkeeping_ratio": overhead,
        "targets": targets,
    }


if __name__ == "__main__":  # python -m bench.search: this family alone, quick, printed as JSON
    import json

    print(json.dumps(run(), indent=2, default=str))
