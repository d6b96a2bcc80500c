"""The temporary local Prefect API for one command, started so that Ctrl-C and kill -9 leave nothing behind.

Prefect's own temporary server runs in the command's process group, so a
terminal's Ctrl-C kills it first and the client then retries against a dead
server for minutes. This one is the same server (uvicorn + Prefect's API app,
no UI), started in its own session (Ctrl-C reaches only the command, which then
records its runs as crashed through a live API and stops the server) and with
PR_SET_PDEATHSIG (if the command is killed outright, the kernel ends the
server too). With PREFECT_API_URL set, the command uses that server instead.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from distilflow.errors import DistilflowError
from distilflow.settings import ENV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _flush_logs() -> None:
    """Send the run's buffered logs and events to the API before it stops.

    Otherwise Prefect's workers drain at exit, against a stopped server, and
    retry with backoff for a minute before saying they could not.
    """
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):
            worker.drain_all(timeout=5)
    except Exception:  # noqa: BLE001 - logs are best effort; the command's outcome does not depend on them
        pass


START_ATTEMPTS = 3


def _spawn(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_healthy(server: subprocess.Popen, url: str, timeout_s: float) -> str | None:
    """None once the server answers /health; the reason if it exited first. Too slow: one clear error."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            lines = server.stderr.read().decode(errors="replace").strip().splitlines() if server.stderr else []
            cause = [line for line in lines if "locked" in line or "Error:" in line]
            return (cause or lines or ["no output"])[-1].strip()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise DistilflowError(
                f"the temporary Prefect API did not start within {timeout_s:.0f} s; "
                "start one with `make prefect-server` and set PREFECT_API_URL"
            )
        time.sleep(0.1)


def _wait_for_api(url: str, attempts: int = 3, backoff_s: float = 1.0) -> None:
    """The configured Prefect API answers /health, or one line after bounded retries (Prefect's client would
    print a traceback)."""
    import time

    import httpx

    from distilflow.errors import DistilflowError
    from distilflow.redact import redact

    error = ""
    for attempt in range(attempts):
        try:
            response = httpx.get(f"{url.rstrip('/')}/health", timeout=5)
            if response.status_code == 200:
                return
            error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = str(exc) or type(exc).__name__
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    raise DistilflowError(
        f"Prefect API {redact(url)} is unreachable after {attempts} attempts ({error}): start the server "
        "(make prefect-server), or unset PREFECT_API_URL to run on a temporary one"
    )


@contextlib.contextmanager
def _exported(var: str, value: str) -> Iterator[None]:
    """`var=value` in this process's environment for the block (what child processes inherit), then as before."""
    previous = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = previous


@contextlib.contextmanager
def temporary_api(timeout_s: float = 120.0) -> Iterator[str | None]:
    """Yield the API URL in use: the configured server's, or a temporary one's started for this block."""
    import prefect
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        url = str(get_current_settings().api.url)
        _wait_for_api(url)
        yield url
        return
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(prefect.__module_path__.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    url = f"http://127.0.0.1:{port}/api"
    server = None
    try:
        for attempt in range(START_ATTEMPTS):
            server = _spawn(command, env)
            error = _wait_healthy(server, url, timeout_s)
            if error is None:
                break
            # concurrent runs sharing one Prefect home migrate its SQLite database at the same moment, and
            # all but one may fail with "database is locked" (bench stack family): start again, a little later
            if attempt + 1 == START_ATTEMPTS:
                raise DistilflowError(f"the temporary Prefect API exited at start (code {server.returncode}): {error}")
            time.sleep(1 + random.random() * 2)
        # every thread and child process must see this API, or each starts a temporary server of its own:
        # the environment for a search's trial processes (and the Dask workers it starts); the process-global
        # settings for threads that copy no context (the process pool's log forwarder)
        from prefect.context import SettingsContext, _temporary_global_settings_context

        with (
            _exported(ENV["prefect_api_url"], url),
            temporary_settings(updates={PREFECT_API_URL: url}),
            _temporary_global_settings_context(SettingsContext.get()),
        ):
            yield url
    finally:
        _flush_logs()
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=3)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
