"""`distilflow run` with nothing changed since the last complete run: answered before Prefect, MLflow or torch load.

Prefect's task cache already skips every stage of an unchanged re-run, but
importing the stack, starting the flow engine with its temporary API and
opening the MLflow store still cost about 13 s on 2 cores (bench/results).
So, like `make` and `dvc repro`, `run` first compares a fingerprint of what a
run reads and writes with the one the last complete run left in
`.distilflow/last-run.json`:

- the effective params (after `--set`) and `--stop-after`;
- the tracking URI and the Prefect API URL;
- the project's own source files (distilflow/, tasks/, flows/, cli/);
- the data source, every output the run's stages declare
  (distilflow/stages.py, the same declaration dvc.yaml comes from), the model
  card, and the embedded MLflow store, whose file any registration, promotion
  or rollback rewrites.

Files count by size and modification time, so touching one counts as a
change; the full run that follows still answers from Prefect's cache. Only
the embedded SQLite store qualifies: a tracking server can change behind our
back. `run --force` always runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from distilflow.hashing import file_md5, params_hash
from distilflow.inputs import manifest_images, runtime_versions
from distilflow.io import write_json
from distilflow.layout import Layout
from distilflow.stages import stages_for
from distilflow.uris import sqlite_path

SOURCE = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("distilflow", "tasks", "flows", "cli")  # with their subpackages (tasks/registry, tasks/search)


def _stats(path: Path, content: bool = False) -> list:
    """[path, size, mtime_ns] (or [path, md5] with `content`) of a file, or of every file below a folder;
    a missing path is one entry too."""
    if path.is_file():
        if content:
            return [[str(path), file_md5(path)]]
        st = path.stat()
        return [[str(path), st.st_size, st.st_mtime_ns]]
    if not path.is_dir():
        return [[str(path), None, None]]
    return [entry for p in sorted(path.rglob("*")) if p.is_file() for entry in _stats(p, content)]


def fingerprint(
    params, root: Path, tracking_uri: str, stop_after: str | None, prefect_api_url: str | None, content: bool = False
) -> str | None:
    """What the last complete run must have seen for this one to be a no-op; None where that cannot be known.

    Files count by size and modification time, or with `content` (`run --check`) by their bytes' hash.
    `prefect_api_url` is the configured server's (Settings), None for a temporary API.
    """
    store = sqlite_path(tracking_uri)
    if store is None:
        return None
    layout = Layout(root)
    outputs = [layout.path(name) for stage in stages_for(params, stop_after) for name in stage.outs.values()]
    if stop_after is None and params.registry.enabled:
        outputs.append(layout.path("model_card"))
    source = layout.resolve(params.data.source)
    files = [source, *manifest_images(source, params.data.path_column), store, layout.mlartifacts]
    state = {
        "params": params.model_dump(mode="json"),
        "stop_after": stop_after,
        "tracking_uri": tracking_uri,
        "prefect_api_url": prefect_api_url or "",
        "source": [e for pkg in SOURCE_PACKAGES for p in sorted((SOURCE / pkg).rglob("*.py")) for e in _stats(p)],
        "files": [e for p in files + outputs for e in _stats(p, content)],
        "versions": runtime_versions(),
    }
    return params_hash(state)


def last_run(root: Path, current: str | None, key: str = "fingerprint") -> dict | None:
    """The last complete run's record when its fingerprint (or `key`: "content") is `current`, else None."""
    path = Layout(root).last_run
    if current is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get(key) == current else None


def record_run(root: Path, current: str | None, run_id: str, content: str | None = None) -> None:
    """Remember a complete run (after it finished writing, so its own outputs are in the fingerprint)."""
    path = Layout(root).last_run
    if current is None:
        path.unlink(missing_ok=True)
        return
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json({"fingerprint": current, "content": content, "run_id": run_id, "at": at}, path)
