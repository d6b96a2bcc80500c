"""Prefect cache keys from content, not object identity.

A task's key is the hash of: its module's source (a code change reruns it),
the *content* of every input path it is given, and the params sections it is
given. Unchanged re-runs hit the cache; a changed file or param reruns exactly
the tasks that read it, and, through their changed outputs, everything
downstream. Nothing is pickled to compute a key.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from distilflow.errors import DistilflowError
from distilflow.hashing import params_hash, path_hash, text_hash
from distilflow.layout import Layout


@lru_cache(maxsize=None)
def _source_hash(source_file: str) -> str:
    return text_hash(Path(source_file).read_text())


def digest(value: Any) -> str:
    """A stable digest of one task argument."""
    if isinstance(value, Path):
        return f"path:{path_hash(value)}" if value.exists() else f"missing:{value}"
    if isinstance(value, Layout):
        return f"layout:{value.root}"
    if isinstance(value, BaseModel):
        return f"params:{params_hash(value.model_dump(mode='json'))}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(digest(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={digest(v)}" for k, v in sorted(value.items())) + "}"
    return repr(value)


def content_cache_key(context, parameters: dict[str, Any]) -> str:
    fn = context.task.fn
    parts = [f"{fn.__module__}.{fn.__qualname__}", _source_hash(inspect.getsourcefile(fn))]
    parts += [f"{name}={digest(value)}" for name, value in sorted(parameters.items())]
    return text_hash("\n".join(parts))


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry transient failures (I/O), never a `DistilflowError`: bad input stays bad."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, DistilflowError)
