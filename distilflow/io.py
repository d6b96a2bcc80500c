"""Atomic file writes, so a failed stage never leaves half-written outputs."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; move it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj: Any, path: str | Path) -> Path:
    """JSON to `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    """Text to `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; it replaces `path` only on success.

    The old and new folders are swapped in one step (RENAME_EXCHANGE), so
    `path` is never missing, even for a process killed mid-way; where the
    system cannot swap, two renames leave it missing for an instant.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.is_dir() and _exchange(tmp, path):
            return  # `tmp` now holds the old folder: removed below
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def restored_on_failure(paths: list[Path], scratch: Path) -> Iterator[None]:
    """Leave every path in `paths` as it was if the block fails: a run's outputs change all together or not at all.

    The current files are hard-linked into `scratch` first (cheap, and safe
    because every writer here replaces a file by renaming a new one into
    place, never rewriting it), and moved back on any exception.
    """
    import shutil

    scratch.mkdir(parents=True, exist_ok=True)
    saved = Path(tempfile.mkdtemp(prefix="restore-", dir=scratch))
    kept: dict[Path, Path] = {}
    try:
        for i, path in enumerate(paths):
            if path.is_file():
                os.link(path, saved / str(i))
                kept[path] = saved / str(i)
            elif path.is_dir():
                shutil.copytree(path, saved / str(i), copy_function=os.link)
                kept[path] = saved / str(i)
        try:
            yield
        except BaseException:
            for path in paths:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
                if path in kept:
                    os.replace(kept[path], path)
            raise
    finally:
        shutil.rmtree(saved, ignore_errors=True)


def read_json(path: str | Path) -> Any:
    """The JSON value in `path`."""
    return json.loads(Path(path).read_text())


def _release_arrow_memory() -> None:
    """Hand Arrow's freed buffers back to the OS: its allocator keeps them, and a 1M-row table's worth
    then stays resident through every later stage (bench/data_scale.py measures the peak)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """A DataFrame to parquet at `path`, atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    _release_arrow_memory()
    return Path(path)


def read_table(path: str | Path) -> pd.DataFrame:
    """A parquet table, read so its peak memory stays near one copy."""
    # self_destruct + split_blocks: each Arrow column is freed as it becomes a pandas column, instead of
    # the whole Arrow table living on beside one consolidated copy (twice the table at the peak)
    df = pd.read_parquet(path, to_pandas_kwargs={"self_destruct": True, "split_blocks": True})
    _release_arrow_memory()
    return df
