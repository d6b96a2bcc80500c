"""The stack's own PostgreSQL cluster (Debian's `postgresql` package): its data folder, port and password.

`initdb` and `pg_ctl` refuse to run as root, so as root they run as the
`postgres` user (`runuser`), in a folder that user owns. Logins are by
password only (SCRAM); the password is generated once and kept in the stack
folder's `pgpass` (0600), which the servers read through `PGPASSFILE`, so it is
never on a command line or in a printed URL.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

from stack import StackError
from stack.procs import last_line

USER = "distilflow"
DATABASES = ("mlflow", "prefect", "search")
INSTALL_HINT = "PostgreSQL is not installed: `apt-get install postgresql` (Debian's package)"


def bindir() -> Path:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0),
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    if initdb and Path(initdb).resolve().is_file():
        return Path(initdb).resolve().parent
    raise StackError(INSTALL_HINT)


def _as_owner() -> list[str]:
    """How to run a PostgreSQL server tool: as `postgres` when we are root (they refuse root), else as ourselves."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(f"no `postgres` user on this machine: {INSTALL_HINT}") from None
    return ["runuser", "-u", "postgres", "--"]


def _owner_ids() -> tuple[int, int]:
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def _tool(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [*_as_owner(), str(bindir() / name), *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd="/")
    except FileNotFoundError:
        raise StackError(INSTALL_HINT) from None


class Cluster:
    """One PostgreSQL cluster under `<stack dir>/pg`."""

    def __init__(self, stack_dir: Path):
        self.home = stack_dir / "pg"
        self.data = self.home / "data"
        self.log = self.home / "postgres.log"

    def _own(self, path: Path, mode: int) -> None:
        uid, gid = _owner_ids()
        os.chown(path, uid, gid)
        os.chmod(path, mode)

    def _owner_writes(self, path: Path, text: str) -> None:
        path.write_text(text)
        self._own(path, 0o600)

    def initialised(self) -> bool:
        """Whether initdb already ran here."""
        return (self.data / "PG_VERSION").is_file()

    def init(self, password: str) -> None:
        """initdb with `USER` as the superuser, SCRAM password logins only; nothing if already done."""
        bindir()  # the install hint before anything else
        self.home.mkdir(parents=True, exist_ok=True)
        self._own(self.home, 0o700)
        if _as_owner():
            probe = subprocess.run([*_as_owner(), "test", "-w", str(self.home)], capture_output=True)
            if probe.returncode != 0:
                raise StackError(
                    f"the postgres user cannot reach {self.home}: a folder above it is not searchable by others "
                    "(chmod o+x it, or choose another --dir)"
                )
        if self.initialised():
            return
        pwfile = self.home / "initdb.pw"
        self._owner_writes(pwfile, password + "\n")
        try:
            done = _tool(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise StackError(f"initdb failed: {lines[-1] if lines else done.returncode}")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# python -m stack: address, port and logins are set per start in stack.conf\n")
            conf.write("include_if_exists = 'stack.conf'\n")

    def running(self) -> bool:
        """Whether this cluster's postmaster runs (`pg_ctl status`)."""
        return self.initialised() and _tool("pg_ctl", "status", "-D", str(self.data)).returncode == 0

    def postmaster_pid(self) -> int | None:
        """The running postmaster's PID, from postmaster.pid."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def start(self, host: str, port: int) -> None:
        """Start on `host:port` only (no Unix socket); logins from loopback, and from `host`'s own subnets."""
        loopback = host in ("127.0.0.1", "::1", "localhost")
        self._owner_writes(
            self.data / "stack.conf",
            f"listen_addresses = '{host}'\nport = {port}\nunix_socket_directories = ''\n"
            "max_connections = 200\npassword_encryption = 'scram-sha-256'\n",
        )
        hba = [
            "# written by python -m stack: password (SCRAM) logins only",
            "host all all 127.0.0.1/32 scram-sha-256",
            "host all all ::1/128 scram-sha-256",
        ]
        if not loopback:
            hba.append("host all all samenet scram-sha-256")
        self._owner_writes(self.data / "pg_hba.conf", "\n".join(hba) + "\n")
        done = _tool("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "90", timeout=120)
        if done.returncode != 0:
            raise StackError(f"PostgreSQL did not start: {last_line(self.log)} (log: {self.log})")

    def stop(self) -> bool:
        """`pg_ctl stop -m fast`; False if it was not running."""
        if not self.running():
            return False
        done = _tool("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")
        if done.returncode != 0:
            raise StackError(f"PostgreSQL did not stop: {(done.stderr or done.stdout).strip()[-300:]}")
        return True


def connect(host: str, port: int, password: str, dbname: str = "postgres", timeout_s: int = 5):
    """A psycopg2 connection as `USER`; a refused login is one StackError line (the password never in it)."""
    import psycopg2

    try:
        return psycopg2.connect(
            host=host, port=port, user=USER, password=password, dbname=dbname, connect_timeout=timeout_s
        )
    except psycopg2.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StackError(f"cannot log in to PostgreSQL at {host}:{port} as {USER}: {first}") from None


def create_databases(host: str, port: int, password: str) -> None:
    """The databases the servers use (`DATABASES`), created if missing."""
    conn = connect(host, port, password)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
