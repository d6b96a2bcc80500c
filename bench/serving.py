"""7. Serving: what a caller of the registered model waits, next to the bare runtime's figure.

Side by side in one process, round-robin in blocks (`interleaved_timings`), on
one raw row of the demo data:
- the bare runtime: the product's ONNX Runtime session on a normalised row
  (the figure the evaluation harness reports and `max_latency_ms` gates);
- `pyfunc.predict` of the registered model on a one-row DataFrame: MLflow's
  schema check, the preprocessing, the runtime and the output frame
  (`served_latency_b1_ms`, gated by `max_served_latency_ms`);
- one HTTP request to `mlflow models serve` (`distilflow serve-model`) on
  loopback, over a kept-alive connection.

Also the start-up of `distilflow score` on 5 rows (a fresh process each time,
the `score` target being under 3 s): it runs no Prefect, and the registered
model loads from its files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import check, interleaved_timings, summarize
from distilflow.layout import Layout
from distilflow.settings import ENV

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "backbone.spec=builtin:cnn",
    "train.epochs=3",
    "transfer.enabled=false",
    "distill.epochs=3",
    "distill.gain_label_budgets=[]",
    "evaluate.repeats=5",
    "select.max_drop=0.1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _project(root: Path, env: dict) -> Path:
    """A demo project with one registered product (a short pipeline run through the CLI)."""
    from tasks.data import export_digits

    (root / "data/raw").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    export_digits(Layout(root).demo_data)
    cmd = [sys.executable, "-m", "distilflow", "run", "--params", str(root / "params.yaml")]
    cmd += [a for o in OVERRIDES for a in ("--set", o)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return root


def run(repeats: int = 300, score_runs: int = 5, workdir: Path | None = None) -> dict:
    """The three latencies side by side, and the score command's start-up."""
    import httpx
    import mlflow.pyfunc
    import pandas as pd

    from distilflow.io import read_json
    from distilflow.layout import Layout
    from tasks.inference import load_predictor
    from tasks.preprocessing import apply_normalizer

    work = Path(workdir or tempfile.mkdtemp(prefix="bench-serving-"))
    env = {k: v for k, v in os.environ.items() if k not in (ENV["tracking_uri"], ENV["prefect_api_url"])}
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(REPO))
    root = _project(work / "project", env)
    layout = Layout(root)
    pick = read_json(layout.selection)["pick"]
    pre = read_json(layout.preprocessor)
    raw = pd.read_csv(Layout(root).demo_data).drop(columns=["label"]).head(1)
    bare = load_predictor(layout.candidates / pick["candidate"], threads=2)
    row = apply_normalizer(pre, raw)
    uri = "models:/distilflow-digits@challenger"
    mlflow.set_tracking_uri(Layout(root).tracking_uri())
    (work / "model").mkdir(parents=True, exist_ok=True)
    served = mlflow.pyfunc.load_model(uri, dst_path=str(work / "model"))

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distilflow",
            "serve-model",
            "--params",
            str(root / "params.yaml"),
            "--model-uri",
            uri,
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    body = {"dataframe_split": {"columns": list(raw.columns), "data": raw.values.tolist()}}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.time() + 120
            while True:
                try:
                    if client.get("/ping").status_code == 200:
                        break
                except httpx.HTTPError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.5)
            timings = interleaved_timings(
                {
                    "bare runtime (ORT session, normalised row)": lambda: bare.run(row),
                    "pyfunc.predict (one raw row)": lambda: served.predict(raw),
                    "HTTP POST /invocations (one raw row)": lambda: client.post(
                        "/invocations", json=body
                    ).raise_for_status(),
                },
                repeats,
            )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    ms = {name: {k: (v * 1e3 if k != "n" else v) for k, v in t.items()} for name, t in timings.items()}

    raw5 = pd.read_csv(Layout(root).demo_data).head(5)
    raw5.to_csv(work / "five.csv", index=False)
    starts = []
    for _ in range(score_runs):
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "distilflow",
                "score",
                "--params",
                str(root / "params.yaml"),
                str(work / "five.csv"),
                "--out",
                str(work / "five_out.csv"),
                "--model-uri",
                uri,
            ],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        starts.append(time.perf_counter() - t0)
    score = summarize(starts)
    return {
        "product": pick["variant"],
        "latency_ms": ms,
        "score_5_rows_s": score,
        "setting": f"the demo's product ({pick['variant']}) from a short builtin-CNN run; {repeats} timed calls per "
        "contender, round-robin in blocks; `score` as a fresh process each time",
        "targets": [
            check(
                "serving.score_startup",
                "`distilflow score` on 5 rows, fresh process (s)",
                score["median"],
                "<=",
                3.0,
                note=f"min {score['min']:.2f} s, max {score['max']:.2f} s",
            ),
        ],
    }
