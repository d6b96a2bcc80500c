"""Processes the stack starts: spawned in their own session, recorded by PID (+ start time), stopped by PID.

A PID alone can be reused by the kernel after a reboot or a crash, so each
record also keeps the process's start time (`/proc/PID/stat`); `stop` only
signals a process whose start time still matches. Every component runs in its
own session, so stopping its process group also ends the children it forked
(uvicorn workers, Dask nannies' workers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from distilflow.redact import redact
from stack import StackError


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(record: dict) -> bool:
    """Whether the process in `record` ({"pid", "start"}) is still the one that was started (and not a zombie)."""
    pid = record.get("pid")
    if not pid or start_time(pid) != record.get("start"):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def record(pid: int, **extra) -> dict:
    """What pids.json keeps of a process."""
    return {"pid": pid, "start": start_time(pid), **extra}


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start `argv` in a session of its own (it outlives this command), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            return subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise StackError(f"{name} could not be started ({argv[0]}): {exc.strerror}") from None


def stop(rec: dict, timeout_s: float = 20.0) -> bool:
    """SIGTERM the process group of `rec`, then SIGKILL after `timeout_s`; False if it was not running."""
    if not alive(rec):
        return False
    pid = rec["pid"]
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            raise StackError(f"not allowed to stop PID {pid}: run `down` as the user who ran `up`") from None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not alive(rec) and not _group_alive(pid):
                return True
            time.sleep(0.1)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # members that are only zombies no longer hold anything
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def last_line(log: Path) -> str:
    """The log's most telling recent line (the last error, else the last line), redacted, for a one-line error."""
    import re

    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    lines = [line for line in lines[-40:] if not line.startswith(("(Background on this error", "^", "~"))]
    telling = [line for line in lines if re.search(r"(Error|error|FATAL|failed|refused|denied|Exception)", line)]
    pick = (telling or lines or ["no output"])[-1]
    return redact(pick)[:300]


def port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (nothing listens there)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    """A port the kernel reports free on `host`."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(
    name: str, ready: Callable[[], bool], proc: subprocess.Popen | None, log: Path, timeout_s: float
) -> None:
    """Poll `ready()` until true; an exit or a timeout is one StackError line, with the log's last line."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not ready yet, whatever the probe raised
            pass
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{name} exited at start (code {proc.returncode}): {last_line(log)} (log: {log})")
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not become ready within {timeout_s:.0f} s: {last_line(log)} (log: {log})")
        time.sleep(0.3)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """GET `url` answers 200."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.status == 200


def read_json(path: Path, default):
    """A JSON file's content, or `default` if it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (0600), never briefly readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
