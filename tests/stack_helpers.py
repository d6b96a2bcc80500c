"""What tests/test_stack.py and tests/test_multihost.py share: the stack's CLI, a client's environment, projects."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stack.components import CLIENT_VARS, read_env  # noqa: F401 - read_env is the tests' too
from tests.conftest import QUICK, REPO, edit_params

BIN = Path(sys.executable).parent


def stack_dir(prefix: str = "distilflow-stack-") -> Path:
    """A stack folder the postgres user can walk into (pytest's tmp_path is 0700 to root)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o711)
    return root / "stack"


def netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any client setting, this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def stack(*args: str, netns: str | None = None, timeout: float = 300, check: bool = True):
    """`python -m stack ARGS` (in a network namespace if given)."""
    proc = subprocess.run(
        [*netns_prefix(netns), sys.executable, "-m", "stack", *args],
        cwd=REPO,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (
            f"python -m stack {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def password(stack_root: Path) -> str:
    return (stack_root / "pgpass").read_text().strip().rsplit(":", 1)[1]


def make_project(path: Path, digits_csv: Path, **overrides) -> Path:
    """A project folder: the repo's params.yaml with QUICK (plus `overrides`) and the demo data."""
    (path / "data/raw").mkdir(parents=True)
    shutil.copy(digits_csv, path / "data/raw/digits.csv")
    shutil.copy(REPO / "params.yaml", path / "params.yaml")
    for section, values in {**QUICK, **overrides}.items():
        edit_params(path, **{section: values})
    return path


def distilflow_cmd(project: Path, *args: str, netns: str | None = None) -> list[str]:
    return [*netns_prefix(netns), sys.executable, "-m", "distilflow", *args, "--params", str(project / "params.yaml")]


def distilflow(
    project: Path, env: dict[str, str], *args: str, netns: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m distilflow ARGS --params PROJECT/params.yaml` with exactly the client variables in `env`."""
    return subprocess.run(
        distilflow_cmd(project, *args, netns=netns),
        cwd=REPO,
        env=base_env(PREFECT_HOME=str(project / ".prefect"), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("distilflow: error:")]


def assert_one_clean_error(proc: subprocess.CompletedProcess, *secrets: str) -> str:
    """Exit 1, exactly one `distilflow: error:` line, no traceback, no secret anywhere in the output."""
    out = proc.stdout + proc.stderr
    errors = error_lines(proc.stderr)
    assert proc.returncode == 1, f"exit {proc.returncode}\n{out[-3000:]}"
    assert len(errors) == 1, f"expected one error line, got {len(errors)}\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    for secret in secrets:
        assert secret not in out
    return errors[0]


def _listening_in(pid: int) -> dict[int, tuple[str, int]]:
    """inode → (address, port) of the listening TCP sockets in `pid`'s own network namespace."""
    import ipaddress

    out = {}
    for table, width in (("tcp", 4), ("tcp6", 16)):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = str(ipaddress.ip_address(raw if width == 16 else raw[:4]))
            out[int(fields[9])] = (address, int(hex_port, 16))
    return out


def listening_sockets(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket of these processes and their descendants.

    Read from each process's own /proc/PID/net/tcp, so processes in other network namespaces count too.
    """
    import psutil

    found, seen = [], set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            listening = _listening_in(proc.pid)
            try:
                links = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
            except OSError:
                continue
            for link in links:
                if link.startswith("socket:["):
                    inode = int(link[8:-1])
                    if inode in listening:
                        found.append((*listening[inode], proc.pid))
    return found


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
