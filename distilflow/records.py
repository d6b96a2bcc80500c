"""The small typed record every stage task returns to the flow.

Tasks exchange paths and numbers, never tables or models: `outputs` maps each
written file to its content hash, so the flow can tell a cached result whose
files were since overwritten or deleted (see flows/pipeline.py:run_stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distilflow.hashing import path_hash


@dataclass
class StageResult:
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @classmethod
    def of(cls, outputs: list[Path], **kw) -> "StageResult":
        return cls(outputs={str(p): path_hash(p) for p in outputs}, **kw)

    def outputs_intact(self) -> bool:
        return all(Path(p).exists() and path_hash(p) == h for p, h in self.outputs.items())
