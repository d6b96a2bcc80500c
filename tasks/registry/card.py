"""The model card: what a reviewer reads in the MLflow UI before promoting."""

from __future__ import annotations

from pathlib import Path

from distilflow.io import read_json
from tasks.dataset import cleaning_table

DESCRIPTION_LIMIT = 5000  # characters MLflow's SQL stores keep of a model version's description


def model_card(
    name: str,
    params,
    lineage: dict[str, str],
    cleaning: dict,
    split: dict,
    table: list[dict],
    recipe: str,
    quantize_note: str,
) -> str:
    """The markdown a reviewer reads in the MLflow UI before promoting."""
    product = next((r for r in table if r["variant"] == "student int8"), table[-1])
    n_classes = len(split["class_counts"]["train"])
    teacher = next((r for r in table if r["variant"] == "teacher fp32"), table[0])
    lines = [
        f"# {name}",
        "",
        f"{'Image' if params.data.image_shape else 'Tabular'} classifier ({product['variant']}) distilled from a "
        f"fine-tuned teacher by distilflow. Test accuracy "
        f"{product['accuracy']:.4f} (teacher {teacher['accuracy']:.4f}), {product['file_bytes'] / 1024:.1f} KB, "
        f"{product['latency_b1_median_ms']:.3f} ms per row on CPU. Takes the raw feature columns as a DataFrame; "
        "returns `prediction` and one `prob_<class>` column per class.",
        "",
        "## Data",
        "",
        f"- source: `{params.data.source}` (md5 `{lineage.get('data_md5')}`, DVC-tracked)",
        f"- classes: {', '.join(map(str, params.data.classes or []))}"
        if params.data.classes
        else "- classes: as found",
        "- splits (stratified, content-addressed; test frozen): "
        + ", ".join(f"{k} {v} rows (`{split['hashes'][k]}`)" for k, v in split["sizes"].items()),
        f"- git commit `{lineage.get('git_commit')}`, params hash `{lineage.get('params_hash')}`",
        "",
        "## Cleaning",
        "",
        cleaning_table(cleaning),
        "## Metrics of every variant (frozen test split)",
        "",
        "| variant | accuracy | macro-F1 | size (KB) | latency b1 (ms) | latency b256 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['variant']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['file_bytes'] / 1024:.1f} | "
            f"{r['latency_b1_median_ms']:.3f} | {r['latency_b256_median_ms']:.2f} |"
        )
    threads = table[0].get("threads")
    lines += [
        "",
        f"Latency: median after warm-up, CPU, {threads} thread(s).",
        "",
        "## Compression steps",
        "",
        f"{recipe}",
        "",
        f"int8: {quantize_note}",
        "",
        "## Intended use and limits",
        "",
        f"- For inputs like the training data: {n_classes} classes, the same feature columns"
        + (
            f", values in [{params.data.value_range[0]:g}, {params.data.value_range[1]:g}]"
            if params.data.value_range
            else ""
        )
        + ". Values outside that range are not clipped at serving time; missing values are imputed with the "
        "train median.",
        "- Accuracy is measured on one frozen test split from the same distribution; it says nothing about "
        "shifted data. Check per-class recall in the compression report before relying on rare classes.",
        "- Latency is this machine's; measure on yours. The student trades accuracy for size and speed: "
        "use the registered teacher where the difference matters.",
        "- Not for decisions about people without a separate fairness review.",
    ]
    return "\n".join(lines) + "\n"


def card_description(card: str) -> str:
    """The whole card as a model version's description (MLflow renders it as markdown), within the store's limit."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    tail = "\n\n… (the full card is `model_card.md` among this version's files)\n"
    return card[: DESCRIPTION_LIMIT - len(tail)].rsplit("\n", 1)[0] + tail


def recipe(params) -> str:
    """The compression recipe in one line (also a version tag)."""
    d, q = params.distill, params.quantize
    steps = [
        f"KD (T={d.temperature}, alpha={d.alpha}{f', hint {d.hint_weight}' if d.hint_weight else ''}) "
        f"into a {d.student} student {d.student_width}x{d.student_depth}"
    ]
    if params.prune.enabled:
        steps.append(f"{params.prune.method} pruning {params.prune.sparsity:.0%}")
    if q.enabled:
        steps.append(
            f"int8 {q.backend} ({q.calibration_method} calibration, "
            f"{'per-channel' if q.per_channel else 'per-tensor'}, budget {q.max_accuracy_drop})"
        )
    return " → ".join(steps)


def compression_notes(prune_report: Path | None, quantize_report: Path | None) -> list[str]:
    """What the compression steps said about themselves, for the report and the model card."""
    notes = []
    if prune_report is not None:
        report = read_json(prune_report)
        notes.append(f"pruning ({report['method']}, {report['requested_sparsity']:.0%}): {report.get('note', '')}")
    if quantize_report is not None:
        info = read_json(quantize_report)
        notes.append(f"student int8: remedy `{info['student'].get('remedy')}`: {info['student'].get('reason')}")
        if info["teacher"].get("error"):
            notes.append(f"teacher int8 not shown: {info['teacher']['error']}")
    return notes
