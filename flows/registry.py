"""Registry flows: promote, rollback, batch scoring; each change of a model under its registry lock (flows/locks.py)."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow
from pydantic import SecretStr

from distilflow.layout import Layout
from distilflow.params import Params
from distilflow.tracking import Tracker
from flows.locks import registry_lock
from tasks.registry import CHALLENGER
from tasks.registry import promotion as registry
from tasks.registry.registration import require_model, version_by_alias
from tasks.registry.scoring import score_registered


@flow(name="distilflow-promote", log_prints=True)
def promote(
    params: Params, root: str, tracking_uri: str | SecretStr, actor: str | None = None, version: str | None = None
) -> dict:
    """Gate `challenger` against `champion` on the frozen test split; move the aliases on a pass.

    Two tasks, so the Prefect UI shows each step: decide (re-score, gates)
    and apply (audit intent, tags, aliases, done); the gate table is published
    as a markdown artifact. Taking the lock first finishes whatever a crashed
    registration or promotion left (tasks/registry/recovery.py).
    """
    from prefect import task
    from prefect.artifacts import create_markdown_artifact
    from prefect.cache_policies import NO_CACHE

    tracker = Tracker(tracking_uri, Path(root))
    model = params.registered_model()
    require_model(tracker.client, model)
    seen = version or (getattr(version_by_alias(tracker.client, model, CHALLENGER), "version", None))
    steps = dict(cache_policy=NO_CACHE)
    with registry_lock(tracker, model, params.registry.lock_timeout_s):
        decision = task(name="decide", task_run_name="decide", **steps)(registry.decide)(
            tracker, model, params.registry.gates, Layout(root).split("test"), actor, str(seen) if seen else None
        )
        create_markdown_artifact(
            decision.markdown(),
            key=_artifact_key(model),
            description=f"{model} v{decision.version}: {decision.decision}",
        )
        result = task(name="apply", task_run_name="apply", **steps)(registry.apply)(tracker, decision)
    for gate in result["gates"]:
        print(f"gate {gate['name']}: {'pass' if gate['passed'] else 'FAIL'} ({gate['reason']})")
    print(f"{model} v{result['version']}: {result['decision']}; champion is v{result['champion']}")
    return result


def _artifact_key(model: str) -> str:
    """Prefect artifact keys are lowercase letters, digits and dashes."""
    return "promotion-" + re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")


@flow(name="distilflow-rollback", log_prints=True)
def rollback(params: Params, root: str, tracking_uri: str | SecretStr, reason: str, actor: str | None = None) -> dict:
    """Restore `previous-champion` as `champion`."""
    tracker = Tracker(tracking_uri, Path(root))
    model = params.registered_model()
    require_model(tracker.client, model)
    with registry_lock(tracker, model, params.registry.lock_timeout_s):
        result = registry.rollback(tracker, model, actor, reason)
    print(f"{model}: champion is v{result['champion']} again (v{result['demoted']} demoted: {reason})")
    return result


@flow(name="distilflow-score", log_prints=True)
def score(
    params: Params, root: str, tracking_uri: str | SecretStr, source: str, out: str, model_uri: str | None = None
) -> dict:
    """Batch scoring: a CSV of raw rows through the champion (or `model_uri`), predictions to `out`."""
    result = score_registered(Tracker(tracking_uri, Path(root)), params, Layout(root), source, out, model_uri)
    print(f"scored {result['rows']} rows with {result['model_uri']} → {result['output']}")
    return result
