"""Prefect cache keys from content, not object identity.

A stage's key is the hash of: the source of its module and of every project
module that module imports, transitively (a code change reruns it), the
*content* of every input path it reads, and the params values it reads (as
declared in distilflow/stages.py). Unchanged re-runs hit the cache; a changed file or param reruns exactly
the tasks that read it, and, through their changed outputs, everything
downstream. Nothing is pickled to compute a key.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from distilflow.errors import DistilflowError
from distilflow.hashing import params_hash, path_hash, text_hash
from distilflow.inputs import manifest_images, runtime_versions

_PROJECT_PACKAGES = ("distilflow", "tasks", "flows")
_ROOT = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    for candidate in (_ROOT / f"{name.replace('.', '/')}.py", _ROOT / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(source_file: Path) -> set[Path]:
    """The project's own modules that `source_file` imports, directly or not (by static analysis)."""
    seen: set[Path] = set()
    stack = [Path(source_file).resolve()]
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in _PROJECT_PACKAGES and (found := _module_file(name)) is not None:
                    stack.append(found.resolve())
    return seen


@cache
def _source_hash(source_file: str) -> str:
    files = sorted(project_imports(Path(source_file)))
    return text_hash("".join(f"{f.relative_to(_ROOT)}\n{f.read_text()}" for f in files))


def digest(value: Any) -> str:
    """A stable digest of one task argument."""
    if isinstance(value, Path):
        return f"path:{path_hash(value)}" if value.exists() else f"missing:{value}"
    if isinstance(value, BaseModel):
        return f"params:{params_hash(value.model_dump(mode='json'))}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(digest(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={digest(v)}" for k, v in sorted(value.items())) + "}"
    return repr(value)


def stage_cache_key(stage, context, parameters: dict[str, Any]) -> str:
    """A declared stage's key: its code, the content of what it reads, the params it reads, where it writes.

    Outputs count by path only (so two projects never share an entry), never
    by content: a stage's own outputs must not change its key.
    """
    parts = [stage.name, _source_hash(str(_ROOT / stage.module)), repr(sorted(runtime_versions().items()))]
    if stage.name == "ingest":  # a manifest's images are data too, not only the CSV that names them
        source, data = parameters["source"], parameters["data"]
        parts += [f"image:{digest(p)}" for p in manifest_images(source, data.path_column)]
    for name, value in sorted(parameters.items()):
        if name in stage.deps or name in stage.params:
            parts.append(f"{name}={digest(value)}")
        else:
            parts.append(f"{name}@{value}")
    return text_hash("\n".join(parts))


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry transient failures (I/O), never a `DistilflowError`: bad input stays bad."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, DistilflowError)
