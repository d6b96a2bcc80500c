"""The registered model over HTTP: `distilflow serve-model` (mlflow models serve), raw rows in, predictions out."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from distilflow.io import read_json
from distilflow.layout import Layout
from tasks.inference import load_predictor
from tasks.preprocessing import apply_normalizer
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected(layout: Layout, rows: pd.DataFrame) -> list:
    """What the pipeline's own evaluation path predicts for raw rows: preprocessing, then the int8 runtime."""
    pre = read_json(layout.preprocessor)
    pick = read_json(layout.selection)["pick"]["candidate"]  # the registered product: what the select stage chose
    logits = load_predictor(layout.candidates / pick)(apply_normalizer(pre, rows))
    return np.asarray(pre["classes"])[logits.argmax(1)].tolist()


def test_serve_model_answers_integer_float_and_missing_values_like_the_pipeline(trained):
    layout = Layout(trained["root"])
    port = _free_port()
    # no venv on PATH (nothing activated): the command must find mlflow's uvicorn by itself
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    cmd = [
        sys.executable,
        "-m",
        "distilflow",
        "serve-model",
        "--params",
        str(layout.root / "params.yaml"),
        "--model-uri",
        "models:/distilflow-digits@challenger",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow models serve did not answer /ping within 180 s")

        raw = pd.read_csv(layout.root / "data/raw/digits.csv").drop(columns=["label"]).head(20)
        assert (raw.dtypes == "int64").all()  # a CSV of pixels: integer columns
        floats = raw.astype("float64")
        floats.loc[0, "px10"] = 13.9  # taken as it is, not truncated
        floats.loc[1, "px20"] = np.nan  # imputed with the train median, as the card says
        for frame in (raw, floats):
            body = {
                "dataframe_split": {
                    "columns": list(frame.columns),
                    "data": frame.astype(object).where(frame.notna(), None).values.tolist(),
                }
            }
            response = httpx.post(f"{url}/invocations", json=body, timeout=30)
            assert response.status_code == 200, response.text[:500]
            served = [row["prediction"] for row in response.json()["predictions"]]
            assert served == _expected(layout, frame)

        bad = {"dataframe_split": {"columns": list(raw.columns), "data": [["dark"] + [0] * 63]}}
        response = httpx.post(f"{url}/invocations", json=bad, timeout=30)
        assert response.status_code == 400 and "px0" in response.text and "non-numeric" in response.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_registered_models_requirements_load_it_in_a_fresh_venv(trained, tmp_path):
    """The requirements MLflow records are complete: a venv with only them loads the model and predicts."""
    from distilflow.tracking import Tracker

    tracker = Tracker(trained["uri"], trained["root"])
    _, local = tracker.download("models:/distilflow-digits@challenger", tmp_path / "model")
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "onnxruntime==" in requirements
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", "-r", str(local / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    layout = Layout(trained["root"])
    rows = pd.read_csv(layout.root / "data/raw/digits.csv").drop(columns=["label"]).head(25)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({str(local)!r})\n"
        f"print(json.dumps(model.predict(pd.read_csv({str(tmp_path / 'rows.csv')!r}))['prediction'].tolist()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(venv / "bin/python"), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    assert json.loads(proc.stdout.strip().splitlines()[-1]) == _expected(layout, rows)
