"""`distilflow search`: the space checked first, real Optuna on SQLite, real Prefect task runners, nested MLflow runs.

The long ones (kill -9 and resume, a Dask LocalCluster, four trials in flight)
are marked slow; one short end-to-end search runs in the default suite.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distilflow.errors import DistilflowError
from distilflow.params import load_params
from tasks.search.front import constraint, hypervolume, pareto_mask, shortlist
from tasks.search.pruning import median_rule
from tasks.search.space import validate_space
from tasks.search.study import is_pruned
from tests.conftest import QUICK, REPO, edit_params

# ---------------------------------------------------------------------------- the space, before any trial


def _params(tmp_path, search: dict):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["search"] = {**raw["search"], **search}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


@pytest.mark.parametrize(
    "search, message",
    [
        ({"space": {}}, "search.space is empty"),
        ({"space": {"distill.temprature": {"float": [1, 8]}}}, "search.space.distill.temprature: unknown params key"),
        ({"space": {"distill.temperature": {"float": [8, 1]}}}, "bounds are inverted: low 8.0 > high 1.0"),
        ({"space": {"distill.temperature": {"float": [0, 4]}}}, "0.0 is not a valid distill.temperature"),
        ({"space": {"distill.student_width": {"float": [4, 32]}}}, "is not a valid distill.student_width"),
        ({"space": {"distill.alpha": {"float": [0.5, 2]}}}, "2.0 is not a valid distill.alpha"),
        ({"space": {"quantize.calibration_method": {"choice": ["minmax", "kl"]}}}, "'kl' is not a valid"),
        ({"space": {"distill.temperature": {"float": [0, 4], "log": True}}}, "log: true needs low > 0"),
        ({"space": {"distill.temperature": {"int": [1, 4], "float": [1, 4]}}}, "give exactly one of"),
        (
            {"space": {"train.lr": {"float": [0.001, 0.01]}}},
            "'train.lr' is read by finetune, which runs once before a student search's trials",
        ),
        ({"space": {"distill": {"float": [1, 2]}}}, "'distill' is a section"),
        ({"space": {"registry.enabled": {"choice": [True, False]}}}, "no stage reads 'registry.enabled'"),
        ({"fixed": {"distill.temperature": 2.0}}, "'distill.temperature' is both searched and fixed"),
        ({"target": "teacher"}, "no stage a teacher trial runs reads 'distill.alpha'"),
    ],
)
def test_a_bad_space_is_refused_before_any_trial_with_the_key_named(tmp_path, search, message):
    with pytest.raises(DistilflowError) as err:
        validate_space(_params(tmp_path, search))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "search, message",
    [
        ({"n_trials": 0}, "search.n_trials: Input should be greater than or equal to 1"),
        ({"n_trials": -3}, "search.n_trials: Input should be greater than or equal to 1"),
        ({"timeout_s": 0}, "search.timeout_s: Input should be greater than 0"),
        ({"timeout_s": -5}, "search.timeout_s: Input should be greater than 0"),
        ({"runner": "dask"}, "search.runner=dask needs search.dask_address"),
        ({"workers": 0}, "search.workers: Input should be greater than or equal to 1"),
    ],
)
def test_bad_search_settings_are_refused_by_the_params_schema(tmp_path, search, message):
    with pytest.raises(DistilflowError) as err:
        _params(tmp_path, search)
    assert message in str(err.value)


def test_a_teacher_space_is_checked_against_the_teacher_stage(tmp_path):
    space = {"train.lr": {"float": [0.0005, 0.01], "log": True}, "train.strategy": {"choice": ["full", "progressive"]}}
    assert set(validate_space(_params(tmp_path, {"target": "teacher", "space": space}))) == set(space)


# ---------------------------------------------------------------------------- the rules, on numbers worked by hand


def test_median_rule_stops_a_trial_below_the_median_of_completed_trials_at_the_same_epoch():
    others = [{0: 0.5, 1: 0.7, 2: 0.80}, {0: 0.6, 1: 0.8, 2: 0.90}, {0: 0.4, 1: 0.9, 2: 0.95}]
    # best so far at epoch 2: 0.80, 0.90, 0.95 -> median 0.90
    assert median_rule({0: 0.3, 1: 0.6, 2: 0.85}, 2, others, warmup=1, startup=3)
    assert not median_rule({0: 0.3, 1: 0.6, 2: 0.91}, 2, others, warmup=1, startup=3)
    # best so far, not the last epoch: 0.92 at epoch 1 is kept at epoch 2
    assert not median_rule({0: 0.3, 1: 0.92, 2: 0.5}, 2, others, warmup=1, startup=3)
    assert not median_rule({0: 0.1}, 0, others, warmup=1, startup=3)  # within the warm-up
    assert not median_rule({0: 0.3, 1: 0.3}, 1, others[:2], warmup=1, startup=3)  # too few completed trials


def test_hypervolume_and_front_on_points_worked_by_hand():
    # (accuracy, cost); reference (0.5, 2.0): segments 0.5..1.0 x (0.8-0.5) + 1.0..2.0 x (0.9-0.5) = 0.15 + 0.4
    points = [(0.9, 1.0), (0.8, 0.5), (0.7, 1.5)]
    assert hypervolume(points, (0.5, 2.0)) == pytest.approx(0.55)
    assert hypervolume([(0.4, 1.0)], (0.5, 2.0)) == 0.0  # worse than the reference: no area
    assert pareto_mask([p[0] for p in points], [p[1] for p in points]) == [True, True, False]


def test_shortlist_takes_the_feasible_front_first_then_feasible_by_cost():
    trials = [
        {"number": 0, "val_accuracy": 0.99, "cost": 3.0, "feasible": True},
        {"number": 1, "val_accuracy": 0.97, "cost": 1.0, "feasible": True},
        {"number": 2, "val_accuracy": 0.98, "cost": 4.0, "feasible": True},  # dominated by 0
        {"number": 3, "val_accuracy": 0.50, "cost": 0.1, "feasible": False},
    ]
    assert shortlist(trials, 5) == [1, 0, 2]
    assert shortlist(trials, 2) == [1, 0]
    assert shortlist([trials[3]], 2) == [3]  # none feasible: the most accurate, so the refusal can say why


def test_constraint_is_positive_exactly_when_the_trial_misses_select(tmp_path):
    params = _params(tmp_path, {})  # select.max_drop 0.01
    assert constraint(params, {"val_accuracy": 0.985, "feasible": True}, 0.99) <= 0
    assert constraint(params, {"val_accuracy": 0.97, "feasible": False}, 0.99) == pytest.approx(0.01)
    assert constraint(params, {"val_accuracy": 0.99, "feasible": False}, 0.99) > 0  # failed on macro-F1 only


# ---------------------------------------------------------------------------- the command


def _env(project: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["PREFECT_HOME"] = str(project / ".prefect")
    env.pop("DISTILFLOW_SEARCH_STORAGE", None)
    return env


def _search(project: Path, *sets: str, timeout: int = 600) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "distilflow", "search", "--params", str(project / "params.yaml"), *args],
        cwd=REPO,
        env=_env(project),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SPACE = {
    "distill.student_width": {"int": [4, 16], "log": True},
    "distill.temperature": {"float": [1, 8]},
}


def _quick(project: Path, **search) -> None:
    for section, values in QUICK.items():
        edit_params(project, **{section: values})
    raw = yaml.safe_load((project / "params.yaml").read_text())
    edit_params(project, search={**raw["search"], "space": SPACE, "n_trials": 3, "workers": 2, **search})


def _study(project: Path, name: str = "distilflow-digits-student"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / '.distilflow/search.db'}")


def _runs(project: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def _overlapping(runs) -> int:
    """The most trial runs open at one moment (each is open from its submission to its result)."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_search_runs_trials_in_parallel_registers_the_pick_and_leaves_a_report(project):
    from optuna.trial import TrialState

    _quick(project)
    proc = _search(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr

    study = _study(project)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE or is_pruned(t) for t in trials)
    for t in trials:  # inside the declared space
        assert 4 <= t.params["distill.student_width"] <= 16 and 1 <= t.params["distill.temperature"] <= 8

    client, runs = _runs(project)
    assert all(r.info.status != "RUNNING" for r in runs)
    parent = next(r for r in runs if r.info.run_name == "search-distilflow-digits-student")
    assert parent.info.status == "FINISHED"
    nested = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and "optuna.trial" in r.data.tags
    ]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in nested) == [0, 1, 2]
    for r in nested:
        assert r.data.tags["distilflow.trial.state"] in ("complete", "pruned")
        assert r.data.params["distill.temperature"]
        curve = client.get_metric_history(r.info.run_id, "distill.val_accuracy")
        assert len(curve) >= 2  # one point per epoch, not just the final value
        assert {m.step for m in curve} == set(range(len(curve)))
    assert _overlapping(nested) >= 2  # two trials in flight at once

    # the pick: registered as @challenger, tagged with its study and trial, within select's constraint on val
    summary = yaml.safe_load((project / "reports/search.json").read_text())
    pick_trial = summary["pick_trial"]
    mv = client.get_model_version_by_alias("distilflow-digits", "challenger")
    assert mv.tags["search.study"] == "distilflow-digits-student" and mv.tags["search.trial"] == str(pick_trial)
    choice = summary["choice"]
    teacher_val = summary["info"]["teacher_val_accuracy"]
    assert choice["pick"]["val_accuracy"] >= teacher_val - 0.1 - 1e-9  # QUICK: select.max_drop 0.1
    assert choice["pick"]["variant"].startswith(f"trial {pick_trial}: ")
    card = client.download_artifacts(mv.run_id, "model_card.md")
    assert "Found by `distilflow search`" in Path(card).read_text()
    assert {a.path for a in client.list_artifacts(mv.run_id)} >= {"search.md", "search_pareto.png", "model_card.md"}

    report = (project / "reports/search.md").read_text()
    for t in trials:
        assert f"\n| {t.number} | " in report
    assert (project / "reports/search_pareto.png").read_bytes()[:4] == b"\x89PNG"
    searched = load_params(project / "params.searched.yaml")  # a params file a normal run takes
    assert searched.distill.student_width == study.trials[pick_trial].params["distill.student_width"]
    assert "up to date" not in proc.stdout and "registered: distilflow-digits version 1 (@challenger)" in proc.stdout


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_study_goes_on(project):
    """teacher_blocks at the teacher's own depth (3) raises; depth 2 trains."""
    _quick(
        project,
        space={"distill.student_depth": {"choice": [2, 3]}},
        fixed={"distill.gain_label_budgets": [], "distill.student": "teacher_blocks"},
        sampler="random",
        n_trials=4,
    )
    proc = _search(project)
    study = _study(project)
    failed = [t for t in study.trials if t.params["distill.student_depth"] == 3]
    fine = [t for t in study.trials if t.params["distill.student_depth"] == 2]
    assert failed and fine, "seed 42 draws both values in 4 trials"
    assert all(t.state.name == "FAIL" for t in failed) and all(t.state.name == "COMPLETE" for t in fine)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = _runs(project)
    for t in failed:
        run = next(r for r in runs if r.data.tags.get("optuna.trial") == str(t.number))
        assert run.info.status == "FAILED"
        assert "keeps fewer blocks than the teacher's 3" in run.data.tags["distilflow.trial.error"]
    assert f"trial {failed[0].number} failed: distill.student_depth=3" in proc.stdout + proc.stderr


def test_every_trial_failing_is_one_clear_error_and_nothing_is_registered(project):
    _quick(
        project,
        space={"distill.student_depth": {"choice": [3, 4]}},
        fixed={"distill.gain_label_budgets": [], "distill.student": "teacher_blocks"},
        n_trials=2,
    )
    proc = _search(project)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "distilflow: error: search distilflow-digits-student: every trial failed, nothing registered"
    )
    assert "Traceback" not in proc.stderr
    client, runs = _runs(project)
    assert all(r.info.status != "RUNNING" for r in runs)
    assert client.search_registered_models(filter_string="name = 'distilflow-digits'") == []


@pytest.mark.parametrize(
    "search, sets, message",
    [
        ({"space": {}}, [], "search.space is empty"),
        ({}, ["search.space={distill.temprature: {float: [1, 8]}}"], "unknown params key 'distill.temprature'"),
        ({}, ["search.n_trials=0"], "search.n_trials: Input should be greater than or equal to 1"),
        ({}, ["search.timeout_s=0"], "search.timeout_s: Input should be greater than 0"),
        ({}, ["search.storage=postgresql://bob:hunter2@127.0.0.1:1/optuna"], "search storage postgresql://bob:***@"),
        ({"runner": "dask", "dask_address": "tcp://127.0.0.1:1"}, [], "no Dask scheduler answered within 10 s"),
    ],
)
def test_bad_input_gets_one_line_and_leaves_nothing_running(project, search, sets, message):
    _quick(project, **search)
    started = time.monotonic()
    proc = _search(project, *sets, timeout=120)
    assert time.monotonic() - started < 60  # an unreachable scheduler or database: seconds, not a hang
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("distilflow: error: ") and message in err[-1], proc.stderr[-2000:]
    assert "hunter2" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    if (project / "mlflow.db").exists():
        _, runs = _runs(project)
        assert all(r.info.status != "RUNNING" for r in runs)
    assert not (project / "reports/search.md").exists()


# ---------------------------------------------------------------------------- long: resume, Dask, 4 in flight


@pytest.mark.slow
def test_the_same_seed_on_the_serial_runner_gives_the_same_trials(project, tmp_path):
    import shutil

    _quick(project, workers=1, n_trials=2)
    twin = tmp_path / "twin"
    shutil.copytree(project, twin)
    for root in (project, twin):
        proc = _search(root)
        assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _study(project).trials, _study(twin).trials
    assert [t.params for t in a] == [t.params for t in b]
    # the same models trained: the per-epoch validation curves the pruner saw are equal. The objective is the
    # trial's pick, which `select:` makes by measured latency, so a near-tie may fall either way between runs.
    assert all(t.intermediate_values for t in a)
    assert [t.intermediate_values for t in a] == [t.intermediate_values for t in b]
    assert len({t.params["distill.temperature"] for t in a}) == 2  # two different trials, not one repeated


@pytest.mark.slow
def test_a_search_killed_with_sigkill_resumes_keeping_its_completed_trials(project):
    from optuna.trial import TrialState

    _quick(project, workers=1, n_trials=4)
    edit_params(project, distill={"epochs": 12})  # trials long enough to be killed inside one
    log = open(project / "search.log", "w")  # noqa: SIM115 - closed below, after the kill
    proc = subprocess.Popen(
        [sys.executable, "-m", "distilflow", "search", "--params", str(project / "params.yaml")],
        cwd=REPO,
        env=_env(project),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400
    before = []
    while time.monotonic() < deadline:  # one trial done, the next one running: kill the whole process group
        time.sleep(0.5)
        assert proc.poll() is None, (project / "search.log").read_text()[-3000:]
        if not (project / ".distilflow/search.db").exists():
            continue
        try:
            trials = _study(project).trials
        except Exception:  # noqa: BLE001 - the study is being created
            continue
        done = [t.number for t in trials if t.state == TrialState.COMPLETE or is_pruned(t)]
        if done and any(t.state == TrialState.RUNNING for t in trials):
            before = done
            break
    assert before, "the search never reached its second trial\n" + (project / "search.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    log.close()
    time.sleep(1)

    again = _search(project)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "marked failed (not counted)" in again.stdout + again.stderr
    trials = _study(project).trials
    for number in before:
        assert trials[number].state == TrialState.COMPLETE or is_pruned(trials[number])  # kept, not rerun
    interrupted = [t for t in trials if t.state == TrialState.FAIL and not is_pruned(t)]
    assert len(interrupted) == 1 and "interrupted" in interrupted[0].user_attrs["fail_reason"]
    assert sum(t.state == TrialState.COMPLETE or is_pruned(t) for t in trials) == 4  # the budget, not counting it
    client, runs = _runs(project)
    assert all(r.info.status != "RUNNING" for r in runs)
    parents = [r for r in runs if r.info.run_name == "search-distilflow-digits-student"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent run, reopened
    killed = next(r for r in runs if r.data.tags.get("optuna.trial") == str(interrupted[0].number))
    assert killed.info.status == "KILLED"


@pytest.mark.slow
def test_trials_run_on_a_dask_localcluster_with_two_worker_processes(project):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        _quick(project, runner="dask", dask_address=cluster.scheduler_address, n_trials=4, workers=2)
        proc = _search(project)
        with Client(cluster) as client:
            worker_pids = set(client.run(os.getpid).values())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting temporary server" not in proc.stderr  # the workers report to the search's API
    study = _study(project)
    assert sum(t.state.name == "COMPLETE" or is_pruned(t) for t in study.trials) == 4
    pids = {t.user_attrs.get("pid") for t in study.trials}
    assert pids <= worker_pids and len(pids) == 2  # both worker processes ran trials
    _, runs = _runs(project)
    nested = [r for r in runs if "optuna.trial" in r.data.tags]
    assert _overlapping(nested) >= 2


@pytest.mark.slow
def test_four_trials_in_flight_log_to_sqlite_without_database_is_locked(project):
    _quick(project, workers=4, n_trials=4)
    proc = _search(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "database is locked" not in proc.stdout + proc.stderr
    _, runs = _runs(project)
    nested = [r for r in runs if "optuna.trial" in r.data.tags]
    assert len(nested) == 4 and _overlapping(nested) == 4
    assert all(r.info.status == "FINISHED" for r in nested)


@pytest.mark.slow
def test_a_teacher_search_writes_its_best_fine_tune_as_a_params_file_a_run_takes(project):
    _quick(
        project,
        target="teacher",
        space={"train.lr": {"float": [0.0005, 0.01], "log": True}, "train.label_smoothing": {"float": [0.0, 0.2]}},
        n_trials=3,
    )
    proc = _search(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _study(project, "distilflow-digits-teacher")
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.values[0])
    searched = load_params(project / "params.searched.yaml")
    assert searched.train.lr == pytest.approx(best.params["train.lr"])
    assert searched.train.label_smoothing == pytest.approx(best.params["train.label_smoothing"])
    assert searched.distill == load_params(project / "params.yaml").distill  # everything else as it was
    _, runs = _runs(project)
    assert not [r for r in runs if r.data.tags.get("distilflow.stage") == "register"]  # a teacher search ships nothing
    run = subprocess.run(
        [sys.executable, "-m", "distilflow", "run", "--params", str(project / "params.searched.yaml")],
        cwd=REPO,
        env=_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    client, runs = _runs(project)
    finetune = [r for r in runs if r.info.run_name == "finetune" and r.data.params.get("train.lr")]
    assert any(float(r.data.params["train.lr"]) == pytest.approx(best.params["train.lr"]) for r in finetune)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_a_pruned_trial_does_not_break_the_next_ask_of_a_pareto_study(tmp_path, sampler):
    """TPE reads a PRUNED trial's score through the study's single direction, which a two-objective study
    has not: the next ask raised (found by the bench at the project's 15 epochs). A pruned trial is told so
    that every sampler asks on, and it is still reported (and budgeted) as pruned."""
    import optuna

    from tasks.search.finish import trial_rows
    from tasks.search.study import is_pruned, tell_pruned
    from tasks.search.study import sampler as make_sampler

    params = _params(tmp_path, {"sampler": sampler, "n_trials": 6, "workers": 2})
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(params))
    for i in range(4):  # past TPE's startup trials
        trial = study.ask({"distill.temperature": optuna.distributions.FloatDistribution(1, 8)})
        study._storage.set_trial_user_attr(trial._trial_id, "objective", None)
        study.tell(trial, [0.9 + i / 100, 0.01 + i / 1000])
    for step, value in enumerate([0.2, 0.3]):
        pruned = study.ask({"distill.temperature": optuna.distributions.FloatDistribution(1, 8)})
        study._storage.set_trial_intermediate_value(pruned._trial_id, step, value)
    tell_pruned(study, pruned, "val accuracy 0.3 < median 0.9 at epoch 1")
    nxt = study.ask({"distill.temperature": optuna.distributions.FloatDistribution(1, 8)})  # raised before
    assert 1 <= nxt.params["distill.temperature"] <= 8
    frozen = study.trials[pruned.number]
    assert is_pruned(frozen) and not is_pruned(study.trials[0])
    rows = {r["number"]: r for r in trial_rows(study, params)}
    assert rows[pruned.number]["state"] == "pruned" and "median" in rows[pruned.number]["note"]
