"""The team stack spread over hosts: Linux network namespaces on one private bridge, nothing leaves the machine.

    10.77.0.2  db       PostgreSQL + MLflow server (+ the DVC remote's sshd)
    10.77.0.3  prefect  Prefect server (on db's PostgreSQL)
    10.77.0.4  dask1    Dask scheduler + a worker
    10.77.0.5  dask2    a second Dask worker
    10.77.0.6  client1  the pipeline, a promotion, `dvc push`
    10.77.0.7  client2  a concurrent promotion, `dvc pull`
    10.77.0.1  (the test itself, in the root namespace, reads the registry and the databases)

The bridge lives in a namespace of its own; no namespace has a default route.
Every server is started with `ip netns exec <host> python -m stack up --host
<its address> --only ... --join <the stack it extends>`; clients get the
stack's URLs through environment variables only. Needs root (`ip netns`);
skipped otherwise. Everything is torn down even when a test fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.stack_helpers import (
    base_env,
    distilflow,
    distilflow_cmd,
    error_lines,
    listening_sockets,
    make_project,
    read_env,
    stack,
    stack_dir,
)

pytestmark = pytest.mark.slow
MODEL = "distilflow-digits"
HOSTS = {"db": 2, "prefect": 3, "dask1": 4, "dask2": 5, "client1": 6, "client2": 7}


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {proc.stderr.strip()}")
    return proc


def _free_subnet() -> str:
    used = _ip("-4", "route", "show").stdout + _ip("-4", "addr", "show").stdout
    for third in range(77, 100):
        if f"10.{third}." not in used:
            return f"10.{third}.0"
    pytest.skip("no free 10.x.0.0/24 subnet for the test network")


class Network:
    """Namespaces df<id>-<host> with one veth each into a bridge in df<id>-net, plus one leg in the root namespace."""

    def __init__(self):
        self.tag = f"df{os.getpid() % 100000}"
        self.subnet = _free_subnet()
        self.bridge_ns = f"{self.tag}-net"
        self.ns = {host: f"{self.tag}-{host}" for host in HOSTS}
        self.created: list[str] = []

    def ip_of(self, host: str) -> str:
        return f"{self.subnet}.{HOSTS[host]}"

    def up(self) -> None:
        for ns in (self.bridge_ns, *self.ns.values()):
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("link", "set", "lo", "up", netns=ns)
        _ip("link", "add", "br0", "type", "bridge", netns=self.bridge_ns)
        _ip("link", "set", "br0", "up", netns=self.bridge_ns)
        legs = [(host, self.ns[host], self.ip_of(host)) for host in HOSTS] + [("obs", None, f"{self.subnet}.1")]
        for i, (_host, ns, address) in enumerate(legs):
            inner, outer = f"{self.tag}h{i}", f"{self.tag}b{i}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", outer, "netns", self.bridge_ns)
            _ip("link", "set", outer, "master", "br0", "up", netns=self.bridge_ns)
            if ns:
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", inner, "name", "eth0", netns=ns)
                inner = "eth0"
            _ip("addr", "add", f"{address}/24", "dev", inner, netns=ns)
            _ip("link", "set", inner, "up", netns=ns)

    def down(self) -> None:
        for ns in self.created:  # what still runs in our namespaces was started by this test
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)
        self.created.clear()


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if not shutil.which("ip"):
        return "needs iproute2 (ip netns)"
    probe = f"dfprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The stack over five namespace hosts; yields addresses, folders and the client environment."""
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    net = Network()
    dirs = {host: stack_dir(f"distilflow-{host}-") for host in ("db", "prefect", "dask1", "dask2")}
    try:
        net.up()
        ns = net.ns
        stack("up", "--dir", str(dirs["db"]), "--host", net.ip_of("db"), "--only", "postgres,mlflow", netns=ns["db"])
        stack(
            *("up", "--dir", str(dirs["prefect"]), "--host", net.ip_of("prefect"), "--only", "prefect"),
            *("--join", str(dirs["db"])),
            netns=ns["prefect"],
        )
        stack(
            *("up", "--dir", str(dirs["dask1"]), "--host", net.ip_of("dask1"), "--only", "dask-scheduler,dask-workers"),
            *("--workers", "1", "--join", str(dirs["prefect"])),
            netns=ns["dask1"],
        )
        stack(
            *("up", "--dir", str(dirs["dask2"]), "--host", net.ip_of("dask2"), "--only", "dask-workers"),
            *("--workers", "1", "--join", str(dirs["dask1"])),
            netns=ns["dask2"],
        )
        stack("dvc-remote", "--dir", str(dirs["db"]), "--host", net.ip_of("db"), netns=ns["db"])
        env = read_env(dirs["dask2"] / "env")  # the last of the chain knows every service
        yield {"net": net, "dirs": dirs, "env": env}
    finally:
        for host in ("dask2", "dask1", "prefect", "db"):
            stack("down", "--dir", str(dirs[host]), "--purge", check=False)
            shutil.rmtree(dirs[host].parent, ignore_errors=True)
        net.down()


@pytest.fixture(scope="module")
def client(cluster) -> MlflowClient:
    uri = cluster["env"]["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory, digits_csv):
    """One pipeline run from client1, through the stack's addresses only."""
    project = make_project(tmp_path_factory.mktemp("client1"), digits_csv)
    run = distilflow(project, cluster["env"], "run", netns=cluster["net"].ns["client1"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return project


def test_every_service_listens_on_its_own_hosts_address_only(cluster):
    net, dirs = cluster["net"], cluster["dirs"]
    env = cluster["env"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://{net.ip_of('db')}:5000"
    assert env["PREFECT_API_URL"] == f"http://{net.ip_of('prefect')}:4200/api"
    assert env["DISTILFLOW_DASK_ADDRESS"] == f"tcp://{net.ip_of('dask1')}:8786"
    assert f"@{net.ip_of('db')}:5433/search" in env["DISTILFLOW_SEARCH_STORAGE"]
    for host, folder in dirs.items():
        pids = [rec["pid"] for rec in json.loads((folder / "pids.json").read_text()).values()]
        addresses = {addr for addr, _, _ in listening_sockets(pids)}
        assert addresses == {net.ip_of(host)}, (host, addresses)


def test_the_dask_worker_on_another_host_runs_tasks_with_the_stacks_environment(cluster):
    code = (
        "import os, sys; from distributed import Client\n"
        "with Client(sys.argv[1], timeout='20s') as c:\n"
        "    print(sorted(c.run(lambda: os.environ['MLFLOW_TRACKING_URI']).items()))\n"
    )
    net = cluster["net"]
    proc = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            net.ns["client1"],
            sys.executable,
            "-c",
            code,
            cluster["env"]["DISTILFLOW_DASK_ADDRESS"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=base_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"tcp://{net.ip_of('dask2')}:" in proc.stdout and cluster["env"]["MLFLOW_TRACKING_URI"] in proc.stdout


def test_two_hosts_promote_at_once_and_the_registry_stays_consistent(cluster, client, trained, tmp_path_factory):
    net = cluster["net"]
    other = tmp_path_factory.mktemp("client2") / "project"  # client2's checkout: the same params and data
    shutil.copytree(trained, other, ignore=shutil.ignore_patterns(".prefect"))
    procs = {}
    for host, project in (("client1", trained), ("client2", other)):
        procs[host] = subprocess.Popen(
            distilflow_cmd(project, "promote", "--by", host, netns=net.ns[host]),
            cwd=REPO,
            env=base_env(PREFECT_HOME=str(project / ".prefect"), **cluster["env"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {host: (p.wait(timeout=300), *p.communicate()) for host, p in procs.items()}
    promoted = [h for h, (rc, out, _) in results.items() if rc == 0 and f"promoted: {MODEL} v1" in out]
    assert len(promoted) == 1, results
    loser = next(h for h in results if h not in promoted)
    rc, _, err = results[loser]
    assert rc == 1 and len(error_lines(err)) == 1 and "already decided" in error_lines(err)[0], err[-2000:]

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1" and champion.tags["promotion.decision"] == "promoted"
    assert champion.tags["promotion.by"] == promoted[0]
    assert {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()} == {"champion": "1"}
    audit = client.get_experiment_by_name("distilflow-registry-audit")
    actions = [r.data.tags.get("distilflow.audit.action") for r in client.search_runs([audit.experiment_id])]
    assert actions == ["promote"], actions


def test_restarting_the_mlflow_server_during_a_run_leaves_no_run_running(cluster, client, trained):
    net, db = cluster["net"], cluster["dirs"]["db"]
    log = trained / "restart-run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            # a changed param: every stage from finetune on runs again, logging to MLflow all along
            distilflow_cmd(trained, "run", "--set", "train.epochs=4", netns=net.ns["client1"]),
            cwd=REPO,
            env=base_env(PREFECT_HOME=str(trained / ".prefect"), **cluster["env"]),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while "Task run 'normalize'" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach normalize within 180 s"
            time.sleep(0.2)
        t0 = time.monotonic()
        stack("down", "--dir", str(db), "--only", "mlflow", netns=net.ns["db"])
        # down until the run has finished training and needs MLflow to record it, so its calls meet the outage
        while (
            "Task run 'finetune' - Finished" not in log.read_text(errors="replace")
            and proc.poll() is None
            and time.monotonic() - t0 < 120
        ):
            time.sleep(0.2)
        # the stage's MLflow record follows at once: it met the outage
        assert "Task run 'finetune' - Finished" in log.read_text(errors="replace"), log.read_text()[-3000:]
        time.sleep(3)
        stack("up", "--dir", str(db), "--host", net.ip_of("db"), "--only", "mlflow", netns=net.ns["db"])
        restart_s = time.monotonic() - t0
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    retries = [line for line in text.splitlines() if "Retrying" in line or "retry" in line.lower()]
    print(f"\nMLflow was down {restart_s:.1f} s during the run; the run exited {rc}; {len(retries)} retry lines")
    print("\n".join(retries[:3] + text.splitlines()[-2:]))
    if rc != 0:  # a failure must be one clear line
        assert rc == 1 and len(error_lines(text)) == 1, text[-3000:]
    running = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'", max_results=100
    )
    assert running == [], [(r.info.run_name, r.info.run_id) for r in running]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_dvc_data_pushed_from_one_host_is_pulled_byte_identical_on_another(cluster, digits_csv, tmp_path):
    net, db = cluster["net"], cluster["dirs"]["db"]
    pusher, puller = tmp_path / "client1-data", tmp_path / "client2-data"
    pusher.mkdir()
    env = base_env(DVC_NO_ANALYTICS="1")
    dvc = [str(Path(sys.executable).parent / "dvc")]
    subprocess.run([*dvc, "init", "-q", "--no-scm"], cwd=pusher, check=True, env=env)
    shutil.copy(digits_csv, pusher / "digits.csv")
    subprocess.run([*dvc, "add", "-q", "digits.csv"], cwd=pusher, check=True, env=env)

    # a key the remote does not know: refused in one line, and the remote stays empty
    other_key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    refused = stack(
        *("dvc-push", "--dir", str(db), "--project", str(pusher), "--keyfile", str(other_key)),
        netns=net.ns["client1"],
        check=False,
    )
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "did not accept the key" in refused.stderr
    assert not any(p.is_file() for p in (db / "dvc-remote").rglob("*"))
    assert not (pusher / ".dvc/config.local").exists()  # the project's config is left as it was

    pushed = stack("dvc-push", "--dir", str(db), "--project", str(pusher), netns=net.ns["client1"])
    assert f"ssh://root@{net.ip_of('db')}:2222" in pushed.stdout and "1 file pushed" in pushed.stdout

    (puller / ".dvc").mkdir(parents=True)  # the third host has the checkout (.dvc files), not the data
    shutil.copy(pusher / "digits.csv.dvc", puller / "digits.csv.dvc")
    shutil.copy(pusher / ".dvc/config", puller / ".dvc/config")
    stack("dvc-pull", "--dir", str(db), "--project", str(puller), netns=net.ns["client2"])
    assert _md5(puller / "digits.csv") == _md5(pusher / "digits.csv") == _md5(digits_csv)


def _storage_trials(url: str, study: str) -> list:
    import optuna

    return optuna.load_study(study_name=study, storage=url).trials


def test_killing_a_dask_worker_during_a_search_fails_or_retries_its_trial_and_the_study_finishes(
    cluster, client, digits_csv, tmp_path_factory
):
    """A search from client1 on the two-host Dask cluster, its study on db's PostgreSQL: the worker on dask2 is
    killed (-9, with its nanny) while trials run; every trial ends COMPLETE, PRUNED or FAIL, the pick is
    registered once, and no MLflow run is left RUNNING."""
    from optuna.trial import TrialState

    net, env = cluster["net"], cluster["env"]
    study = "multihost-search"
    project = make_project(
        tmp_path_factory.mktemp("client1-search"),
        digits_csv,
        distill={"epochs": 8, "gain_label_budgets": []},  # trials long enough to be killed inside one
        search={
            "space": {"distill.student_width": {"int": [4, 16], "log": True}, "distill.temperature": {"float": [1, 8]}},
            "n_trials": 4,
            "workers": 2,
            "pruner": "none",
            "reevaluate_top": 2,
            "study_name": study,
        },
    )
    log = project / "search.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            distilflow_cmd(project, "search", netns=net.ns["client1"]),
            cwd=REPO,
            env=base_env(PREFECT_HOME=str(project / ".prefect"), **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = env["DISTILFLOW_SEARCH_STORAGE"]  # db's PostgreSQL, which this (root) namespace reaches too
    try:
        deadline, running = time.monotonic() + 300, []
        while len(running) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "two trials were not running within 300 s\n" + log.read_text()[-3000:]
            time.sleep(1)
            try:
                running = [t.number for t in _storage_trials(url, study) if t.state == TrialState.RUNNING]
            except Exception:  # the study is not created until the shared stages have run
                running = []
        time.sleep(5)  # inside the trials' training
        worker = json.loads((cluster["dirs"]["dask2"] / "pids.json").read_text())["dask-worker-1"]["pid"]
        subprocess.run(["pkill", "-9", "-g", str(os.getpgid(worker))], check=False)
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    trials = _storage_trials(url, study)
    print(f"\nkilled dask2's worker while trials {running} ran; the search exited {rc}")
    print("\n".join(f"trial {t.number}: {t.state.name} {t.user_attrs.get('fail_reason', '')[:150]}" for t in trials))
    assert rc == 0, text[-4000:]
    assert len(trials) == 4 and all(t.state != TrialState.RUNNING for t in trials), [t.state for t in trials]
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 2
    for number in running:  # the killed one was retried on dask1 (COMPLETE) or failed with its reason
        t = trials[number]
        assert t.state == TrialState.COMPLETE or t.user_attrs.get("fail_reason"), (number, t.state, t.user_attrs)
    versions = client.search_model_versions(f"name='{MODEL}'")
    picked = [v for v in versions if v.tags.get("search.study") == study]
    assert len(picked) == 1, [(v.version, v.tags) for v in versions]
    running_runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'", max_results=100
    )
    assert running_runs == [], [(r.info.run_name, r.info.run_id) for r in running_runs]
