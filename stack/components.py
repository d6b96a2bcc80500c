"""Start, stop and inspect the stack's servers; write the environment a client needs.

The stack folder (default `.stack/`) holds everything: `pids.json` (what runs,
by PID and start time), `state.json` (addresses and ports), `env` (the
client's `export` lines, 0600), `pgpass` (the database password, 0600),
`logs/`, PostgreSQL's cluster (`pg/`), the MLflow artifact root
(`mlartifacts/`), the Prefect server's home and the Dask workers' scratch.

One stack can also be spread over several hosts (or network namespaces):
`up --only prefect --join DIR` starts a Prefect server here on the PostgreSQL
of the stack in DIR, `up --only dask-workers --join DIR` adds workers to its
scheduler.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import secrets
import shlex
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from distilflow.layout import Layout
from distilflow.redact import redact
from distilflow.settings import ENV
from stack import StackError
from stack import postgres as pg
from stack.procs import (
    alive,
    free_port,
    http_ok,
    read_json,
    record,
    spawn,
    stop,
    wait_until,
    write_private,
)
from stack.procs import (
    port_free as _port_free,
)

COMPONENTS = ("postgres", "mlflow", "prefect", "dask-scheduler", "dask-workers")
DEFAULT_PORTS = {"postgres": 5433, "mlflow": 5000, "prefect": 4200, "dask-scheduler": 8786, "ssh": 2222}
BIN = Path(sys.executable).parent
# what a client reads; never inherited by the servers from the shell that runs `up`
CLIENT_VARS = tuple(ENV.values())  # what a client sets, and nothing else (distilflow/settings.py reads them)
START_TIMEOUT_S = {"mlflow": 180, "prefect": 240, "dask-scheduler": 60, "dask-workers": 120}


class Paths:
    """Every file of one stack folder."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.pids = self.root / "pids.json"
        self.state = self.root / "state.json"
        self.env = self.root / "env"
        self.pgpass = self.root / "pgpass"
        self.logs = self.root / "logs"
        self.artifacts = Layout(self.root).mlartifacts  # the stack's MLflow server proxies its artifacts here
        self.prefect_home = self.root / "prefect"
        self.dask = self.root / "dask"

    def log(self, name: str) -> Path:
        """The log file of one component."""
        return self.logs / f"{name}.log"


@contextlib.contextmanager
def locked(paths: Paths) -> Iterator[None]:
    """One `up`/`down` at a time per stack folder."""
    paths.root.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, 0o711)  # the postgres user walks through it to its own pg/; nobody lists it
    with open(paths.root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(f"another `python -m stack` command is working on {paths.root}; try again") from None
        yield


def password(paths: Paths, create: bool = True) -> str | None:
    """The database password from `pgpass` (libpq's format, 0600), generated on first use."""
    try:
        return paths.pgpass.read_text().strip().rsplit(":", 1)[1]
    except FileNotFoundError:
        if not create:
            return None
    secret = secrets.token_urlsafe(24)  # no ':' or '\\', which pgpass would need escaped
    write_private(paths.pgpass, f"*:*:*:{pg.USER}:{secret}\n")
    return secret


def _check_host(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise StackError(f"--host {host!r} is not an IP address (use 127.0.0.1, or this host's own address)") from None
    if address.is_unspecified:
        raise StackError(
            f"--host {host} would listen on every interface: give one address (127.0.0.1, or this host's own)"
        )
    return host


def _check_port(host: str, port: int, component: str) -> None:
    import errno

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise StackError(f"{host} is not an address of this host (or network namespace)") from None
    if not _port_free(host, port):
        flag = "--ssh-port" if component == "ssh" else f"--{component.removesuffix('-scheduler')}-port"
        raise StackError(f"port {port} on {host} is in use ({component}): stop what uses it, or choose {flag}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def server_env(extra: dict[str, str]) -> dict[str, str]:
    """The servers' environment: this one, without a client's settings, with this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in (*CLIENT_VARS, "PGPASSWORD", "PGPASSFILE")}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            **extra,
        }
    )
    return env


class Stack:
    """One stack folder: what it runs and where."""

    def __init__(self, root: Path):
        self.paths = Paths(root)
        self.pids: dict[str, dict] = read_json(self.paths.pids, {})
        self.state: dict = read_json(self.paths.state, {})
        self._procs: dict = {}

    # ---------- bookkeeping

    def _save_pids(self) -> None:
        write_private(self.paths.pids, _dumps(self.pids))

    def running(self) -> dict[str, dict]:
        """The recorded processes that still run (PostgreSQL by its cluster's own status)."""
        out = {}
        for name, rec in self.pids.items():
            if name == "postgres":
                if pg.Cluster(self.paths.root).running():
                    out[name] = rec
            elif alive(rec):
                out[name] = rec
        cluster = pg.Cluster(self.paths.root)
        if "postgres" not in out and cluster.running():  # started here, but not recorded (a killed `up`)
            out["postgres"] = record(cluster.postmaster_pid() or 0, command="pg_ctl")
        return out

    def endpoints(self) -> dict:
        """Where each service of this stack (or the stack it joined) answers."""
        return self.state.get("endpoints", {})

    def client_env(self) -> dict[str, str]:
        """The variables a client sets to use this stack (the search storage URL holds the password)."""
        ep, env = self.endpoints(), {}
        if "mlflow" in ep:
            env[ENV["tracking_uri"]] = ep["mlflow"]
        if "prefect" in ep:
            env[ENV["prefect_api_url"]] = ep["prefect"]
        if "postgres" in ep:
            host, port = ep["postgres"]
            env[ENV["search_storage"]] = (
                f"postgresql://{pg.USER}:{password(self.paths, create=False)}@{_url_host(host)}:{port}/search"
            )
        if "dask-scheduler" in ep:
            env[ENV["dask_address"]] = ep["dask-scheduler"]
        return env

    def write_env(self) -> None:
        """`env`: the client's export lines (0600: the search storage URL holds the password)."""
        lines = [
            f"# distilflow team stack in {self.paths.root} (python -m stack up); use it with: source {self.paths.env}",
            *(f"export {k}={shlex.quote(v)}" for k, v in self.client_env().items()),
        ]
        write_private(self.paths.env, "\n".join(lines) + "\n")

    # ---------- up

    def _components(self, only: list[str]) -> list[str]:
        """`--only` in start order, refused when unknown, empty, or already running here."""
        unknown = set(only) - set(COMPONENTS)
        if unknown:
            raise StackError(
                f"--only: unknown component(s) {', '.join(sorted(unknown))} (known: {', '.join(COMPONENTS)})"
            )
        only = [c for c in COMPONENTS if c in only]
        if not only:
            raise StackError("--only: name at least one component")
        busy = {name: rec for name, rec in self.running().items() if component_of(name) in only}
        if busy:
            listing = ", ".join(f"{n} (PID {r['pid']})" for n, r in busy.items())
            raise StackError(f"the stack in {self.paths.root} already runs {listing}: `python -m stack down` first")
        return only

    def _endpoints(self, join: Path | None) -> dict:
        """What still runs here, plus a joined stack's endpoints (and its database password)."""
        kept = {component_of(n) for n in self.pids}
        endpoints = {k: v for k, v in self.endpoints().items() if k in kept}
        if join is None:
            return endpoints
        other = Stack(join)
        if not other.endpoints():
            raise StackError(f"--join {join}: no stack was started there (no state.json)")
        secret = password(other.paths, create=False)
        if secret is not None:
            write_private(self.paths.pgpass, f"*:*:*:{pg.USER}:{secret}\n")
        return {**other.endpoints(), **endpoints}

    def _check_needs(self, only: list[str], endpoints: dict) -> None:
        """Each component's dependency is started with it or joined, and reachable, before anything starts."""
        needs_db = [c for c in ("mlflow", "prefect") if c in only]
        if needs_db and "postgres" not in only and "postgres" not in endpoints:
            raise StackError(f"{needs_db[0]} needs PostgreSQL: add postgres to --only, or --join a stack that runs it")
        if "dask-workers" in only and "dask-scheduler" not in only and "dask-scheduler" not in endpoints:
            raise StackError(
                "dask-workers need a scheduler: add dask-scheduler to --only, or --join a stack that runs it"
            )
        if "postgres" in only:
            pg.bindir()  # not installed: say so before anything starts
        elif needs_db:  # a joined database that is down or refuses us: say so now, not after the servers' retries
            db_host, db_port = endpoints["postgres"]
            pg.connect(db_host, db_port, password(self.paths, create=False) or "", timeout_s=5).close()

    def up(
        self,
        host: str,
        workers: int,
        only: list[str],
        ports: dict[str, int],
        join: Path | None = None,
        worker_threads: int = 1,
    ) -> None:
        """Start `only` (in order), each on `host`; on any failure stop what this call started, then raise."""
        host = _check_host(host)
        only = self._components(only)
        self.pids = self.running()  # forget what died since
        endpoints = self._endpoints(join)
        self._check_needs(only, endpoints)
        for name in only:
            if name in ports and name != "dask-workers":
                _check_port(host, ports[name], name)
        self.state = {"host": host, "ports": ports, "endpoints": endpoints, "joined": str(join) if join else None}
        try:
            for name in only:
                self._start(name, host, ports, workers, worker_threads)
        except BaseException:
            self._stop_names([n for n in self.pids if component_of(n) in only])
            self._save_pids()
            raise
        write_private(self.paths.state, _dumps(self.state))
        self.write_env()

    def _start(self, name: str, host: str, ports: dict[str, int], workers: int, threads: int) -> None:
        ep = self.state["endpoints"]
        if name == "postgres":
            secret = password(self.paths)
            cluster = pg.Cluster(self.paths.root)
            cluster.init(secret)
            cluster.start(host, ports["postgres"])
            self.pids["postgres"] = record(cluster.postmaster_pid() or 0, command="pg_ctl")
            self._save_pids()
            pg.create_databases(host, ports["postgres"], secret)
            ep["postgres"] = [host, ports["postgres"]]
            return
        db_host, db_port = ep.get("postgres", [None, None])
        db = f"{pg.USER}@{_url_host(db_host)}:{db_port}" if db_host else ""
        pgpass = {"PGPASSFILE": str(self.paths.pgpass)}
        if name == "mlflow":
            self.paths.artifacts.mkdir(parents=True, exist_ok=True)
            url = f"http://{_url_host(host)}:{ports['mlflow']}"
            argv = [str(BIN / "mlflow"), "server", "--host", host, "--port", str(ports["mlflow"]), "--workers", "2"]
            argv += ["--serve-artifacts", "--artifacts-destination", str(self.paths.artifacts)]
            env = server_env(
                {
                    **pgpass,
                    # the URL without its password: libpq reads that from PGPASSFILE
                    "MLFLOW_BACKEND_STORE_URI": f"postgresql://{db}/mlflow",
                    # MLflow's GenAI job runner (six huey consumers) is not used by the pipeline
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                }
            )
            self._run(name, argv, env, lambda: http_ok(f"{url}/health"))
            ep["mlflow"] = url
        elif name == "prefect":
            self.paths.prefect_home.mkdir(parents=True, exist_ok=True)
            url = f"http://{_url_host(host)}:{ports['prefect']}"
            argv = [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(ports["prefect"])]
            env = server_env(
                {
                    **pgpass,
                    "PREFECT_HOME": str(self.paths.prefect_home),
                    "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{db}/prefect",
                    "PREFECT_UI_API_URL": f"{url}/api",
                }
            )
            self._run(name, argv, env, lambda: http_ok(f"{url}/api/health"))
            ep["prefect"] = f"{url}/api"
        elif name == "dask-scheduler":
            address = f"tcp://{_url_host(host)}:{ports['dask-scheduler']}"
            argv = [str(BIN / "dask"), "scheduler", "--host", host, "--port", str(ports["dask-scheduler"])]
            # no dashboard (bokeh is not installed), but its HTTP routes (/health, /metrics) bind to `host` too
            argv += ["--no-dashboard", "--dashboard-address", f"{_url_host(host)}:0"]
            self._run(name, argv, server_env({}), lambda: _scheduler_answers(address, []))
            ep["dask-scheduler"] = address
        elif name == "dask-workers":
            address = ep["dask-scheduler"]
            env = server_env({**self.client_env(), "PGPASSFILE": str(self.paths.pgpass)})
            names = []
            for i in range(1, workers + 1):
                worker = f"{host}-w{i}"
                names.append(worker)
                local = self.paths.dask / f"worker-{i}"
                local.mkdir(parents=True, exist_ok=True)
                argv = [str(BIN / "dask"), "worker", address, "--host", host, "--nworkers", "1"]
                argv += ["--nthreads", str(threads), "--name", worker, "--local-directory", str(local)]
                argv += ["--no-dashboard", "--dashboard-address", f"{_url_host(host)}:0"]
                proc = spawn(f"dask worker {i}", argv, self.paths.log(f"dask-worker-{i}"), env)
                self.pids[f"dask-worker-{i}"] = record(proc.pid, command="dask worker")
                self._save_pids()
                self._procs[f"dask-worker-{i}"] = proc
            for i, _ in enumerate(names, 1):
                wait_until(
                    f"dask worker {i}",
                    lambda: _scheduler_answers(address, names),
                    self._procs[f"dask-worker-{i}"],
                    self.paths.log(f"dask-worker-{i}"),
                    START_TIMEOUT_S["dask-workers"],
                )

    def _run(self, name: str, argv: list[str], env: dict[str, str], ready) -> None:
        log = self.paths.log(name)
        log.unlink(missing_ok=True)
        proc = spawn(name, argv, log, env)
        self.pids[name] = record(proc.pid, command=" ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv)))
        self._save_pids()
        self._procs[name] = proc
        wait_until(name, ready, proc, log, START_TIMEOUT_S[name])

    # ---------- down

    def _stop_names(self, names: list[str]) -> list[str]:
        stopped = []
        order = ["sshd", *[n for n in self.pids if n.startswith("dask-worker-")], "dask-scheduler", "prefect", "mlflow"]
        for name in [n for n in order if n in names] + [n for n in names if n not in order and n != "postgres"]:
            rec = self.pids.get(name)
            if rec and stop(rec):
                stopped.append(f"{name} (PID {rec['pid']})")
            self.pids.pop(name, None)
        if "postgres" in names:
            if pg.Cluster(self.paths.root).stop():
                stopped.append(f"postgres (PID {self.pids['postgres']['pid']})")
            self.pids.pop("postgres", None)
        return stopped

    def down(self, purge: bool = False, only: list[str] | None = None) -> list[str]:
        """Stop every recorded process (PostgreSQL by `pg_ctl stop`), or those of `only`; what was stopped."""
        if only:
            unknown = set(only) - {*COMPONENTS, "dvc-remote"}
            if unknown:
                raise StackError(f"--only: unknown component(s) {', '.join(sorted(unknown))}")
            if purge:
                raise StackError("--purge deletes the whole stack folder: not with --only")
        names = [n for n in self.pids if not only or component_of(n) in only]
        if (not only or "postgres" in only) and "postgres" not in names and pg.Cluster(self.paths.root).initialised():
            self.pids["postgres"] = {"pid": pg.Cluster(self.paths.root).postmaster_pid()}
            names.append("postgres")  # a cluster that `up` started but could not record
        stopped = self._stop_names(names)
        if self.pids:
            self._save_pids()
        else:
            self.paths.pids.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.paths.root, ignore_errors=True)
        return stopped

    # ---------- status

    def status(self) -> list[tuple[str, str, bool]]:
        """(component, where / PID, healthy) for every recorded process."""
        rows, ep = [], self.endpoints()
        running = self.running()
        probes = {
            "mlflow": lambda: http_ok(f"{ep['mlflow']}/health"),
            "prefect": lambda: http_ok(f"{ep['prefect']}/health"),
            "dask-scheduler": lambda: _scheduler_answers(ep["dask-scheduler"], []),
            "postgres": lambda: bool(running.get("postgres")),
        }
        for name, rec in self.pids.items():
            ok = name in running
            if ok and name in probes:
                try:
                    ok = bool(probes[name]())
                except Exception:  # noqa: BLE001 - a probe that fails is an unhealthy service
                    ok = False
            where = ep.get("dask-scheduler" if name.startswith("dask-worker") else name)
            if name == "postgres" and where:
                where = f"postgresql://{pg.USER}:***@{_url_host(where[0])}:{where[1]}"
            rows.append((name, f"{where or ''} PID {rec.get('pid')}".strip(), ok))
        return rows

    def summary(self) -> str:
        """What runs and what a client sets, passwords redacted."""
        ep, out = self.endpoints(), [f"stack in {self.paths.root} (listening on {self.state.get('host')} only):"]
        if "postgres" in ep:
            host, port = ep["postgres"]
            out.append(
                f"  PostgreSQL      postgresql://{pg.USER}:***@{_url_host(host)}:{port} "
                f"(databases {', '.join(pg.DATABASES)}; password in {self.paths.pgpass}, 0600)"
            )
        if "mlflow" in ep:
            out.append(
                f"  MLflow server   {ep['mlflow']} (backend: PostgreSQL; artifacts proxied to {self.paths.artifacts})"
            )
        if "prefect" in ep:
            out.append(f"  Prefect server  {ep['prefect'].removesuffix('/api')} (API {ep['prefect']})")
        if "dask-scheduler" in ep:
            n = sum(1 for k in self.pids if k.startswith("dask-worker-"))
            workers = f" ({n} worker{'s' if n > 1 else ''} started here)" if n else ""
            out.append(f"  Dask scheduler  {ep['dask-scheduler']}{workers}")
        if "dvc-remote" in ep:
            out.append(f"  DVC remote      {ep['dvc-remote']['url']} (key {ep['dvc-remote']['keyfile']})")
        out.append(f"a client's environment ({self.paths.env}, 0600):")
        out += [f"  export {k}={redact(v)}" for k, v in self.client_env().items()]
        out.append(f"use it: source {self.paths.env}   stop it: python -m stack down --dir {self.paths.root}")
        return "\n".join(out)


def read_env(path: Path) -> dict[str, str]:
    """The `export K=V` lines of a stack's env file, as a dict (what a client sets)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def component_of(record_name: str) -> str:
    """`dask-worker-2` → `dask-workers`, `sshd` → `dvc-remote`; other records are named after their component."""
    if record_name.startswith("dask-worker-"):
        return "dask-workers"
    return "dvc-remote" if record_name == "sshd" else record_name


def _scheduler_answers(address: str, names: list[str]) -> bool:
    """The Dask scheduler at `address` answers, with every worker in `names` registered."""
    from distributed import Client

    with Client(address, timeout="5s", set_as_default=False) as client:
        registered = {w.get("name") for w in client.scheduler_info(n_workers=-1)["workers"].values()}
    return set(names) <= registered


def pick_ports(host: str, given: dict[str, int | None], auto: bool, previous: dict | None = None) -> dict[str, int]:
    """The ports to use: those given, else the ones this stack used last on the same host (a restarted
    component keeps its address, so clients' environments stay valid), else the defaults, else (with
    --auto-ports) free ones."""
    _check_port(_check_host(host), 0, "any")  # an address of this host, before any port is chosen on it
    last = (previous or {}).get("ports", {}) if (previous or {}).get("host") == host else {}
    return {
        name: given.get(name) or last.get(name) or (free_port(host) if auto else DEFAULT_PORTS[name])
        for name in DEFAULT_PORTS
        if name != "ssh"
    }


def _dumps(obj) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"
