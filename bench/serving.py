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
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import REPO, check, distilflow_command, in_ms, interleaved_timings, make_project, summarize
from distilflow.layout import Layout
from distilflow.settings import ENV

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
    make_project(root)
    cmd = distilflow_command("run", params=root / "params.yaml", overrides=OVERRIDES)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return root


def _env(work: Path) -> dict:
    """This environment without the stack's variables: the embedded store, a Prefect home of its own."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV["tracking_uri"], ENV["prefect_api_url"])}
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(REPO))
    return env


def _contenders(root: Path, work: Path, uri: str) -> dict:
    """The product's pick, one raw demo row, the bare runtime and its normalised row, and the registered model."""
    import mlflow.pyfunc
    import pandas as pd

    from distilflow.io import read_json
    from tasks.inference import load_predictor
    from tasks.preprocessing import apply_normalizer

    layout = Layout(root)
    pick = read_json(layout.selection)["pick"]
    pre = read_json(layout.preprocessor)
    raw = pd.read_csv(layout.demo_data).drop(columns=["label"]).head(1)
    bare = load_predictor(layout.candidates / pick["candidate"], threads=2)
    row = apply_normalizer(pre, raw)
    mlflow.set_tracking_uri(layout.tracking_uri())
    (work / "model").mkdir(parents=True, exist_ok=True)
    served = mlflow.pyfunc.load_model(uri, dst_path=str(work / "model"))
    return {"pick": pick, "raw": raw, "bare": bare, "row": row, "served": served}


def _serve_model(root: Path, uri: str, port: int, env: dict) -> subprocess.Popen:
    """`distilflow serve-model` on loopback, in a session of its own (stopped with its children)."""
    return subprocess.Popen(
        [*distilflow_command("serve-model", params=root / "params.yaml"), "--model-uri", uri, "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_until_up(client, timeout_s: float = 120) -> None:
    """Poll the server's /ping until it answers 200; raise its last connection error once `timeout_s` is up."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if client.get("/ping").status_code == 200:
                return
        except httpx.HTTPError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _latencies(root: Path, uri: str, c: dict, repeats: int, env: dict) -> dict[str, dict]:
    """The bare runtime, pyfunc.predict and one HTTP request, round-robin in blocks (ms per call)."""
    import httpx

    bare, row, served, raw = c["bare"], c["row"], c["served"], c["raw"]
    port = _free_port()
    server = _serve_model(root, uri, port, env)
    body = {"dataframe_split": {"columns": list(raw.columns), "data": raw.values.tolist()}}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            _wait_until_up(client)
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
    return {name: in_ms(t) for name, t in timings.items()}


def _score_startups(root: Path, work: Path, uri: str, runs: int, env: dict) -> list[float]:
    """`distilflow score` on 5 raw rows, a fresh process each time (seconds from spawn to exit)."""
    import pandas as pd

    pd.read_csv(Layout(root).demo_data).head(5).to_csv(work / "five.csv", index=False)
    starts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(
            [
                *distilflow_command("score", params=root / "params.yaml"),
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
    return starts


def run(repeats: int = 300, score_runs: int = 5, workdir: Path | None = None) -> dict:
    """The three latencies side by side, and the score command's start-up."""
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-serving-"))
    env = _env(work)
    root = _project(work / "project", env)
    uri = "models:/distilflow-digits@challenger"
    contenders = _contenders(root, work, uri)
    ms = _latencies(root, uri, contenders, repeats, env)
    score = summarize(_score_startups(root, work, uri, score_runs, env))
    pick = contenders["pick"]
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
