"""What a run reads beyond its declared paths: the images a manifest names, and the libraries doing the work.

Both belong in every cache and freshness key: a changed image under an
unchanged manifest CSV is new data, and an upgraded torch or ONNX Runtime
makes new models and new latency figures from the same inputs.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RUNTIME_PACKAGES = ("torch", "onnxruntime", "onnx", "transformers", "scikit-learn", "numpy", "distilflow")


def manifest_images(source: Path, path_column: str) -> list[Path]:
    """The image files a CSV manifest names (relative to it), or [] for a plain table."""
    source = Path(source)
    if source.suffix.lower() != ".csv" or not source.is_file():
        return []
    try:
        with open(source, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or path_column not in reader.fieldnames:
                return []
            names = [row[path_column] for row in reader if row.get(path_column)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return sorted({(Path(n) if Path(n).is_absolute() else source.parent / n) for n in names})


@lru_cache(maxsize=1)
def runtime_versions() -> dict[str, str]:
    """The installed versions of the libraries that shape models and measurements."""
    out = {}
    for package in RUNTIME_PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out
