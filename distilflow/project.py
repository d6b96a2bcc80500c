"""One run per project folder at a time, and all or nothing: the project transaction around a run's stages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from distilflow.io import restored_on_failure
from distilflow.layout import Layout
from distilflow.locks import file_lock
from distilflow.params import Params


@contextmanager
def project_transaction(params: Params, layout: Layout, stages: list) -> Iterator[None]:
    """The project's run lock (`run_lock`), and every output of `stages` put back as it was if the block fails."""
    outputs = [layout.path(name) for stage in stages for name in stage.outs.values()]
    with (
        file_lock(
            layout.run_lock,
            params.run_lock.timeout_s,
            f"project {layout.root}",
            "another run",
            "run_lock.on_busy / run_lock.timeout_s",
            wait=params.run_lock.on_busy == "wait",
        ),
        restored_on_failure(outputs + [layout.model_card], layout.state),
    ):
        yield
