"""The served model as MLflow packages it: classifier + preprocessing + code, a signature, pinned requirements."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pandas as pd

from distilflow.io import read_table

PROJECT = Path(__file__).resolve().parents[2]
# What the served model imports (tasks/serving.py and what it loads), pinned to this environment's versions.
SERVING_PACKAGES = ("mlflow", "numpy", "pandas", "torch", "onnxruntime", "safetensors", "pydantic", "pyyaml")


def pip_requirements() -> list[str]:
    """The served model's requirements, pinned to this environment's versions."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for pkg in SERVING_PACKAGES:
        try:
            pins.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return pins


def headline(row: dict) -> dict[str, str]:
    """The metrics every registered version carries as tags (and promotion reads); those the row has."""
    formats = {
        "accuracy": ("test_accuracy", "{:.6f}"),
        "file_bytes": ("size_bytes", "{:.0f}"),
        "latency_b1_median_ms": ("latency_b1_ms", "{:.4f}"),
        "latency_b256_median_ms": ("latency_b256_ms", "{:.4f}"),
        "parameters": ("parameters", "{}"),
    }
    return {tag: fmt.format(row[key]) for key, (tag, fmt) in formats.items() if row.get(key) is not None}


def _context(artifacts: dict):
    return type("Context", (), {"artifacts": artifacts})()


def save_served_model(
    classifier: Path, preprocessor: Path, input_example: pd.DataFrame, out: Path, card: str | None = None
) -> Path:
    """Write the pyfunc (classifier + preprocessing + code + pinned requirements) to `out`.

    The signature is inferred from a real prediction on the input example, so
    it states the raw columns the model takes and the columns it returns.
    """
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from tasks.serving import ClassifierModel

    artifacts = {"classifier": str(classifier), "preprocessor": str(preprocessor)}
    model = ClassifierModel()
    model.load_context(_context(artifacts))
    with (
        warnings.catch_warnings()
    ):  # integer columns are the raw data's own; NaN there is refused clearly (conform_to_schema)
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(input_example, model.predict(None, input_example))
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)  # its note on pickled models: ours is our own class, loaded by reference
    try:
        mlflow.pyfunc.save_model(
            path=str(out),
            python_model=ClassifierModel(),
            artifacts=artifacts,
            signature=signature,
            input_example=input_example,
            pip_requirements=pip_requirements(),
            code_paths=[str(PROJECT / "tasks"), str(PROJECT / "distilflow")],
        )
    finally:
        pyfunc_log.setLevel(level)
    if card:
        (out / "model_card.md").write_text(card)
    return out


def raw_example(source: Path, test_split: Path, columns: list[str], rows: int = 5) -> pd.DataFrame:
    """Test rows in the column types of the user's raw table (ints for 8-bit pixels in a CSV), else floats.

    The signature is inferred from this example, and MLflow refuses int64 ↔
    float64 conversions at serving time, so the types must be the raw data's:
    ingestion turns every feature into a float, hence the look at the source.
    """
    example = read_table(test_split).head(rows)[columns]
    source = Path(source)
    try:
        if source.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            raw = {f.name: f.type.to_pandas_dtype() for f in pq.read_schema(source) if f.name in columns}
        else:
            head = pd.read_csv(source, nrows=1000)
            raw = {c: head[c].dtype for c in columns if c in head.columns}
        if len(raw) == len(columns) and all(pd.api.types.is_numeric_dtype(t) for t in raw.values()):
            return example.astype(raw)
    except (OSError, ValueError, TypeError, pd.errors.ParserError):
        pass  # an image manifest, or a table we cannot sample: floats
    return example.astype("float64")
