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
