"""The flow on a real Prefect API with a real MLflow SQLite store."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cli import main
from distilflow.hashing import file_md5
from distilflow.layout import Layout
from distilflow.params import load_params
from flows.pipeline import pipeline
from tests.conftest import QUICK, REPO, edit_params

pytestmark = pytest.mark.slow
STAGES = ["ingest", "clean", "split", "normalize"]


def run(project, **overrides):
    for section, values in overrides.items():
        edit_params(project, **{section: values})
    return pipeline(
        params=load_params(project / "params.yaml"),
        root=str(project),
        tracking_uri=Layout(project).tracking_uri(),
        stop_after="normalize",
    )


def test_flow_logs_parent_and_child_runs_with_lineage(prefect_api, project):
    summary = run(project)
    assert summary["stages"] == dict.fromkeys(STAGES, "ran")
    client = MlflowClient(Layout(project).tracking_uri())
    exp = client.get_experiment_by_name("distilflow-digits")
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.experiment_id == exp.experiment_id
    assert parent.info.run_name.startswith("digits-")
    tags = parent.data.tags
    assert tags["data_md5"] == file_md5(project / "data/raw/digits.csv")
    assert tags["params_hash"] == load_params(project / "params.yaml").hash()
    assert len(tags["mlflow.source.git.commit"]) in (40, 7) or tags["mlflow.source.git.commit"] == "unknown"
    assert tags["mlflow.source.name"] == "distilflow" and tags["mlflow.note.content"].startswith("distilflow pipeline")
    assert tags["prefect.flow_run_id"]
    inputs = client.get_run(summary["run_id"]).inputs.dataset_inputs
    assert sorted(d.dataset.name for d in inputs) == ["digits-test", "digits-train", "digits-val"]
    assert {f"split_hash.{s}" for s in ("train", "val", "test")} <= set(tags)
    assert parent.data.params["split.test"] == "0.15" and parent.data.params["clean.nonfinite"] == "drop"
    assert parent.data.metrics["rows.test"] == 269

    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["distilflow.stage"]: r for r in children}
    assert sorted(by_stage) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" and r.data.tags["data_md5"] == tags["data_md5"] for r in children)
    clean_run = by_stage["clean"]
    assert clean_run.data.metrics["rows_in"] == 1797
    files = {a.path for a in client.list_artifacts(clean_run.info.run_id)}
    assert {"cleaning.json", "cleaning_report.md"} <= files
    table = client.download_artifacts(clean_run.info.run_id, "cleaning_report.md", str(project))
    assert "| **rows out** | **1797** |" in open(table).read()
    assert "preprocessor.json" in {a.path for a in client.list_artifacts(by_stage["normalize"].info.run_id)}
    assert "params.effective.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_cache_skips_unchanged_and_reruns_only_downstream(prefect_api, project):
    assert run(project)["stages"] == dict.fromkeys(STAGES, "ran")
    assert run(project)["stages"] == dict.fromkeys(STAGES, "cached")
    assert run(project, normalize={"method": "minmax"})["stages"] == {
        "ingest": "cached",
        "clean": "cached",
        "split": "cached",
        "normalize": "ran",
    }
    assert run(project, split={"test_seed": 3})["stages"] == {
        "ingest": "cached",
        "clean": "cached",
        "split": "ran",
        "normalize": "ran",
    }
    # an output deleted behind the cache's back is rebuilt, not trusted
    Layout(project).preprocessor.unlink()
    assert run(project)["stages"]["normalize"] == "ran"
    # new raw data reruns everything
    raw = pd.read_csv(project / "data/raw/digits.csv")
    raw.iloc[:-5].to_csv(project / "data/raw/digits.csv", index=False)
    assert run(project)["stages"] == dict.fromkeys(STAGES, "ran")


def _runs_by_status(project):
    client = MlflowClient(Layout(project).tracking_uri())
    exp = client.get_experiment_by_name("distilflow-digits")
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id])
    return {s: sum(r.info.status == s for r in runs) for s in {r.info.status for r in runs}}


@pytest.mark.parametrize(
    "setup,message,failed_outputs",
    [
        (lambda p: (p / "data/raw/digits.csv").unlink(), "data.source not found", ["ingested"]),
        (
            lambda p: (p / "data/raw/digits.csv").write_text("a,b\n1,2\n"),
            "label column 'label' not found",
            ["ingested"],
        ),
        (
            lambda p: edit_params(p, data={"classes": ["x", "y"]}),
            "no rows left after cleaning",
            ["ingested", "cleaned", "cleaning_report"],  # ingest succeeded, but a failed run changes nothing
        ),
        (
            lambda p: edit_params(p, clean={"rare_classes": "fail", "min_samples_per_class": 500}),
            "too few samples to stratify",
            ["ingested", "cleaned", "cleaning_report"],
        ),
    ],
)
def test_bad_input_through_the_cli(prefect_api, project, capfd, setup, message, failed_outputs):
    setup(project)
    code = main(["run", "--params", str(project / "params.yaml"), "--stop-after", "normalize"])
    out, err = capfd.readouterr()
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("distilflow: error: ") and message in err.strip().splitlines()[-1]
    assert "Traceback" not in out + err
    layout = Layout(project)
    assert not any(getattr(layout, name).exists() for name in failed_outputs)
    assert not layout.preprocessor.exists()
    statuses = _runs_by_status(project)
    assert statuses.get("FAILED", 0) >= 1 and "RUNNING" not in statuses


def test_an_unchanged_rerun_through_the_cli_is_answered_before_the_flow_starts(prefect_api, project, capfd):
    import os

    args = ["run", "--params", str(project / "params.yaml"), "--stop-after", "normalize"]
    assert main(args) == 0
    first = capfd.readouterr().out
    assert "done: MLflow run" in first and sum(_runs_by_status(project).values()) == 5  # parent + 4 stages

    assert main(args) == 0
    out = capfd.readouterr().out
    assert out.startswith("up to date: nothing changed since MLflow run ") and "done:" not in out
    assert sum(_runs_by_status(project).values()) == 5  # no flow, no new MLflow run

    # each of these is a change: a full run follows (answered from Prefect's cache), then it is up to date again
    raw = project / "data/raw/digits.csv"
    changes = [  # the first three each differ from the run before in that one thing only; --force always runs
        (lambda: os.utime(Layout(project).preprocessor, ns=(1, 1)), [], []),  # an output touched by hand
        (lambda: raw.write_text(raw.read_text() + "\n"), [], ["ingest"]),  # the data source (same rows)
        (lambda: None, ["--set", "split.test_seed=7"], ["split", "normalize"]),
        (lambda: None, ["--set", "split.test_seed=7", "--force"], []),
    ]
    for i, (change, extra, ran) in enumerate(changes):
        before = sum(_runs_by_status(project).values())
        change()
        assert main(args + extra) == 0
        out = capfd.readouterr().out
        assert "done: MLflow run" in out, i
        assert out.split("stages: ")[1].splitlines()[0] == ", ".join(
            f"{s}={'ran' if s in ran else 'cached'}" for s in STAGES
        ), i
        # a parent run, and a child run only for each stage that did work: cached ones are listed on the parent
        assert sum(_runs_by_status(project).values()) - before == 1 + len(ran), i
    assert main(args + ["--set", "split.test_seed=7"]) == 0 and capfd.readouterr().out.startswith("up to date")

    # an output overwritten in place with the same size and modification time: only --check sees it
    pre = Layout(project).preprocessor
    st, text = pre.stat(), pre.read_text()
    pre.write_text(text.replace("0", "1", 1))
    os.utime(pre, ns=(st.st_atime_ns, st.st_mtime_ns))
    seven = ["--set", "split.test_seed=7"]
    assert main(args + seven) == 0 and capfd.readouterr().out.startswith("up to date")
    assert main(args + seven + ["--check"]) == 0
    out = capfd.readouterr().out
    assert "done: MLflow run" in out and "normalize=ran" in out  # the changed file was not trusted


def test_malformed_params_in_a_fresh_process(project):
    (project / "params.yaml").write_text("split:\n  train: [0.7\n")
    proc = subprocess.run(
        [sys.executable, "-m", "distilflow", "run", "--params", str(project / "params.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("distilflow: error:") and "not valid YAML" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (project / "mlflow.db").exists()


TINY = dict(  # the MNIST-pretrained CNN as the backbone: the pretrain flow runs first, then the fine-tune
    backbone={"spec": "mlflow:models:/distilflow-pretrained-mnist@pretrained", "input_size": None},
    pretrain={"backbone": {"spec": "builtin:cnn", "width": 16, "depth": 3}, "train": {"epochs": 2, "warmup_epochs": 0}},
    train={"epochs": 4, "warmup_epochs": 0, "lr_decay": 0.5, "freeze_batchnorm": False, "augment": {"enabled": False}},
    transfer={"label_budgets": [5], "epochs": 2},
    distill={"epochs": 3, "gain_label_budgets": [5]},
    select={"max_drop": 0.15},
    quantize={"calibration_size": 64},
    evaluate={"repeats": 5},
)


def test_full_flow_pretrains_registers_then_finetunes_from_the_registry(prefect_api, project):
    for section, values in TINY.items():
        edit_params(project, **{section: values})
    params = load_params(project / "params.yaml")
    uri = Layout(project).tracking_uri()
    summary = pipeline(params=params, root=str(project), tracking_uri=uri)
    assert summary["stages"]["finetune"] == "ran" and summary["stages"]["transfer_gain"] == "ran"
    client = MlflowClient(uri)
    pretrained = client.get_model_version_by_alias("distilflow-pretrained-mnist", "pretrained")
    assert pretrained.tags["git_commit"] and pretrained.tags["dataset"] == "mnist"

    parent = client.get_run(summary["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    ft = next(r for r in children if r.data.tags["distilflow.stage"] == "finetune")
    bb = next(r for r in children if r.data.tags["distilflow.stage"] == "backbone")
    assert bb.data.tags["backbone.version"] == f"models:/distilflow-pretrained-mnist/{pretrained.version}"
    assert len(client.get_metric_history(ft.info.run_id, "epoch.val_accuracy")) == 4
    assert len(client.get_metric_history(ft.info.run_id, "epoch.samples_per_s")) == 4
    assert ft.info.end_time - ft.info.start_time >= 1000 * sum(  # the child run spans the training it records
        m.value for m in client.get_metric_history(ft.info.run_id, "epoch.epoch_time_s")
    )
    files = {a.path for a in client.list_artifacts(ft.info.run_id)}
    assert {"teacher_learning_curve.png", "teacher_confusion_test.png", "teacher"} <= files
    assert {"model.safetensors", "arch.json"} <= {
        a.path.split("/")[-1] for a in client.list_artifacts(ft.info.run_id, "teacher")
    }
    # TINY: 4 epochs from a 2-epoch MNIST backbone reach ~0.96 on the 269 test rows (deterministic on CPU)
    assert ft.data.metrics["test.accuracy"] >= 0.93 and "recall.9" in {k.removeprefix("test.") for k in ft.data.metrics}
    # the transfer check ran and was logged where a reviewer looks (its size is the bench's business: 2 epochs
    # here leave both starts near chance; the demo's +0.59 at 5 labels/class is in bench/results)
    gain = parent.data.metrics
    report = json.loads((project / "reports/transfer_gain.json").read_text())["5"]
    for key in ("pretrained", "scratch", "gain"):
        assert gain[f"transfer.{key}.5_per_class"] == pytest.approx(report[key])

    # compression: distill → quantize → evaluate, every variant in one table
    assert [summary["stages"][s] for s in ("distill", "quantize", "evaluate", "select")] == ["ran"] * 4
    layout = Layout(project)
    assert (layout.candidates / "student.int8/model.onnx").is_file() and (
        layout.student / "model.safetensors"
    ).is_file()
    assert sorted(p.name for p in layout.candidates.iterdir()) == [
        "student.fp32",
        "student.int8",
        "student_nokd.fp32",
        "student_nokd.int8",
    ]
    report = layout.compression_report.read_text()
    for variant in ("teacher fp32", "student fp32 (KD)", "student fp32 (no KD)", "student int8"):
        assert f"| {variant} |" in report
    rows = {r["variant"]: r for r in summary["compression"]}
    assert rows["student int8"]["file_bytes"] < rows["teacher fp32"]["file_bytes"] / 2
    kd = summary["kd_gain"]
    # the distill stage's own test accuracies agree with the evaluation harness's, measured separately
    assert set(kd) == {"all", 5}
    assert kd["all"]["kd"] == pytest.approx(rows["student fp32 (KD)"]["accuracy"], abs=1e-9)
    assert kd["all"]["no_kd"] == pytest.approx(rows["student fp32 (no KD)"]["accuracy"], abs=1e-9)
    assert gain["student.kd.gain.all"] == pytest.approx(kd["all"]["gain"])
    q = next(r for r in children if r.data.tags["distilflow.stage"] == "quantize")
    assert q.data.tags["quantize.remedy"] in {"none", "calibration", "exclude_sensitive", "qat"}
    assert (
        q.data.metrics["student.int8.int8_accuracy"]
        >= q.data.metrics["student.int8.fp32_accuracy"] - params.quantize.max_accuracy_drop
    )
    assert {"compression.md", "pareto.png", "compression.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }

    again = pipeline(params=params, root=str(project), tracking_uri=uri)
    assert all(
        again["stages"][s] == "cached"
        for s in ("finetune", "transfer_gain", "distill", "quantize", "evaluate", "select")
    )

    # the second int8 backend through the same stage: TorchScript .pt, evaluated by the same harness
    from distilflow.stages import BY_NAME
    from tasks.dataset import load_splits
    from tasks.evaluate import evaluate_variant
    from tasks.stage_runner import run_plain

    fx = params.model_copy(update={"quantize": params.quantize.model_copy(update={"backend": "torch_fx"})})
    run_plain(BY_NAME["quantize"], fx, layout)
    int8 = layout.candidates / "student.int8"
    assert (int8 / "model.pt").is_file() and not (int8 / "model.onnx").exists()
    _, data = load_splits(layout.train, layout.val, layout.test, layout.preprocessor)
    row = evaluate_variant("student int8 (fx)", int8, *data["test"], threads=1, repeats=3)
    assert row["accuracy"] >= 0.92  # the KD student's own ~0.95, less what int8 may cost


def _task_runs(flow_run_id: str) -> dict:
    """The flow run's task runs as the Prefect UI draws them: name -> names of the tasks it waited for."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_id = {str(r.id): r.name for r in runs}
    assert len(by_id) == len(runs)
    edges = {}
    for r in runs:
        assert r.name not in edges, f"{r.name} ran twice"
        upstream = [
            i for inputs in r.task_inputs.values() for i in inputs if getattr(i, "input_type", "") == "task_run"
        ]
        edges[r.name] = sorted(by_id[str(i.id)] for i in upstream)
    return edges


def test_the_prefect_graph_has_one_task_run_per_stage_named_after_it_with_the_dags_edges(prefect_api, project):
    for section, values in QUICK.items():
        edit_params(project, **{section: values})
    params = load_params(project / "params.yaml")
    from prefect.client.orchestration import get_client
    from pydantic import SecretStr

    summary = pipeline(params=params, root=str(project), tracking_uri=SecretStr(Layout(project).tracking_uri()))
    parent = MlflowClient(Layout(project).tracking_uri()).get_run(summary["run_id"])
    edges = _task_runs(parent.data.tags["prefect.flow_run_id"])
    with get_client(sync_client=True) as client:  # a tracking URI may hold a password: never stored in Prefect
        assert client.read_flow_run(parent.data.tags["prefect.flow_run_id"]).parameters["tracking_uri"] == "*" * 10
    assert edges == {
        "ingest": [],
        "clean": ["ingest"],
        "split": ["clean"],
        "normalize": ["split"],
        "baseline": ["normalize", "split"],
        "backbone": [],
        "finetune": ["backbone", "normalize", "split"],
        "distill": ["finetune", "normalize", "split"],
        "quantize": ["distill", "finetune", "normalize", "split"],
        "evaluate": ["distill", "finetune", "normalize", "quantize", "split"],
        "select": ["evaluate", "finetune", "split"],
    }

    from prefect.client.orchestration import get_client

    from flows.registry import promote

    result = promote(params=params, root=str(project), tracking_uri=Layout(project).tracking_uri(), actor="review")
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        promotion = [a for a in artifact if a.key == "promotion-distilflow-digits"]
    assert len(promotion) == 1 and promotion[0].type == "markdown"
    assert f"v{result['version']}: {result['decision']}" in promotion[0].data
    assert "| min_accuracy |" in promotion[0].data and "| max_size_kb |" in promotion[0].data
