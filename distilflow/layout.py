"""The catalog: the one place that names every file the project reads or writes by default (Kedro's idea).

`PATHS` maps a name to a path relative to the project root. Stages declare
their inputs and outputs by these names (distilflow/stages.py), `dvc.yaml` is
generated from those declarations, and `distilflow/uptodate.py` reads them,
so a path is written down once. The rest of what a project holds is named
here too: the demo data, the embedded MLflow store, the run state under
`.distilflow/`, the search's study storage, trial folders and reports, and
the bench's results; the Makefile's demo-data path is checked against it
(tests/test_layout.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distilflow.uris import sqlite_uri

PATHS: dict[str, str] = {
    # data stages
    "ingested": "data/interim/ingested.parquet",
    "cleaned": "data/interim/clean.parquet",
    "cleaning_report": "reports/cleaning.json",
    "train": "data/split/train.parquet",
    "val": "data/split/val.parquet",
    "test": "data/split/test.parquet",
    "split_report": "reports/split.json",
    "preprocessor": "artifacts/preprocessor.json",
    # the teacher
    "backbone": "artifacts/backbone",
    "teacher": "artifacts/teacher",
    "teacher_metrics": "reports/teacher.json",
    "teacher_history": "reports/teacher_history.csv",
    "teacher_curve": "reports/teacher_learning_curve.png",
    "teacher_confusion": "reports/teacher_confusion_test.png",
    "transfer_report": "reports/transfer_gain.json",
    "baseline_report": "reports/baseline.json",
    # the student and its compressed forms
    "student": "artifacts/student",
    "student_nokd": "artifacts/student_nokd",
    "student_metrics": "reports/student.json",
    "student_history": "reports/student_history.csv",
    "student_curve": "reports/student_learning_curve.png",
    "student_confusion": "reports/student_confusion_test.png",
    "student_pruned": "artifacts/student_pruned",
    "prune_report": "reports/prune.json",
    "candidates": "artifacts/candidates",
    "teacher_int8": "artifacts/teacher_int8",
    "quantize_report": "reports/quantize.json",
    "selection": "reports/selection.json",
    # evaluation and registration
    "compression_report": "reports/compression.md",
    "compression_json": "reports/compression.json",
    "pareto": "reports/pareto.png",
    "metrics": "reports/metrics.json",
    "model_card": "reports/model_card.md",
    # scratch space and the pretrain flow's output (not pipeline outputs)
    "checkpoints": "artifacts/checkpoints",
    "pretrained": "artifacts/pretrained",
    # the demo data (`make data`, `distilflow demo-data`): scikit-learn's digits, DVC-tracked
    "demo_data": "data/raw/digits.csv",
    # the embedded MLflow store, unless MLFLOW_TRACKING_URI names another (distilflow/settings.py)
    "mlflow_db": "mlflow.db",
    "mlartifacts": "mlartifacts",
    # run state: one run per project (an flock), the last complete run, what a failed run puts back
    "state": ".distilflow",
    "run_lock": ".distilflow/run.lock",
    "last_run": ".distilflow/last-run.json",
    # `distilflow search`: the default study storage, each study's inputs and trial folders, its reports
    "search_db": ".distilflow/search.db",
    "studies": ".distilflow/search",
    "search_report": "reports/search.md",
    "search_json": "reports/search.json",
    "search_plot": "reports/search_pareto.png",
    "searched_params": "params.searched.yaml",
    # `make bench`: one JSON and one Markdown file per day and host
    "bench_results": "bench/results",
}


@dataclass(frozen=True)
class Layout:
    """The catalog's paths under one project root."""

    root: Path

    def __init__(self, root: str | Path = "."):
        object.__setattr__(self, "root", Path(root).resolve())

    def path(self, name: str) -> Path:
        """The absolute path of catalog entry `name`."""
        return self.root / PATHS[name]

    def __getattr__(self, name: str) -> Path:  # layout.teacher, layout.preprocessor, ...
        if name in PATHS:
            return self.root / PATHS[name]
        raise AttributeError(name)

    def split(self, name: str) -> Path:
        """The parquet file of split `name` (train, val or test)."""
        return self.path(name)

    @property
    def split_dir(self) -> Path:
        """The folder of the three splits."""
        return self.path("train").parent

    @property
    def reports(self) -> Path:
        """The folder of reports (metrics, plots, model card)."""
        return self.root / "reports"

    def checkpoint(self, stage: str, key: str) -> Path:
        """A stage's per-epoch checkpoint, keyed by everything that shapes its run."""
        return self.path("checkpoints") / f"{stage}-{key}.pt"

    def tracking_uri(self, configured: str | None = None) -> str:
        """The MLflow store: `configured` (MLFLOW_TRACKING_URI, a server) or the embedded SQLite one."""
        return configured or sqlite_uri(self.path("mlflow_db"))

    def study(self, name: str) -> Path:
        """A search study's folder: its snapshot of the shared inputs, its trials, its lock."""
        return self.path("studies") / name

    def study_inputs(self, name: str) -> Path:
        """The study's snapshot of the shared inputs, which every trial links to (a layout of its own)."""
        return self.study(name) / "inputs"

    def trial(self, study: str, number: int) -> Path:
        """One trial's folder, a project layout of its own."""
        return self.study(study) / f"trial-{number:04d}"

    def resolve(self, path: str | Path) -> Path:
        """A params path (relative to the project root) as an absolute path."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p
