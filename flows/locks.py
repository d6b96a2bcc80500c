"""The registry lock: two runs that change one registered model's versions or aliases never overlap.

A pipeline's registration, a search's, a promotion and a rollback each hold
it, and no lock outlives a crashed holder:
- an embedded SQLite store: an flock on a file beside it, which the kernel
  releases when the holder exits, however it exits;
- a tracking server: a Prefect global concurrency limit named after the store
  (tasks/registry/locking.py), held under a 60 s lease that the holder renews;
  a holder killed outright stops renewing, and the Prefect server's
  repossessor frees its slot. That needs one Prefect server for every client.

Inside the lock, whatever a crashed holder left is cleaned first
(tasks/registry/recovery.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from distilflow.errors import DistilflowError
from distilflow.locks import file_lock
from distilflow.tracking import Tracker
from tasks.registry.locking import lock_file, lock_name
from tasks.registry.recovery import recover_crashed


@contextmanager
def registry_lock(tracker: Tracker, model: str, timeout_s: float) -> Iterator[None]:
    """Exclusive right to change `model`'s versions and aliases (see the module docstring)."""
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


def _create_limit(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another process created it first


@contextmanager
def _prefect_slot(name: str, model: str, timeout_s: float) -> Iterator[None]:
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    _create_limit(name)
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
