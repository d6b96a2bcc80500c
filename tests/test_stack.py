"""The team stack on loopback (`python -m stack up`): PostgreSQL, an MLflow server and a Prefect server on it, Dask.

A client reaches it through environment variables only (the stack's `env`
file): a pipeline run, a promotion and a scoring run go to the stack's
servers, and land in its PostgreSQL. The database password never shows in
what the CLI prints, in MLflow or in Prefect. Bad input (a wrong database
password, an unreachable server, a busy port, a second `up`) is one line and
changes nothing; `down` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import psycopg2
import pytest
from mlflow.tracking import MlflowClient

from stack.procs import alive
from tests.conftest import REPO
from tests.stack_helpers import (
    assert_one_clean_error,
    base_env,
    distilflow,
    group_members,
    listening_sockets,
    make_project,
    password,
    read_env,
    stack,
    stack_dir,
)

pytestmark = pytest.mark.slow
MODEL = "distilflow-digits"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def team_stack():
    """`python -m stack up` on loopback with free ports and 2 Dask workers; down and deleted afterwards."""
    root = stack_dir()
    try:
        up = stack("up", "--dir", str(root), "--auto-ports", "--workers", "2", timeout=420)
        state = json.loads((root / "state.json").read_text())
        yield {
            "root": root,
            "up": up,
            "env": read_env(root / "env"),
            "password": password(root),
            "pids": json.loads((root / "pids.json").read_text()),
            "endpoints": state["endpoints"],
        }
    finally:
        stack("down", "--dir", str(root), "--purge", check=False)
        shutil.rmtree(root.parent, ignore_errors=True)


def _db(team_stack, dbname: str):
    host, port = team_stack["endpoints"]["postgres"]
    return psycopg2.connect(host=host, port=port, user="distilflow", password=team_stack["password"], dbname=dbname)


def _query(team_stack, dbname: str, sql: str, args=()) -> list[tuple]:
    conn = _db(team_stack, dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def on_stack(team_stack, tmp_path_factory, digits_csv):
    """A pipeline run, a promotion and a scoring run of one project, through the stack's env vars only."""
    project = make_project(tmp_path_factory.mktemp("on-stack"), digits_csv)
    env = team_stack["env"]
    t0 = time.monotonic()
    run = distilflow(project, env, "run")
    run_s = time.monotonic() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    promote = distilflow(project, env, "promote", "--by", "stack-test")
    assert promote.returncode == 0, promote.stdout[-3000:] + promote.stderr[-3000:]
    score = distilflow(project, env, "score", str(project / "data/raw/digits.csv"), "--out", "preds.csv")
    assert score.returncode == 0, score.stdout[-3000:] + score.stderr[-3000:]
    run_id = next(line.split()[3] for line in run.stdout.splitlines() if line.startswith("done: MLflow run "))
    print(f"\npipeline run on the stack: {run_s:.1f} s")
    return {"project": project, "run": run, "promote": promote, "score": score, "run_id": run_id}


@pytest.fixture(scope="module")
def fresh_project(tmp_path_factory, digits_csv):
    """A project that has never run: what the bad-input tests point at the stack."""
    return make_project(tmp_path_factory.mktemp("fresh"), digits_csv)


def test_up_prints_the_urls_and_environment_with_the_password_redacted(team_stack):
    out, env, secret = team_stack["up"].stdout, team_stack["env"], team_stack["password"]
    assert secret not in out + team_stack["up"].stderr
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DISTILFLOW_SEARCH_STORAGE", "DISTILFLOW_DASK_ADDRESS"):
        assert f"export {key}=" in out
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:") and env["MLFLOW_TRACKING_URI"] in out
    assert env["PREFECT_API_URL"].startswith("http://127.0.0.1:") and env["PREFECT_API_URL"].endswith("/api")
    assert env["DISTILFLOW_DASK_ADDRESS"].startswith("tcp://127.0.0.1:")
    # the env file holds the Optuna storage URL with its password; the printed one is redacted
    assert env["DISTILFLOW_SEARCH_STORAGE"].startswith(f"postgresql://distilflow:{secret}@127.0.0.1:")
    assert "postgresql://distilflow:***@127.0.0.1:" in out
    root = team_stack["root"]
    for private in ("env", "pgpass", "pids.json"):
        assert (root / private).stat().st_mode & 0o777 == 0o600, private
    status = stack("status", "--dir", str(root))
    assert status.stdout.count("up  ") == 6 and secret not in status.stdout  # postgres, mlflow, prefect, 3 dask
    assert set(team_stack["pids"]) == {
        "postgres",
        "mlflow",
        "prefect",
        "dask-scheduler",
        "dask-worker-1",
        "dask-worker-2",
    }


def test_every_server_listens_on_loopback_only(team_stack):
    pids = [rec["pid"] for rec in team_stack["pids"].values()]
    sockets = listening_sockets(pids)
    assert sockets, "no listening socket found"
    assert {addr for addr, _, _ in sockets} == {"127.0.0.1"}, sockets
    ports = {port for _, port, _ in sockets}
    ep = team_stack["endpoints"]
    assert ep["postgres"][1] in ports
    for url in (ep["mlflow"], ep["prefect"].removesuffix("/api"), ep["dask-scheduler"]):
        assert int(url.rsplit(":", 1)[1]) in ports


def test_pipeline_promotion_and_scoring_run_through_the_environment_only(on_stack):
    assert f"in {on_stack['run'].stdout.split(' in ', 1)[1].split()[0]}".startswith("in http://127.0.0.1:")
    assert "registered: distilflow-digits version 1 (@challenger)" in on_stack["run"].stdout
    assert "promoted: distilflow-digits v1" in on_stack["promote"].stdout
    assert "scored 1797 rows with models:/distilflow-digits@champion" in on_stack["score"].stdout
    assert (on_stack["project"] / "preds.csv").read_text().count("\n") == 1798
    # nothing went to an embedded store
    assert not (on_stack["project"] / "mlflow.db").exists() and not (on_stack["project"] / "mlartifacts").exists()


def test_the_mlflow_servers_backend_is_the_stacks_postgresql(team_stack, on_stack):
    uri = team_stack["env"]["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(on_stack["run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    # the same run, read straight from PostgreSQL
    assert _query(team_stack, "mlflow", "SELECT status FROM runs WHERE run_uuid = %s", (on_stack["run_id"],)) == [
        ("FINISHED",)
    ]
    aliases = _query(
        team_stack, "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s", (MODEL,)
    )
    assert aliases == [("champion", 1)]
    assert _query(team_stack, "mlflow", "SELECT count(*) FROM runs WHERE status = 'RUNNING'") == [(0,)]
    # artifacts are proxied by the server into the stack's artifact root
    assert any((team_stack["root"] / "mlartifacts").rglob("model_card.md"))


def test_prefect_flow_runs_are_on_the_stacks_prefect_server(team_stack, on_stack):
    api = team_stack["env"]["PREFECT_API_URL"]
    flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()}
    runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200}, timeout=10).json()
    completed = {flows[r["flow_id"]] for r in runs if r["state_type"] == "COMPLETED"}
    assert {"distilflow-pipeline", "distilflow-promote"} <= completed, completed
    # and the Prefect server keeps them in PostgreSQL
    rows = _query(team_stack, "prefect", "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")
    assert rows[0][0] >= 2


def test_the_password_is_nowhere_a_user_or_reviewer_looks(team_stack, on_stack):
    secret = team_stack["password"]
    for name in ("run", "promote", "score"):
        proc = on_stack[name]
        assert secret not in proc.stdout + proc.stderr, name
    uri = team_stack["env"]["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = client.search_experiments()
    for exp in experiments:
        assert secret not in json.dumps(exp.tags)
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            assert secret not in json.dumps(run.data.tags) + json.dumps(run.data.params), run.info.run_name
    for model in client.search_registered_models():
        assert secret not in json.dumps(model.tags) + str(model.description)
        for mv in client.search_model_versions(f"name = '{model.name}'"):
            assert secret not in json.dumps(mv.tags) + str(mv.description) + str(mv.source)
    api = team_stack["env"]["PREFECT_API_URL"]
    for path in ("flow_runs/filter", "task_runs/filter", "logs/filter", "artifacts/filter", "variables/filter"):
        body = httpx.post(f"{api}/{path}", json={"limit": 200}, timeout=10).text
        assert secret not in body, path
    for log in (team_stack["root"] / "logs").glob("*.log"):
        assert secret not in log.read_text(errors="replace"), log.name
    assert secret not in (team_stack["root"] / "pg/postgres.log").read_text(errors="replace")


def _mlflow_run_count(team_stack) -> int:
    return _query(team_stack, "mlflow", "SELECT count(*) FROM runs")[0][0]


def test_a_wrong_database_password_is_one_line_and_changes_nothing(team_stack, fresh_project):
    host, port = team_stack["endpoints"]["postgres"]
    wrong = "Wr0ngPassw0rdForTest"
    env = {**team_stack["env"], "MLFLOW_TRACKING_URI": f"postgresql://distilflow:{wrong}@{host}:{port}/mlflow"}
    before = _mlflow_run_count(team_stack)
    t0 = time.monotonic()
    try:
        proc = distilflow(fresh_project, env, "run", timeout=75)
    except subprocess.TimeoutExpired:
        pytest.fail("a refused database login was not reported within 75 s (bounded retries expected)")
    elapsed = time.monotonic() - t0
    line = assert_one_clean_error(proc, wrong, team_stack["password"])
    assert "password authentication failed" in line and "distilflow:***@" in line, line
    assert elapsed < 60, f"a refused login took {elapsed:.0f} s to report (bounded retries expected)"
    assert _mlflow_run_count(team_stack) == before


def test_an_unreachable_tracking_server_is_one_line_within_seconds(team_stack, fresh_project):
    env = {**team_stack["env"], "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}
    before = _mlflow_run_count(team_stack)
    t0 = time.monotonic()
    proc = distilflow(fresh_project, env, "run", timeout=180)
    elapsed = time.monotonic() - t0
    line = assert_one_clean_error(proc, team_stack["password"])
    assert "unreachable" in line, line
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert _mlflow_run_count(team_stack) == before


def test_an_unreachable_prefect_api_is_one_line_within_seconds(team_stack, fresh_project):
    env = {**team_stack["env"], "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"}
    before = _mlflow_run_count(team_stack)
    t0 = time.monotonic()
    proc = distilflow(fresh_project, env, "run", timeout=180)
    elapsed = time.monotonic() - t0
    line = assert_one_clean_error(proc, team_stack["password"])
    assert "Prefect" in line, line
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert _mlflow_run_count(team_stack) == before


def test_the_stack_refuses_bad_input_with_one_line_and_starts_nothing(team_stack, tmp_path):
    root = team_stack["root"]
    again = stack("up", "--dir", str(root), check=False)
    assert again.returncode == 1 and again.stderr.startswith("distilflow: error: the stack in ")
    assert "already runs" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert stack("status", "--dir", str(root)).stdout.count("up  ") == 6  # the running stack is untouched

    other = stack_dir()
    try:
        mlflow_port = team_stack["env"]["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1]
        busy = stack("up", "--dir", str(other), "--auto-ports", "--mlflow-port", mlflow_port, check=False)
        assert busy.returncode == 1 and len(busy.stderr.strip().splitlines()) == 1
        assert f"port {mlflow_port} on 127.0.0.1 is in use (mlflow)" in busy.stderr
        assert not (other / "pids.json").exists() and not (other / "pg").exists()  # nothing was started

        for host, says in (("0.0.0.0", "every interface"), ("10.255.255.254", "not an address of this host")):
            proc = stack("up", "--dir", str(other), "--host", host, "--auto-ports", check=False)
            assert proc.returncode == 1 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

        none = stack("down", "--dir", str(other))
        assert "nothing was running" in none.stdout
    finally:
        shutil.rmtree(other.parent, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="hides PostgreSQL in a mount namespace")
def test_postgresql_not_installed_says_how_to_install_it(tmp_path):
    other = stack_dir()
    try:
        hidden = subprocess.run(
            ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none /usr/lib/postgresql && exec "$@"', "sh"]
            + [sys.executable, "-m", "stack", "up", "--dir", str(other), "--auto-ports"],
            capture_output=True,
            text=True,
            timeout=60,
            env=base_env(),
            cwd=REPO,
        )
        if "mount" in hidden.stderr and "distilflow: error" not in hidden.stderr:
            pytest.skip(f"no mount namespace here: {hidden.stderr.strip()}")
        assert hidden.returncode == 1, hidden.stderr
        assert hidden.stderr.strip() == (
            "distilflow: error: PostgreSQL is not installed: `apt-get install postgresql` (Debian's package)"
        )
        assert not (other / "pids.json").exists()
    finally:
        shutil.rmtree(other.parent, ignore_errors=True)


def test_down_stops_everything_it_started_and_a_wrong_password_then_stops_up(team_stack):
    root, pids = team_stack["root"], team_stack["pids"]
    down = stack("down", "--dir", str(root))
    for name in pids:
        assert name in down.stdout
    for name, rec in pids.items():
        assert not alive(rec), f"{name} (PID {rec['pid']}) still runs"
        assert not group_members(rec["pid"]), f"{name} (PID {rec['pid']}) left processes behind"
    assert not (root / "pg/data/postmaster.pid").exists()
    ep = team_stack["endpoints"]
    for port in (ep["postgres"][1], int(ep["mlflow"].rsplit(":", 1)[1]), int(ep["dask-scheduler"].rsplit(":", 1)[1])):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    assert "nothing was running" in stack("down", "--dir", str(root)).stdout  # idempotent
    status = stack("status", "--dir", str(root), check=False)
    assert status.returncode == 1 and "no stack running" in status.stdout

    # a pgpass that no longer matches the cluster: one line, and nothing left running
    pgpass = root / "pgpass"
    saved = pgpass.read_text()
    pgpass.write_text(saved.rsplit(":", 1)[0] + ":NotTheRightOne\n")
    try:
        up = stack("up", "--dir", str(root), check=False)
        assert up.returncode == 1 and len(up.stderr.strip().splitlines()) == 1, up.stderr
        assert 'password authentication failed for user "distilflow"' in up.stderr
        assert "NotTheRightOne" not in up.stderr and team_stack["password"] not in up.stderr
        assert not (root / "pg/data/postmaster.pid").exists()
        left = json.loads((root / "pids.json").read_text()) if (root / "pids.json").exists() else {}
        assert not [rec for rec in left.values() if alive(rec)], left
    finally:
        pgpass.write_text(saved)
