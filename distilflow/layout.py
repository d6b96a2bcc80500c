"""Where each stage reads and writes: the one place that knows the file layout.

`dvc.yaml` repeats these paths (DVC needs them literally); a test checks that
the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    def __init__(self, root: str | Path = "."):
        object.__setattr__(self, "root", Path(root).resolve())

    @property
    def ingested(self) -> Path:
        return self.root / "data/interim/ingested.parquet"

    @property
    def cleaned(self) -> Path:
        return self.root / "data/interim/clean.parquet"

    @property
    def split_dir(self) -> Path:
        return self.root / "data/split"

    def split(self, name: str) -> Path:
        return self.split_dir / f"{name}.parquet"

    @property
    def preprocessor(self) -> Path:
        return self.root / "artifacts/preprocessor.json"

    @property
    def teacher(self) -> Path:
        return self.root / "artifacts/teacher"

    @property
    def student(self) -> Path:
        return self.root / "artifacts/student"

    @property
    def student_nokd(self) -> Path:
        return self.root / "artifacts/student_nokd"

    @property
    def student_pruned(self) -> Path:
        return self.root / "artifacts/student_pruned"

    def int8(self, model: str, backend: str) -> Path:
        """The int8 file of `model` ('student' or 'teacher'): ONNX, or TorchScript for torch_fx."""
        return self.root / f"artifacts/{model}.int8{'.pt' if backend == 'torch_fx' else '.onnx'}"

    @property
    def compression_report(self) -> Path:
        return self.reports / "compression.md"

    @property
    def model_card(self) -> Path:
        return self.reports / "model_card.md"

    @property
    def pretrained(self) -> Path:
        return self.root / "artifacts/pretrained"

    def checkpoint(self, stage: str, key: str) -> Path:
        return self.root / f"artifacts/checkpoints/{stage}-{key}.pt"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def cleaning_report(self) -> Path:
        return self.reports / "cleaning.json"

    @property
    def split_report(self) -> Path:
        return self.reports / "split.json"

    def resolve(self, path: str | Path) -> Path:
        """A params path (relative to the project root) as an absolute path."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p
