"""The served model as MLflow packages it: classifier + preprocessing + code, a signature, pinned requirements."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from distilflow.io import read_table

PROJECT = Path(__file__).resolve().parents[2]
# What the served model imports (tasks/serving.py and what it loads), pinned to this environment's versions.
# What the served model's code imports (tasks/serving.py, tasks/inference.py, tasks/preprocessing.py, the
# distilflow core they use), pinned to this environment's versions; tests/test_serving.py installs them into a
# fresh venv and loads the model.
SERVING_PACKAGES = ("mlflow", "numpy", "pandas", "pyarrow", "torch", "onnxruntime", "safetensors", "pydantic", "pyyaml")


def pip_requirements(classifier: Path | None = None) -> list[str]:
    """The served model's requirements, pinned to this environment's versions.

    A model built on a transformers backbone (`arch.json` kind `hf`) needs transformers to rebuild it.
    """
    import json
    from importlib.metadata import PackageNotFoundError, version

    packages = list(SERVING_PACKAGES)
    arch = Path(classifier) / "arch.json" if classifier is not None else None
    if arch is not None and arch.is_file() and json.loads(arch.read_text()).get("kind") == "hf":
        packages.append("transformers")
    pins = []
    for pkg in packages:
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

    Saved as models-from-code (tasks/served_model.py): loading it runs that
    file and reads safetensors, ONNX and JSON, never a pickle.

    The signature names the raw columns the model takes and, inferred from a
    real prediction, the columns it returns. The inputs are typed `Any`:
    MLflow has no "number" type, and its `double` refuses int64 frames (a CSV
    of pixels) while `long` refuses NaN and 13.9, yet the model takes all of
    them (NaN is imputed, 13.9 stays 13.9). The model itself refuses
    non-numeric values with a message naming the column.
    """
    import mlflow.pyfunc
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    from tasks.serving import ClassifierModel

    artifacts = {"classifier": str(classifier), "preprocessor": str(preprocessor)}
    model = ClassifierModel()
    model.load_context(_context(artifacts))
    with warnings.catch_warnings():  # inferring from integer columns warns about NaN; the inputs are Any anyway
        warnings.simplefilter("ignore")
        outputs = infer_signature(input_example, model.predict(None, input_example)).outputs
    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), str(c)) for c in input_example.columns]), outputs=outputs
    )
    mlflow.pyfunc.save_model(
        path=str(out),
        python_model=str(PROJECT / "tasks/served_model.py"),
        artifacts=artifacts,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements(classifier),
        code_paths=[str(PROJECT / "tasks"), str(PROJECT / "distilflow")],
    )
    if card:
        (out / "model_card.md").write_text(card)
    return out


def served_latency(model_dir: Path, example: pd.DataFrame, repeats: int = 30) -> dict[str, float]:
    """Milliseconds of `pyfunc.predict` on one raw row of the saved model (schema check, preprocessing,
    runtime and output frame included): what a caller of the registered model waits, short of HTTP."""
    import time

    import mlflow.pyfunc
    import numpy as np

    model = mlflow.pyfunc.load_model(str(model_dir))
    row = example.head(1)
    for _ in range(5):
        model.predict(row)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.predict(row)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "max_ms": float(np.max(times))}


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
    numeric = [c for c in columns if pd.api.types.is_numeric_dtype(example[c])]  # categoricals stay text
    return example.astype(dict.fromkeys(numeric, "float64"))
