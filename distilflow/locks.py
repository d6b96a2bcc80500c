"""Locks that never outlive their holder.

`file_lock` is an exclusive `flock` on a file: the kernel releases it when the
holding process exits, however it exits (kill -9 included), so a crash never
leaves a project or a registry blocked. It covers every process on this
machine, which is the reach of an embedded store and of a project folder.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distilflow.errors import DistilflowError


@contextmanager
def file_lock(path: Path, timeout_s: float, what: str, busy: str, setting: str, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block; wait up to `timeout_s` (or fail at once if not `wait`).

    `what` names the thing locked, `busy` what holds it, `setting` the param
    that sets the wait, for the one-line message a user gets.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(path)
                if not wait:
                    raise DistilflowError(f"{what} is busy: {busy}{holder} ({setting})") from None
                if not waiting:
                    print(f"waiting for {what}: {busy}{holder}", flush=True)
                    waiting = True
                if time.monotonic() > deadline:
                    raise DistilflowError(
                        f"{what} is busy: {busy}{holder} still holds it after {timeout_s:.0f} s ({setting})"
                    ) from None
                time.sleep(0.2)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
