"""One evaluation harness for every model variant: teacher, student, pruned, int8.

A variant is a torch module, or a file: ONNX (`.onnx`, run with onnxruntime)
or TorchScript (`.pt`, e.g. the torch_fx int8 model). Each is measured the
same way: accuracy, macro-F1 and per-class recall on the same test split;
size on disk; parameter count; CPU latency at batch 1 and batch 256 (median
of repeated timed runs after warm-up, with min and max, thread count fixed
and recorded), so the compression table compares like with like.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from distilflow.errors import DistilflowError
from distilflow.io import write_json, write_text
from distilflow.records import StageResult
from tasks.backbones import WEIGHTS, load_classifier
from tasks.candidates import candidate_name
from tasks.dataset import load_splits
from tasks.engine import torch_threads
from tasks.inference import TorchPredictor, int8_file, load_predictor, measure_latency
from tasks.metrics import classification_metrics
from tasks.models import count_parameters
from tasks.registry.card import compression_notes

Predict = Callable[[np.ndarray], np.ndarray]
LATENCY_BATCHES = (1, 256)


def _onnx_parameter_count(path: Path) -> int:
    """Elements of the graph's float and integer weight tensors (scales and zero points included)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return int(sum(numpy_helper.to_array(t).size for t in graph.initializer if len(t.dims) >= 1))


def load_variant(variant: nn.Module | str | Path, threads: int) -> tuple[Predict, int, int | None]:
    """(predict rows → logits, size on disk in bytes, parameter count or None) for any variant.

    A torch module's size is its saved state_dict; a model folder's is its
    weights file; an int8 folder's is its model file; a file's is the file. A
    TorchScript int8 model keeps its weights in packed, opaque form, so its
    parameter count is reported as None rather than guessed.
    """
    if isinstance(variant, nn.Module):
        buf = io.BytesIO()
        torch.save(variant.state_dict(), buf)
        return TorchPredictor(variant), len(buf.getvalue()), count_parameters(variant)
    path = Path(variant)
    if path.is_dir() and (model := int8_file(path)) is not None:
        path = model
    elif path.is_dir():
        model, _ = load_classifier(path)
        return TorchPredictor(model), os.path.getsize(path / WEIGHTS), count_parameters(model)
    predict = load_predictor(path, threads)
    if path.suffix == ".onnx":
        return predict, os.path.getsize(path), _onnx_parameter_count(path)
    return predict, os.path.getsize(path), count_parameters(predict.model) or None


def evaluate_variant(
    name: str,
    variant: nn.Module | str | Path,
    X_test: np.ndarray,
    y_test: np.ndarray,
    threads: int = 2,
    repeats: int = 30,
    latency_batches: tuple[int, ...] = LATENCY_BATCHES,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """One row of the compression table for one variant (torch variants run at `threads`; ONNX sessions take it too).

    With `val`, the row also holds validation accuracy and macro-F1: what the
    product is chosen on (the test figures are only reported).
    """
    with torch_threads(threads):
        predict, size, n_params = load_variant(variant, threads)
        X_test = np.ascontiguousarray(X_test, dtype=np.float32)
        y_test = np.asarray(y_test)
        y_pred = predict(X_test).argmax(1)
        labels = [c.item() if hasattr(c, "item") else c for c in np.unique(y_test)]
        scores = classification_metrics(y_test, y_pred, classes=labels, labels=labels)
        row = {
            "variant": name,
            "kind": getattr(predict, "kind", "torch"),
            "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"],
            "per_class_recall": {c: scores[f"recall.{c}"] for c in labels},
            "file_bytes": int(size),
            "parameters": n_params,
            "threads": threads,
            "test_rows": int(len(y_test)),
        }
        if val is not None:
            X_val, y_val = np.ascontiguousarray(val[0], dtype=np.float32), np.asarray(val[1])
            val_scores = classification_metrics(y_val, predict(X_val).argmax(1), classes=labels, labels=labels)
            row |= {"val_accuracy": val_scores["accuracy"], "val_macro_f1": val_scores["macro_f1"]}
        for bs in latency_batches:
            lat = measure_latency(predict, X_test, bs, repeats=repeats)
            row.update({f"latency_b{bs}_{k}": v for k, v in lat.items()})
        return row


def pareto_front(table: pd.DataFrame, latency: str = "latency_b1_median_ms") -> pd.Series:
    """True for variants no other variant beats on both accuracy (higher) and latency (lower)."""
    acc, lat = table["accuracy"].to_numpy(), table[latency].to_numpy()
    dominated = [
        any((acc[j] >= acc[i] and lat[j] <= lat[i]) and (acc[j] > acc[i] or lat[j] < lat[i]) for j in range(len(table)))
        for i in range(len(table))
    ]
    return pd.Series(~np.array(dominated, dtype=bool), index=table.index)


def compare_variants(
    variants: dict[str, nn.Module | str | Path],
    X_test: np.ndarray,
    y_test: np.ndarray,
    threads: int = 2,
    repeats: int = 30,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """The compression table: one row per variant, same test split, same threads, same timing protocol."""
    if not variants:
        raise DistilflowError("compare_variants: no model variants to compare")
    rows = [evaluate_variant(name, v, X_test, y_test, threads, repeats, val=val) for name, v in variants.items()]
    table = pd.DataFrame(rows)
    table["pareto"] = pareto_front(table)
    return table


def pareto_plot(table: pd.DataFrame, path: str | Path, latency: str = "latency_b1_median_ms") -> Path:
    """Accuracy vs batch-1 latency of every variant, bubble area ∝ file size, the Pareto front joined."""
    from tasks.plots import accuracy_latency_plot

    return accuracy_latency_plot(
        names=list(table["variant"]),
        latency_ms=table[latency].to_numpy(dtype=float),
        accuracy=table["accuracy"].to_numpy(dtype=float),
        size_bytes=table["file_bytes"].to_numpy(dtype=float),
        front=pareto_front(table, latency).to_numpy(),
        path=path,
        title="compression: accuracy vs latency (bubble = file size)",
        xlabel=f"CPU latency, batch 1, median (ms, {int(table['threads'].iloc[0])} threads)",
        ylabel="test accuracy",
    )


def compression_markdown(table: pd.DataFrame) -> str:
    """reports/compression.md: the variant table, how it was measured, and per-class recall."""
    lines = [
        "# Compression",
        "",
        "| variant | accuracy | macro-F1 | size (KB) | parameters | latency b1 ms (min–max) | "
        "latency b256 ms (min–max) | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for _, r in table.iterrows():
        params = "n/a" if r["parameters"] is None or pd.isna(r["parameters"]) else f"{int(r['parameters']):,}"
        lines.append(
            f"| {r['variant']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['file_bytes'] / 1024:.1f} | {params} | "
            f"{r['latency_b1_median_ms']:.3f} ({r['latency_b1_min_ms']:.3f}–{r['latency_b1_max_ms']:.3f}) | "
            f"{r['latency_b256_median_ms']:.2f} ({r['latency_b256_min_ms']:.2f}–{r['latency_b256_max_ms']:.2f}) | "
            f"{'✓' if r.get('pareto') else ''} |"
        )
    threads = sorted(set(int(t) for t in table["threads"]))
    lines += [
        "",
        f"Measured on {int(table['test_rows'].iloc[0])} test rows, CPU, {', '.join(map(str, threads))} "
        "thread(s); latency is the median of repeated timed calls after warm-up (min–max in brackets). "
        "Size is the file on disk (a torch module: its saved state_dict). int8 parameter counts include "
        "quantization scales and zero points; n/a where the weights are packed and opaque.",
        "",
    ]
    classes = list(table["per_class_recall"].iloc[0])
    lines += [
        "## Per-class recall",
        "",
        "| variant | " + " | ".join(map(str, classes)) + " |",
        "|---|" + "---:|" * len(classes),
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['variant']} | "
            + " | ".join(f"{r['per_class_recall'].get(c, float('nan')):.3f}" for c in classes)
            + " |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- stage (I/O at the edge)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


def evaluate_stage(
    train: Path,
    val: Path,
    test: Path,
    preprocessor: Path,
    teacher: Path,
    student: Path,
    student_nokd: Path,
    student_pruned: Path | None,
    candidates: Path,
    teacher_int8: Path | None,
    prune_report: Path | None,
    quantize_report: Path,
    compression_report: Path,
    compression_json: Path,
    pareto: Path,
    metrics: Path,
    threads: int,
    repeats: int,
) -> StageResult:
    """Every variant and every product candidate with one harness: test metrics (reported), validation metrics
    (what the select stage chooses on), size and latency; the compression report, its JSON and the Pareto plot."""
    pre, data = load_splits(train, val, test, preprocessor)
    X_test, y_test = data["test"]
    n = len(pre["classes"])
    folders = {
        "teacher fp32": teacher,
        "student fp32 (KD)": student,
        "student fp32 (no KD)": student_nokd,
        "student pruned fp32": student_pruned,
    }
    variants = {name: load_classifier(path, n)[0] for name, path in folders.items() if path is not None}
    found = {}
    for folder in sorted(Path(candidates).iterdir()):
        if int8_file(folder) is not None:
            student_name, _, runtime = folder.name.partition(".")
            found[candidate_name(student_name, runtime)] = folder.name
            variants[candidate_name(student_name, runtime)] = folder
    if teacher_int8 is not None and int8_file(teacher_int8) is not None:
        variants["teacher int8"] = teacher_int8
    table = compare_variants(variants, X_test, y_test, threads=threads, repeats=repeats, val=data["val"])
    table["candidate"] = [found.get(v, "") for v in table["variant"]]  # "": a reference, not a candidate
    notes = compression_notes(prune_report, quantize_report)
    md = compression_markdown(table)
    if notes:
        md += "\n## Notes\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    write_text(md, compression_report)
    write_json(table.to_dict(orient="records"), compression_json)
    pareto_plot(table, pareto)
    numbers = {}
    for _, row in table.iterrows():
        key = _slug(row["variant"])
        numbers |= {
            f"{key}.accuracy": row["accuracy"],
            f"{key}.val_accuracy": row["val_accuracy"],
            f"{key}.size_bytes": row["file_bytes"],
            f"{key}.latency_b1_ms": row["latency_b1_median_ms"],
            f"{key}.latency_b256_ms": row["latency_b256_median_ms"],
        }
    write_json(numbers, metrics)
    return StageResult(
        metrics=numbers,
        artifacts=[str(p) for p in (compression_report, compression_json, pareto)],
        info={"table": table.drop(columns=["per_class_recall"]).to_dict(orient="records"), "notes": notes},
    )
