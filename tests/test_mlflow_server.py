"""End to end against a real `mlflow server` on a loopback port: pipeline run, promote, then read it all over REST."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distilflow.params import load_params
from flows.pipeline import pipeline
from flows.registry import promote
from tasks.registry import AUDIT_EXPERIMENT, CHAMPION
from tests.conftest import QUICK, edit_params

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_pipeline_and_promotion_through_a_real_mlflow_server(prefect_api, project, mlflow_server):
    for section, values in QUICK.items():
        edit_params(project, **{section: values})
    params = load_params(project / "params.yaml")
    summary = pipeline(params=params, root=str(project), tracking_uri=mlflow_server)
    decision = promote(params=params, root=str(project), tracking_uri=mlflow_server, actor="e2e")
    assert decision["decision"] == "promoted"

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    name = params.registered_model()
    model = client.get_registered_model(name)
    version = summary["registered"]["version"]
    assert {k: str(v) for k, v in model.aliases.items()} == {CHAMPION: version}
    mv = client.get_model_version(name, version)
    assert mv.tags["promotion.decision"] == "promoted" and mv.tags["promotion.by"] == "e2e"
    assert mv.tags["parent_run_id"] == summary["run_id"] and mv.tags["data_md5"] and mv.tags["split_hash.test"]
    # QUICK (3 epochs, a from-scratch 16x3 teacher): the product scores ~0.95 on the 269 test rows
    assert float(mv.tags["test_accuracy"]) >= 0.92 and mv.source == f"runs:/{mv.run_id}/registered/{name}"
    assert client.get_run(mv.run_id).info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    for ref in (f"{name}-teacher", f"{name}-student"):
        assert [v.version for v in client.search_model_versions(f"name = '{ref}'")] == ["1"]

    # the runs a reviewer reads: experiment per dataset, parent + one child per stage, plots attached
    parent = client.get_run(summary["run_id"])
    assert client.get_experiment(parent.info.experiment_id).name == "distilflow-digits"
    assert parent.info.run_name.startswith("digits-") and parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name for r in children} >= {
        "ingest",
        "clean",
        "split",
        "normalize",
        "finetune",
        "distill",
        "quantize",
        "evaluate",
        "select",
        "register",
    }
    assert {"pareto.png", "compression.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    finetune = next(r for r in children if r.info.run_name == "finetune")
    assert {"teacher_learning_curve.png", "teacher_confusion_test.png"} <= {
        a.path for a in client.list_artifacts(finetune.info.run_id)
    }
    register = next(r for r in children if r.info.run_name == "register")
    assert mv.run_id == register.info.run_id and "model_card.md" in {
        a.path for a in client.list_artifacts(register.info.run_id)
    }

    audit = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    runs = client.search_runs([audit.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["distilflow.audit.action"] == "promote"
    assert runs[0].data.tags["distilflow.audit.by"] == "e2e"
