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


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; it replaces `path` only on success."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
