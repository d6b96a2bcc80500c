"""A networked DVC remote: a folder served over SSH by an sshd of the stack's own (Debian's openssh-server).

The sshd has its own config, host key and one authorized key, all under
`<stack dir>/ssh/`; it binds to one address, accepts that key only (no
passwords), and offers SFTP only (`ForceCommand internal-sftp`: no shell, no
forwarding). DVC reaches it with the dvc-ssh plugin. `dvc-push` / `dvc-pull`
configure the remote in a project's `.dvc/config.local` and turn a refused
transfer into one line.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from stack import StackError
from stack.components import BIN, Stack, _check_host, _check_port, _url_host
from stack.procs import alive, record, spawn, wait_until, write_private

SSHD = "/usr/sbin/sshd"
INSTALL_HINT = "OpenSSH's server is not installed: `apt-get install openssh-server`"


def _sshd() -> str:
    found = SSHD if Path(SSHD).is_file() else shutil.which("sshd")
    if not found:
        raise StackError(INSTALL_HINT)
    return found


def _keygen(path: Path, comment: str) -> None:
    if path.is_file():
        return
    done = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise StackError(f"ssh-keygen failed: {(done.stderr or done.stdout).strip()[-200:]}")


def _banner(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=2) as s:
        return s.recv(64).startswith(b"SSH-")


def _sshd_config(ssh: Path, host: str, port: int, read_only: bool) -> str:
    """Key logins only, SFTP only (read-only on request), on one address."""
    lines = [
        "# python -m stack dvc-remote: key logins only, SFTP only, one address",
        f"ListenAddress {_url_host(host)}:{port}",
        f"HostKey {ssh / 'host_ed25519'}",
        f"AuthorizedKeysFile {ssh / 'authorized_keys'}",
        "PidFile none",
        f"AllowUsers {getpass.getuser()}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        # the stack folder may sit in a world-writable /tmp; the key files themselves are 0600
        "StrictModes no",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "AllowStreamLocalForwarding no",
        "X11Forwarding no",
        "PermitTunnel no",
        "PermitUserRC no",
        "Subsystem sftp internal-sftp",
        "ForceCommand internal-sftp" + (" -R" if read_only else ""),
        "LogLevel INFO",
    ]
    return "\n".join(lines) + "\n"


def _keys(ssh: Path) -> None:
    """The server's host key and the one client key it accepts (`restrict`: no forwarding, no pty)."""
    ssh.mkdir(parents=True, exist_ok=True)
    os.chmod(ssh, 0o700)
    _keygen(ssh / "host_ed25519", "distilflow-stack-host")
    _keygen(ssh / "id_ed25519", "distilflow-stack-client")
    write_private(ssh / "authorized_keys", "restrict " + (ssh / "id_ed25519.pub").read_text())


def _start_sshd(stack: Stack, sshd: str, config: Path, host: str, port: int) -> int:
    """Check the config, start sshd on it and wait for its banner; its PID (stopped again if it never answers)."""
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        Path("/run/sshd").mkdir(mode=0o755, parents=True)  # sshd's privilege separation folder
    check = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise StackError(f"sshd refused its config: {(check.stderr or check.stdout).strip().splitlines()[-1]}")
    log = stack.paths.log("sshd")
    log.unlink(missing_ok=True)
    proc = spawn("sshd", [sshd, "-D", "-e", "-f", str(config)], log, os.environ.copy())
    stack.pids["sshd"] = record(proc.pid, command="sshd -D -e -f " + str(config))
    write_private(stack.paths.pids, _dumps(stack.pids))
    try:
        wait_until("sshd", lambda: _banner(host, port), proc, log, 30)
    except BaseException:
        stack._stop_names(["sshd"])
        write_private(stack.paths.pids, _dumps(stack.pids))
        raise
    return proc.pid


def serve(stack: Stack, host: str, port: int, folder: Path | None, read_only: bool = False) -> str:
    """Start the sshd serving `folder` (default DIR/dvc-remote); the `dvc remote` commands that use it.

    `read_only`: SFTP refuses every write (a mirror to pull from; `dvc push` is refused).
    """
    host = _check_host(host)
    sshd = _sshd()
    rec = stack.pids.get("sshd")
    if rec and alive(rec):
        raise StackError(f"the stack in {stack.paths.root} already serves a DVC remote (sshd PID {rec['pid']})")
    _check_port(host, port, "ssh")
    ssh = stack.paths.root / "ssh"
    _keys(ssh)
    folder = (folder or stack.paths.root / "dvc-remote").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    config = ssh / "sshd_config"
    write_private(config, _sshd_config(ssh, host, port, read_only))
    pid = _start_sshd(stack, sshd, config, host, port)
    url = f"ssh://{getpass.getuser()}@{_url_host(host)}:{port}{folder}"
    stack.state.setdefault("endpoints", {})["dvc-remote"] = {"url": url, "keyfile": str(ssh / "id_ed25519")}
    stack.state.setdefault("host", host)
    write_private(stack.paths.state, _dumps(stack.state))
    commands = remote_commands("stack", url, str(ssh / "id_ed25519"))
    write_private(stack.paths.root / "dvc-remote.sh", "\n".join(commands) + "\n")
    return "\n".join(
        [
            f"DVC remote over SSH: {url} (sshd PID {pid}; this key only, SFTP only"
            + (", read-only)" if read_only else ")"),
            "in a DVC project (also in " + str(stack.paths.root / "dvc-remote.sh") + "):",
            *(f"  {c}" for c in commands),
            f"then `dvc push -r stack`, or `python -m stack dvc-push --dir {stack.paths.root}` (one line if refused)",
        ]
    )


def remote_commands(name: str, url: str, keyfile: str) -> list[str]:
    """The two `dvc remote` commands that point a project at the remote (in .dvc/config.local)."""
    return [
        f"dvc remote add --local --force {name} {url}",
        f"dvc remote modify --local {name} keyfile {keyfile}",
    ]


def _dvc(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    try:
        return subprocess.run(
            [str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise StackError(f"dvc {args[0]} did not finish within {timeout:.0f} s") from None


def _reason(output: str, keyfile: str, op: str) -> str:
    """DVC's own last ERROR line, without its boilerplate, with what it means for this remote."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = (errors[-1] if errors else (lines[-1] if lines else "no output")).removeprefix("ERROR:").strip()
    reason = re.sub(r"^unexpected error - ", "", reason)
    head, sep, tail = reason.partition(": ")
    if sep and head == tail:  # asyncssh repeats itself: "Permission denied for user x on host y: <the same>"
        reason = head
    if re.search(r"Permission denied for user", reason):
        reason += f" (the SSH server did not accept the key {keyfile})"
    elif reason == "Permission denied":
        reason += " (the remote folder refuses writes)" if op == "push" else " (the remote folder is not readable)"
    return reason[:300]


def transfer(stack: Stack, project: Path, name: str, op: str, keyfile: Path | None = None) -> str:
    """`dvc push`/`dvc pull` with the stack's SSH remote; a refused transfer is one StackError line."""
    remote = stack.endpoints().get("dvc-remote")
    if not remote:
        raise StackError(f"the stack in {stack.paths.root} serves no DVC remote: `python -m stack dvc-remote` first")
    project = project.resolve()
    if not (project / ".dvc").is_dir():
        raise StackError(f"{project} is not a DVC project (no .dvc/): `dvc init` there first")
    key = str(keyfile.resolve()) if keyfile else remote["keyfile"]
    local = project / ".dvc" / "config.local"
    before = local.read_bytes() if local.is_file() else None
    try:
        for command in remote_commands(name, remote["url"], key):
            done = _dvc(project, *command.split()[1:])
            if done.returncode != 0:
                raise StackError(f"`{command}` failed in {project}: {_reason(done.stderr + done.stdout, key, op)}")
        done = _dvc(project, op, "-r", name)
        if done.returncode != 0:
            verb = "upload to" if op == "push" else "download from"
            reason = _reason(done.stderr + done.stdout, key, op)
            raise StackError(f"dvc {op} refused: could not {verb} {remote['url']}: {reason}")
    except BaseException:  # a refused transfer changes nothing, the project's remote config included
        if before is None:
            local.unlink(missing_ok=True)
        else:
            local.write_bytes(before)
        raise
    summary = [
        line for line in done.stdout.splitlines() if re.match(r"^\s*(\d+ files?|Everything is up to date)", line)
    ]
    return f"dvc {op} -r {name} ({remote['url']}): {summary[-1].strip() if summary else 'done'}"


def _dumps(obj) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"
