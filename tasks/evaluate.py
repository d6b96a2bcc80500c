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
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from distilflow.errors import DistilflowError
from tasks.models import count_parameters
from tasks.quantize import OnnxPredictor, quiet_output

Predict = Callable[[np.ndarray], np.ndarray]
LATENCY_BATCHES = (1, 256)


def _torch_predictor(model: nn.Module) -> Predict:
    model.eval()

    def predict(X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).float().numpy()

    return predict


def _onnx_parameter_count(path: Path) -> int:
    """Elements of the graph's float and integer weight tensors (scales and zero points included)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return int(sum(numpy_helper.to_array(t).size for t in graph.initializer if len(t.dims) >= 1))


def load_variant(variant: nn.Module | str | Path, threads: int) -> tuple[Predict, int, int | None]:
    """(predict rows → logits, size on disk in bytes, parameter count or None) for any variant.

    A torch module's size is its saved state_dict; a file's size is the file.
    A TorchScript int8 model keeps its weights in packed, opaque form, so its
    parameter count is reported as None rather than guessed.
    """
    if isinstance(variant, nn.Module):
        buf = io.BytesIO()
        torch.save(variant.state_dict(), buf)
        return _torch_predictor(variant), len(buf.getvalue()), count_parameters(variant)
    path = Path(variant)
    if not path.is_file():
        raise DistilflowError(f"model variant not found: {path}")
    if path.suffix == ".onnx":
        return OnnxPredictor(path, threads), os.path.getsize(path), _onnx_parameter_count(path)
    if path.suffix in (".pt", ".pth", ".ts"):
        with quiet_output():
            scripted = torch.jit.load(str(path))
        n = count_parameters(scripted)
        return _torch_predictor(scripted), os.path.getsize(path), n or None
    raise DistilflowError(
        f"model variant {path}: unsupported file type '{path.suffix}' (use .onnx or a TorchScript .pt)")


def measure_latency(predict: Predict, X: np.ndarray, batch_size: int, repeats: int = 30, warmup: int = 5) -> dict:
    """Median / min / max wall time (ms) of one `predict` call on `batch_size` rows, after warm-up.

    The median, not the mean: a single scheduler hiccup on a shared CPU
    would otherwise dominate. Rows are tiled when the test split is smaller
    than the batch.
    """
    reps = int(np.ceil(batch_size / len(X)))
    batch = np.ascontiguousarray(np.tile(X, (reps, 1))[:batch_size], dtype=np.float32)
    for _ in range(warmup):
        predict(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "max_ms": float(np.max(times))}


def evaluate_variant(name: str, variant: nn.Module | str | Path, X_test: np.ndarray, y_test: np.ndarray,
                     threads: int = 2, repeats: int = 30, latency_batches: tuple[int, ...] = LATENCY_BATCHES) -> dict:
    """One row of the compression table for one variant."""
    from tasks.finetune import classification_metrics

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # torch variants; ONNX sessions take `threads` themselves
    try:
        predict, size, n_params = load_variant(variant, threads)
        X_test = np.ascontiguousarray(X_test, dtype=np.float32)
        y_test = np.asarray(y_test)
        y_pred = np.concatenate([predict(X_test[i : i + 1024]) for i in range(0, len(X_test), 1024)]).argmax(1)
        labels = [c.item() if hasattr(c, "item") else c for c in np.unique(y_test)]
        scores = classification_metrics(y_test, y_pred, classes=labels, labels=labels)
        row = {
            "variant": name,
            "kind": "torch" if isinstance(variant, nn.Module) else Path(variant).suffix.lstrip("."),
            "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"],
            "per_class_recall": {c: scores[f"recall.{c}"] for c in labels},
            "file_bytes": int(size),
            "parameters": n_params,
            "threads": threads,
            "test_rows": int(len(y_test)),
        }
        for bs in latency_batches:
            lat = measure_latency(predict, X_test, bs, repeats=repeats)
            row.update({f"latency_b{bs}_{k}": v for k, v in lat.items()})
        return row
    finally:
        torch.set_num_threads(previous_threads)


def pareto_front(table: pd.DataFrame, latency: str = "latency_b1_median_ms") -> pd.Series:
    """True for variants no other variant beats on both accuracy (higher) and latency (lower)."""
    acc, lat = table["accuracy"].to_numpy(), table[latency].to_numpy()
    dominated = [any((acc[j] >= acc[i] and lat[j] <= lat[i]) and (acc[j] > acc[i] or lat[j] < lat[i])
                     for j in range(len(table))) for i in range(len(table))]
    return pd.Series(~np.array(dominated, dtype=bool), index=table.index)


def compare_variants(variants: dict[str, nn.Module | str | Path], X_test: np.ndarray, y_test: np.ndarray,
                     threads: int = 2, repeats: int = 30) -> pd.DataFrame:
    """The compression table: one row per variant, same test split, same threads, same timing protocol."""
    if not variants:
        raise DistilflowError("compare_variants: no model variants to compare")
    table = pd.DataFrame([evaluate_variant(name, v, X_test, y_test, threads, repeats) for name, v in variants.items()])
    table["pareto"] = pareto_front(table)
    return table


def pareto_plot(table: pd.DataFrame, path: str | Path, latency: str = "latency_b1_median_ms") -> Path:
    """Accuracy vs batch-1 latency, bubble area ∝ file size; the Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sizes = table["file_bytes"].to_numpy(dtype=float)
    area = 60 + 900 * sizes / max(sizes.max(), 1)
    ax.scatter(table[latency], table["accuracy"], s=area, alpha=0.5, edgecolors="black")
    for _, row in table.iterrows():
        ax.annotate(f"{row['variant']}\n{row['file_bytes'] / 1024:.0f} KB", (row[latency], row["accuracy"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    front = table[pareto_front(table, latency)].sort_values(latency)
    ax.plot(front[latency], front["accuracy"], "--", color="tab:red", lw=1, label="Pareto front")
    ax.set(xlabel=f"CPU latency, batch 1, median (ms, {int(table['threads'].iloc[0])} threads)",
           ylabel="test accuracy", title="compression: accuracy vs latency (bubble = file size)")
    lat = table[latency].to_numpy(dtype=float)
    if lat.min() > 0 and lat.max() / lat.min() > 20:  # a torch teacher next to an int8 student spans decades
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def compression_markdown(table: pd.DataFrame) -> str:
    """reports/compression.md: the variant table, how it was measured, and per-class recall."""
    lines = ["# Compression", "",
             "| variant | accuracy | macro-F1 | size (KB) | parameters | latency b1 ms (min–max) | "
             "latency b256 ms (min–max) | Pareto |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for _, r in table.iterrows():
        params = "n/a" if r["parameters"] is None or pd.isna(r["parameters"]) else f"{int(r['parameters']):,}"
        lines.append(
            f"| {r['variant']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['file_bytes'] / 1024:.1f} | {params} | "
            f"{r['latency_b1_median_ms']:.3f} ({r['latency_b1_min_ms']:.3f}–{r['latency_b1_max_ms']:.3f}) | "
            f"{r['latency_b256_median_ms']:.2f} ({r['latency_b256_min_ms']:.2f}–{r['latency_b256_max_ms']:.2f}) | "
            f"{'✓' if r.get('pareto') else ''} |")
    threads = sorted(set(int(t) for t in table["threads"]))
    lines += ["", f"Measured on {int(table['test_rows'].iloc[0])} test rows, CPU, {', '.join(map(str, threads))} "
              "thread(s); latency is the median of repeated timed calls after warm-up (min–max in brackets). "
              "Size is the file on disk (a torch module: its saved state_dict). int8 parameter counts include "
              "quantization scales and zero points; n/a where the weights are packed and opaque.", ""]
    classes = list(table["per_class_recall"].iloc[0])
    lines += ["## Per-class recall", "", "| variant | " + " | ".join(map(str, classes)) + " |",
              "|---|" + "---:|" * len(classes)]
    for _, r in table.iterrows():
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r['per_class_recall'].get(c, float('nan')):.3f}"
                                                           for c in classes) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- stage (I/O at the edge)


def evaluate_stage(layout, variants: dict[str, Path], threads: int, repeats: int, notes: list[str]) -> pd.DataFrame:
    """Every variant on the frozen test split, with one harness; writes reports/compression.{md,json} and the Pareto plot."""
    from distilflow.io import write_json, write_text
    from tasks.backbones import load_classifier
    from tasks.finetune import load_splits

    pre, data = load_splits(layout)
    X_test, y_test = data["test"]
    n = len(pre["classes"])
    # saved model folders load as torch modules; int8 files (.onnx, TorchScript .pt) go to load_variant
    models = {name: (load_classifier(path, n)[0] if Path(path).is_dir() else path) for name, path in variants.items()}
    table = compare_variants(models, X_test, y_test, threads=threads, repeats=repeats)
    md = compression_markdown(table)
    if notes:
        md += "\n## Notes\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    layout.reports.mkdir(parents=True, exist_ok=True)
    write_text(md, layout.compression_report)
    write_json(table.to_dict(orient="records"), layout.reports / "compression.json")
    pareto_plot(table, layout.reports / "pareto.png")
    return table


from prefect import task  # noqa: E402

from distilflow.caching import content_cache_key  # noqa: E402
from distilflow.records import StageResult  # noqa: E402


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


@task(name="evaluate", cache_key_fn=content_cache_key, persist_result=True)
def evaluate_task(variants: dict[str, Path], data: list[Path], threads: int, repeats: int, notes: list[str],
                  layout) -> StageResult:
    table = evaluate_stage(layout, variants, threads, repeats, notes)
    metrics = {}
    for _, row in table.iterrows():
        key = _slug(row["variant"])
        metrics |= {f"{key}.accuracy": row["accuracy"], f"{key}.size_bytes": row["file_bytes"],
                    f"{key}.latency_b1_ms": row["latency_b1_median_ms"], f"{key}.latency_b256_ms": row["latency_b256_median_ms"]}
    outputs = [layout.compression_report, layout.reports / "compression.json", layout.reports / "pareto.png"]
    return StageResult.of(outputs, metrics=metrics, artifacts=[str(p) for p in outputs],
                          info={"table": table.drop(columns=["per_class_recall"]).to_dict(orient="records")})
