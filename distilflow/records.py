"""The small typed record every stage task returns to the flow.

Stages exchange paths and numbers, never tables or models: `outputs` maps each
written file to its content hash, so the flow can tell a cached result whose
files were since overwritten or deleted (see flows/stages.py:run_task).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distilflow.hashing import path_hash


@dataclass
class StageResult:
    """What a stage reports: its outputs' hashes, metrics, params, tags, files, history, timing."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    started_ms: int | None = None  # when the stage function ran (MLflow's child run shows the real duration)
    ended_ms: int | None = None

    def outputs_intact(self) -> bool:
        """Every output file still has the content this result recorded (a cache hit can be trusted)."""
        return all(Path(p).exists() and path_hash(p) == h for p, h in self.outputs.items())
