"""Registry flows: promote, rollback, batch scoring. Wiring, plus the lock that keeps them apart.

Two runs that change one registered model's versions or aliases (a pipeline's
registration, a promotion, a rollback) never overlap, and no lock outlives a
crashed holder (see `registry_lock`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import flow
from pydantic import SecretStr

from distilflow.errors import DistilflowError
from distilflow.layout import Layout
from distilflow.locks import file_lock
from distilflow.params import Params
from distilflow.tracking import Tracker
from tasks.registry import CHALLENGER, CHAMPION
from tasks.registry import promotion as registry
from tasks.registry.registration import require_model, version_by_alias
from tasks.registry.scoring import score_csv


def lock_name(model: str, tracking_uri: str) -> str:
    """`distilflow-registry-<model>-<store>`: named after the store it guards (two projects never block each other)."""
    from distilflow.hashing import text_hash
    from distilflow.redact import redact

    store = text_hash(redact(tracking_uri))[:10]
    return "distilflow-registry-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model) + f"-{store}"


def lock_file(tracking_uri: str, model: str) -> Path | None:
    """The file lock beside an embedded SQLite store; None for a tracking server."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    return db.with_name(db.name + f".{lock_name(model, tracking_uri)}.lock")


@contextmanager
def registry_lock(tracker: Tracker, model: str, timeout_s: float) -> Iterator[None]:
    """Exclusive right to change `model`'s versions and aliases; it never outlives its holder.

    - An embedded SQLite store: an flock on a file beside it, which the kernel
      releases when the holder exits, however it exits.
    - A tracking server: a Prefect global concurrency limit named after the
      store, held under a 30 s lease that the holder renews; a holder killed
      outright stops renewing, and the Prefect server's repossessor frees its
      slot. That needs one Prefect server for every client (PREFECT_API_URL).

    Inside the lock, whatever a crashed holder left is cleaned first
    (tasks/registry/recovery.py).
    """
    from tasks.registry.recovery import recover_crashed

    path = lock_file(tracker.uri, model)
    with ExitStack() as held:
        if path is not None:
            held.enter_context(
                file_lock(
                    path,
                    timeout_s,
                    f"registered model {model}",
                    "another registration or promotion",
                    "registry.lock_timeout_s",
                )
            )
        else:
            held.enter_context(_prefect_slot(lock_name(model, tracker.uri), model, timeout_s))
        for line in recover_crashed(tracker, model):
            print(line, flush=True)
        yield


@contextmanager
def _prefect_slot(name: str, model: str, timeout_s: float) -> Iterator[None]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another process created it first
    try:
        # the lease a dead holder's slot is repossessed after (Prefect's server accepts 60 s at the least)
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True, lease_duration=60):
            yield
    except ConcurrencySlotAcquisitionError as exc:
        raise DistilflowError(
            f"registered model {model}: the Prefect API refused the registry lock {name!r}: {str(exc)[-200:]}"
        ) from None
    except TimeoutError:
        raise DistilflowError(
            f"registered model {model} is busy: another registration or promotion held the "
            f"Prefect concurrency limit {name!r} for more than {timeout_s:.0f} s (registry.lock_timeout_s)"
        ) from None


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
    tracker = Tracker(tracking_uri, Path(root))
    uri = model_uri or f"models:/{params.registered_model()}@{CHAMPION}"
    if model_uri is None:
        require_model(tracker.client, params.registered_model())
    result = score_csv(tracker, uri, Layout(root).resolve(source), Layout(root).resolve(out))
    print(f"scored {result['rows']} rows with {uri} → {result['output']}")
    return result
