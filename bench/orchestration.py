"""3. Orchestration overhead and 4. caching: the demo pipeline through Prefect + MLflow vs plain functions.

Both sides run the same stage functions on the same data and params, each in
a fresh child process on a fresh project folder, alternately, so the ratio
compares like with like. The Prefect side is `flows/pipeline.py:pipeline`,
called as `python -m distilflow run` calls it; the plain side calls the
`*_stage` functions in the flow's order (`plain_pipeline` below), with the
pretrained backbone passed as a file instead of through the MLflow registry.

The child processes time themselves (`Stopwatch` wrappers around the stage
functions, the Prefect API start, MLflow calls and the task wrapper), so the
overhead is broken down, not just totalled. The wrappers only time; they
change no behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Stopwatch, check, distilflow_command, make_project, summarize
from distilflow.settings import ENV

CHANGE = "distill.temperature=2.0"  # the one-param change of the caching benchmark
QUICK_OVERRIDES = [
    "train.epochs=3",
    "transfer.epochs=3",
    "distill.epochs=3",
    "pretrain.train.epochs=1",
    "evaluate.repeats=5",
    "select.max_drop=0.1",  # 3 epochs leave the students a few points under the teacher: still register one
]


# ---------------------------------------------------------------------------- the plain-functions side


def plain_pipeline(params, root: Path) -> list[str]:
    """The flow's stages as plain calls (tasks/stage_runner.py:run_plain), in the flow's order; returns the stages run.

    The demo's backbone is pretrained as the pretrain flow does, then handed
    over as a file (the plain side has no registry).
    """
    from distilflow.layout import Layout
    from distilflow.stages import PRETRAIN, stages_for
    from tasks.stage_runner import run_plain

    layout = Layout(root)
    ran = []
    if params.backbone.spec.startswith(f"mlflow:models:/{params.pretrain.registered_model}@"):
        run_plain(PRETRAIN, params, layout)
        pb = params.pretrain.backbone
        params = params.model_copy(
            update={
                "backbone": params.backbone.model_copy(
                    update={
                        "spec": f"file:{layout.pretrained / 'classifier/model.safetensors'}",
                        "arch": pb.spec,
                        "width": pb.width,
                        "depth": pb.depth,
                        "input_size": (28, 28),
                    }
                )
            }
        )
        ran.append("pretrain")
    for stage in stages_for(params):
        run_plain(stage, params, layout)
        ran.append(stage.name)
    return ran


# ---------------------------------------------------------------------------- child processes


def _instrument_stages(sw: Stopwatch) -> None:
    """Time every stage function, on both sides: the flow's tasks and run_plain call them through FUNCTIONS."""
    from tasks import stage_runner as stages

    for name in list(stages.FUNCTIONS):
        sw.wrap(stages.FUNCTIONS, name, f"stage.{name}")


def _child_plain(root: Path, overrides: list[str]) -> dict:
    sw = Stopwatch()
    with sw("import"):
        import tasks.stage_runner  # noqa: F401 - every stage module
        from distilflow.params import load_params
    _instrument_stages(sw)
    params = load_params(root / "params.yaml", overrides)
    with sw("pipeline"):
        ran = plain_pipeline(params, root)
    return {"stages": dict.fromkeys(ran, "ran"), "timings": sw.totals, "counts": sw.counts}


def _child_prefect(root: Path, overrides: list[str]) -> dict:
    """The flow as `python -m distilflow run` runs it, with timers around where the time goes."""
    from cli import main as cli

    cli._quiet_environment()
    sw = Stopwatch()
    with sw("import.prefect"):
        import prefect  # noqa: F401
        from prefect.server.api import server as prefect_server
    with sw("import.mlflow"):
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient  # noqa: F401
    # before the tasks are defined: their decorators capture the cache-key function
    import distilflow.caching as caching

    sw.wrap(caching, "stage_cache_key", "prefect.cache_key")
    with sw("import.project"):
        import distilflow.tracking as tracking
        import flows.pipeline as fp
        from distilflow.layout import Layout
        from distilflow.params import load_params
        from distilflow.tracking import Run, Tracker
    _instrument_stages(sw)
    sw.wrap(prefect_server.SubprocessASGIServer, "start", "prefect.api_start")
    for attr in ("__init__", "experiment_id", "model_version"):
        sw.wrap(Tracker, attr, f"mlflow.{'store_init' if attr == '__init__' else attr}")
    sw.wrap(Tracker, "record_stage", "mlflow.log_stage")
    sw.wrap(Tracker, "log_dataset", "mlflow.log_dataset")
    for attr in ("log_params", "log_metrics", "log_dict", "log_artifact", "set_tags"):
        sw.wrap(Run, attr, "mlflow.parent_logging")
    sw.wrap(fp, "run_task", "prefect.task_run")  # task call + result, stage compute inside
    sw.wrap(tracking, "git_commit", "lineage.git_commit")
    sw.wrap(fp, "register", "mlflow.register_stage")  # registry work the plain side has no counterpart for
    cli._install_log_filter()
    params = load_params(root / "params.yaml", overrides)
    with sw("pipeline"):
        summary = fp.pipeline(params=params, root=str(root), tracking_uri=Layout(root).tracking_uri())
    return {"stages": summary["stages"], "timings": sw.totals, "counts": sw.counts}


def run_child(kind: str, root: Path, overrides: list[str], env: dict) -> dict:
    """One pipeline run in a fresh process; wall time from spawn to exit, plus its own breakdown."""
    out = root.parent / f"{root.name}-{kind}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "bench.orchestration", "--child", kind, "--root", str(root), "--out", str(out)]
    cmd += [a for o in overrides for a in ("--set", o)]
    load_before = os.getloadavg()[0]
    cpu0 = _children_cpu_s()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    cpu = _children_cpu_s() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} pipeline run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    record = json.loads(out.read_text())
    record["wall_s"] = wall
    # CPU seconds of the child and everything it waited for (the temporary API server included):
    # a cross-check on wall time that other processes on the machine disturb less
    record["cpu_s"] = cpu
    record["load_avg_1min"] = [load_before, os.getloadavg()[0]]
    record["startup_s"] = record.pop("t_main") - t0  # interpreter + site start before our first line
    record["teardown_s"] = t0 + wall - record.pop("t_end")  # atexit: the temporary Prefect server stops here
    return record


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _env(prefect_home: Path, api_url: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV["tracking_uri"], ENV["prefect_api_url"])}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    if api_url:
        env[ENV["prefect_api_url"]] = api_url
    return env


def breakdown(prefect: dict, plain: dict) -> dict:
    """Where the Prefect run's extra seconds go, from the two runs' own timers (seconds)."""
    t = prefect["timings"]
    stage_compute = sum(v for k, v in t.items() if k.startswith("stage."))
    plain_compute = sum(v for k, v in plain["timings"].items() if k.startswith("stage."))
    in_task = t.get("prefect.task_run", 0.0) - stage_compute
    mlflow_s = sum(v for k, v in t.items() if k.startswith("mlflow."))
    parts = {
        "process start (interpreter)": prefect["startup_s"] - plain["startup_s"],
        "imports (prefect, mlflow, project)": (
            t.get("import.prefect", 0) + t.get("import.mlflow", 0) + t.get("import.project", 0)
        )
        - plain["timings"].get("import", 0),
        "Prefect API start (temporary server)": t.get("prefect.api_start", 0.0),
        "Prefect task bookkeeping (task runs, states, result persistence, cache keys)": in_task,
        "  of which cache-key hashing": t.get("prefect.cache_key", 0.0),
        "MLflow store init + experiment": t.get("mlflow.store_init", 0) + t.get("mlflow.experiment_id", 0),
        "MLflow logging (parent + one child run per stage)": t.get("mlflow.log_stage", 0)
        + t.get("mlflow.parent_logging", 0),
        "MLflow registry: pretrained backbone (pyfunc save + register + look-up)": t.get("mlflow.register_model", 0)
        + t.get("mlflow.model_version", 0),
        "MLflow registry: register stage (model card, 3 pyfunc models, lock)": t.get("mlflow.register_stage", 0.0),
        "git lineage (git rev-parse/status)": t.get("lineage.git_commit", 0.0),
        "process exit (temporary server shutdown)": prefect["teardown_s"] - plain["teardown_s"],
        "stage compute difference (noise + in-stage extras)": stage_compute - plain_compute,
    }
    accounted = sum(v for k, v in parts.items() if not k.startswith("  "))
    parts["flow engine, logging, other (remainder)"] = (prefect["wall_s"] - plain["wall_s"]) - accounted
    parts["mlflow total"] = mlflow_s
    return {k: round(v, 3) for k, v in parts.items()}


def _cli_warm(root: Path, overrides: list[str], env: dict) -> dict:
    """`python -m distilflow run` twice on a project whose outputs are current: the first run goes through the
    (all-cached) flow and records the state, the second is the warm re-run a user gets from `make run`."""
    cmd = distilflow_command("run", params=root / "params.yaml", overrides=overrides)
    out = {}
    for key in ("recording", "warm"):
        cpu0, t0 = _children_cpu_s(), time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        out[key] = {"wall_s": time.time() - t0, "cpu_s": _children_cpu_s() - cpu0, "stdout": proc.stdout[-2000:]}
        if proc.returncode != 0:
            raise RuntimeError(f"`distilflow run` failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    if not out["warm"]["stdout"].startswith("up to date"):
        raise RuntimeError(f"the second `distilflow run` was not up to date:\n{out['warm']['stdout']}")
    return {
        "wall_s": out["warm"]["wall_s"],
        "cpu_s": out["warm"]["cpu_s"],
        "recording_wall_s": out["recording"]["wall_s"],
        "stdout": out["warm"]["stdout"],
    }


def _start_server(prefect_home: Path, port: int) -> tuple[subprocess.Popen, float]:
    """A long-running Prefect server (what `prefect server start` gives a team), for the reuse measurement."""
    import urllib.request

    env = _env(prefect_home)
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1)
            return proc, time.time() - t0
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("prefect server exited during start") from None
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("prefect server did not become healthy in 120 s")


def _first_start(env: dict) -> float:
    """The first start of a new Prefect home migrates its database: a one-time cost, measured apart (seconds)."""
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", "from prefect import flow\n@flow\ndef noop(): pass\nnoop()"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    first_start = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"Prefect home warm-up failed:\n{proc.stderr[-2000:]}")
    return first_start


def _cold_pairs(tmp: Path, repeats: int, overrides: list[str], env: dict) -> tuple[list[dict], list[dict]]:
    """`repeats` alternating pairs of cold runs (plain, then Prefect), each on a fresh project."""
    plain_runs, prefect_runs = [], []
    for i in range(repeats):
        plain_runs.append(run_child("plain", make_project(tmp / f"plain{i}"), overrides, env))
        prefect_runs.append(run_child("prefect", make_project(tmp / f"prefect{i}"), overrides, env))
        print(
            f"  orchestration pair {i + 1}/{repeats}: plain {plain_runs[-1]['wall_s']:.1f} s, "
            f"prefect {prefect_runs[-1]['wall_s']:.1f} s",
            flush=True,
        )
    return plain_runs, prefect_runs


def _warm_on_running_server(home: Path, root: Path, overrides: list[str]) -> dict:
    """A warm re-run against a long-running Prefect server, with the server's own start time."""
    server, server_start = _start_server(home, 4299)
    try:
        # same params as the run before it, so every stage's outputs on disk are its cached ones
        reused = run_child("prefect", root, overrides, _env(home, "http://127.0.0.1:4299/api"))
        reused["server_start_s"] = server_start
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"  caching: warm on a running server {reused['wall_s']:.1f} s", flush=True)
    return reused


def _caching_runs(root: Path, home: Path, overrides: list[str], env: dict, reuse_server: bool) -> dict:
    """The re-runs of a cold project: warm, one param changed, on a running server, through `distilflow run`."""
    warm = run_child("prefect", root, overrides, env)
    changed = run_child("prefect", root, overrides + [CHANGE], env)
    print(f"  caching: warm {warm['wall_s']:.1f} s, one param changed {changed['wall_s']:.1f} s", flush=True)
    reused = _warm_on_running_server(home, root, overrides + [CHANGE]) if reuse_server else None
    cli = _cli_warm(root, overrides + [CHANGE], env)
    print(
        f"  caching: `distilflow run` recording {cli['recording_wall_s']:.1f} s, then up to date {cli['wall_s']:.2f} s",
        flush=True,
    )
    return {
        "prefect_warm": warm,
        "prefect_param_change": changed,
        "prefect_warm_running_server": reused,
        "cli_warm": cli,
    }


def _best_pair(plain_runs: list[dict], prefect_runs: list[dict]) -> int:
    """The pair whose stage compute agrees best, i.e. the one a busy machine disturbed least (0-based)."""

    def compute_gap(i: int) -> float:
        stage = lambda r: sum(v for k, v in r["timings"].items() if k.startswith("stage."))  # noqa: E731
        return abs(stage(prefect_runs[i]) - stage(plain_runs[i]))

    return min(range(len(plain_runs)), key=compute_gap)


def _param_change(changed: dict) -> dict:
    """A distill param invalidates distill and every stage after it in the flow, nothing before."""
    order = list(changed["stages"])
    expected_rerun = set(order[order.index("distill") :])
    reran = {k for k, v in changed["stages"].items() if v == "ran"}
    return {"override": CHANGE, "expected": sorted(expected_rerun), "stages": changed["stages"], "reran": sorted(reran)}


def _warm_target(id: str, what: str, run: dict, cold_wall: dict, cold_cpu: dict) -> dict:
    """A warm re-run's wall time over the cold runs' median, at most a tenth; its CPU-time ratio as the note."""
    return check(
        id,
        what,
        run["wall_s"] / cold_wall["median"],
        "<=",
        0.10,
        unit="",
        note=f"CPU-time ratio {run['cpu_s'] / cold_cpu['median']:.3f}",
    )


def _targets(figures: dict, runs: dict, param_change: dict) -> list[dict]:
    """Overhead of the cold run, then the caching targets (warm, downstream only, the CLI, a running server)."""
    cold_wall, cold_cpu = figures["prefect_wall_s"], figures["prefect_cpu_s"]
    expected, reran = set(param_change["expected"]), set(param_change["reran"])
    targets = [
        check(
            "orchestration.overhead",
            "Prefect + MLflow pipeline wall time / plain functions (cold, fresh project)",
            figures["overhead_ratio"]["median"],
            "<=",
            1.15,
            note=f"CPU time ratio {figures['overhead_ratio_cpu']['median']:.2f}×",
        ),
        _warm_target(
            "caching.warm",
            "warm re-run, nothing changed / cold run (wall time, cold = median)",
            runs["prefect_warm"],
            cold_wall,
            cold_cpu,
        ),
        check(
            "caching.downstream_only",
            f"after distill.temperature changes, stages rerun that should not (expected exactly {sorted(expected)})",
            len(reran ^ expected),
            "<=",
            0,
            unit="",
        ),
        _warm_target(
            "caching.warm_cli",
            "warm re-run through `distilflow run`, nothing changed (its up-to-date "
            "check answers before Prefect starts) / cold run (wall time, cold = median)",
            runs["cli_warm"],
            cold_wall,
            cold_cpu,
        ),
    ]
    if runs["prefect_warm_running_server"] is not None:
        targets.append(
            _warm_target(
                "caching.warm_running_server",
                "warm re-run on an already running Prefect server / cold run (wall time, cold = median)",
                runs["prefect_warm_running_server"],
                cold_wall,
                cold_cpu,
            )
        )
    return targets


def _cold_figures(plain_runs: list[dict], prefect_runs: list[dict]) -> dict:
    """Wall and CPU time of the cold runs, and their ratios per pair, then the median over pairs (bench/README.md):
    a slow spell that spans a pair cancels out."""
    best = _best_pair(plain_runs, prefect_runs)
    return {
        "plain_wall_s": summarize([r["wall_s"] for r in plain_runs]),
        "prefect_wall_s": summarize([r["wall_s"] for r in prefect_runs]),
        "overhead_ratio": summarize([p["wall_s"] / q["wall_s"] for p, q in zip(prefect_runs, plain_runs)]),
        "overhead_ratio_cpu": summarize([p["cpu_s"] / q["cpu_s"] for p, q in zip(prefect_runs, plain_runs)]),
        "breakdown_pair": best + 1,
        "breakdown_s": breakdown(prefect_runs[best], plain_runs[best]),
        "prefect_cpu_s": summarize([r["cpu_s"] for r in prefect_runs]),
        "plain_cpu_s": summarize([r["cpu_s"] for r in plain_runs]),
    }


def run(
    repeats: int = 2,
    quick: bool = False,
    overrides: list[str] | None = None,
    workdir: Path | None = None,
    reuse_server: bool = True,
    keep: Path | None = None,
) -> dict:
    """Cold Prefect vs plain (alternating), then a warm re-run, a one-param change, and a reused server.

    `keep`: copy the last plain project there (its artifacts feed the compression benchmark).
    """
    overrides = list(overrides or []) + (QUICK_OVERRIDES if quick else [])
    tmp = Path(workdir or tempfile.mkdtemp(prefix="bench-orch-"))
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = _env(home)
    first_start = _first_start(env)
    plain_runs, prefect_runs = _cold_pairs(tmp, repeats, overrides, env)
    cold_root = tmp / f"prefect{repeats - 1}"
    if keep is not None:  # the real pipeline's artifacts, before the param change below overwrites the student
        shutil.copytree(cold_root, keep, dirs_exist_ok=True)
    reruns = _caching_runs(cold_root, home, overrides, env, reuse_server)
    figures = _cold_figures(plain_runs, prefect_runs)
    param_change = _param_change(reruns["prefect_param_change"])
    return {
        "setting": "demo pipeline (digits, MNIST-pretrained CNN teacher, KD student, int8), params.yaml"
        + (f" with {' '.join(overrides)}" if overrides else " as committed")
        + "; each run a fresh child process; cold = fresh project folder and MLflow store; Prefect's "
        "temporary API server (no PREFECT_API_URL) unless noted",
        "overrides": overrides,
        "prefect_home_first_start_s": first_start,
        **figures,
        "runs": {"plain": plain_runs, "prefect_cold": prefect_runs, **reruns},
        "param_change": param_change,
        "targets": _targets(figures, reruns, param_change),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="(internal) one pipeline run in a child process")
    parser.add_argument("--child", choices=["plain", "prefect"], required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    t_main = time.time()
    record = (_child_plain if args.child == "plain" else _child_prefect)(args.root, args.overrides)
    record["t_main"], record["t_end"] = t_main, time.time()
    args.out.write_text(json.dumps(record, default=str))


if __name__ == "__main__":
    main()
