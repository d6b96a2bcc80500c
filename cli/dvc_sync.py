"""After a complete run, DVC's lock file records what the run produced, so `dvc repro` has nothing to do.

The pipeline and `dvc repro` run the same stage functions on the same
declarations (distilflow/stages.py), but DVC only trusts its own lock file.
`dvc commit --force` writes the deps, params and outs of every stage as the
run left them. Skipped (and said why) outside a DVC repository, after a run
with `--set` overrides (params.yaml does not hold them) or `--stop-after`, and
when dvc.yaml is not the one the stage declarations give for params.yaml.
"""

from __future__ import annotations

from pathlib import Path

from distilflow.dvcfile import dvc_yaml


def record_run_in_dvc(params, root: Path, overrides: list[str], stop_after: str | None) -> str:
    """Commit the run's outputs to dvc.lock; returns one line saying what happened."""
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return "dvc.lock: not a DVC project here, nothing to record"
    if overrides or stop_after:
        return "dvc.lock: not updated (this run used --set/--stop-after; params.yaml and dvc.yaml describe another)"
    if (root / "dvc.yaml").read_text() != dvc_yaml(params):
        return "dvc.lock: not updated, dvc.yaml is stale for params.yaml: run `python -m distilflow dvc-yaml`"
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            repo.commit(force=True)
    except DvcException as exc:  # the run itself succeeded: say what DVC refused, keep the exit code 0
        return f"dvc.lock: not updated ({str(exc).splitlines()[0]})"
    return "dvc.lock: updated with this run's outputs (`dvc repro` has nothing to do)"
