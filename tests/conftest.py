"""Shared fixtures: a real Prefect API, a real MLflow SQLite store, a demo project.

Prefect reads its settings at import, so its home (results, cache records)
is pointed at a throwaway folder before anything imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="distilflow-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub; fail fast instead of retrying
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch):
    """Every test names its own MLflow store; nothing leaks in from the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API server (temporary SQLite database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory) -> Path:
    from tasks.data import export_digits

    return export_digits(tmp_path_factory.mktemp("raw") / "digits.csv")


@pytest.fixture
def project(tmp_path, digits_csv) -> Path:
    """A project folder with the repo's params.yaml and the demo data."""
    (tmp_path / "data/raw").mkdir(parents=True)
    shutil.copy(digits_csv, tmp_path / "data/raw/digits.csv")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def edit_params(project: Path, **sections) -> None:
    """Merge {section: {key: value}} into a project's params.yaml."""
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


QUICK = dict(  # a whole pipeline run in ~20 s: scratch teacher, short training, no transfer check
    backbone={"spec": "builtin:cnn", "width": 16, "depth": 3, "input_size": None},
    # the recipe of a small CNN from scratch, not the ImageNet backbone's of params.yaml
    train={"epochs": 3, "warmup_epochs": 0, "lr_decay": 0.5, "freeze_batchnorm": False, "augment": {"enabled": False}},
    transfer={"enabled": False},
    distill={"epochs": 3, "gain_label_budgets": []},
    quantize={"calibration_size": 64},
    evaluate={"repeats": 5},
    select={"max_drop": 0.1},  # 3 epochs: the students land within 10 points of the teacher, not 1
    registry={"gates": {"min_accuracy": 0.5, "max_accuracy_drop": 0.05, "max_latency_ms": 100.0, "max_size_kb": 4096}},
)


@pytest.fixture(scope="session")
def trained(prefect_api, tmp_path_factory, digits_csv) -> dict:
    """A project after one full pipeline run (registered @challenger in its embedded store); treat as read-only."""
    from distilflow.layout import Layout
    from distilflow.params import load_params
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("trained")
    (root / "data/raw").mkdir(parents=True)
    shutil.copy(digits_csv, root / "data/raw/digits.csv")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for section, values in QUICK.items():
        edit_params(root, **{section: values})
    params = load_params(root / "params.yaml")
    uri = Layout(root).tracking_uri()
    summary = pipeline(params=params, root=str(root), tracking_uri=uri)
    return {"root": root, "uri": uri, "params": params, "summary": summary}
