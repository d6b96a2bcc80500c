"""The model card: what a reviewer reads in the MLflow UI before promoting."""

from __future__ import annotations

from pathlib import Path

from distilflow.io import read_json
from distilflow.layout import PATHS
from tasks.dataset import cleaning_table

DESCRIPTION_LIMIT = 5000  # characters MLflow's SQL stores keep of a model version's description


def _headline(name: str, params, product: dict, teacher: dict, selection: dict, lineage: dict) -> list[str]:
    return [
        f"# {name}",
        "",
        f"{'Image' if params.data.image_shape else 'Tabular'} classifier ({product['variant']}) chosen among "
        f"{len(selection['verdicts'])} candidates distilled from a fine-tuned teacher by distilflow. Test accuracy "
        f"{product['accuracy']:.4f} (teacher {teacher['accuracy']:.4f}), {product['file_bytes'] / 1024:.1f} KB, "
        f"{product['latency_b1_median_ms']:.3f} ms per row in its runtime on CPU. Takes the raw feature columns as "
        "a DataFrame; returns `prediction` and one `prob_<class>` column per class.",
        "",
        "## Why this model ships",
        "",
        f"Policy (`params.yaml: select`, validation split only; test figures are reported, never used to choose): "
        f"{selection['policy']}.",
        "",
        f"**Pick:** {selection['reason']}.",
        "",
        *search_note(lineage),
        selection_markdown(selection),
        *kd_note(selection),
    ]


def _data(params, lineage: dict, cleaning: dict, split: dict) -> list[str]:
    classes = params.data.classes
    lines = [
        "## Data",
        "",
        f"- source: `{params.data.source}` (md5 `{lineage.get('data_md5')}`, DVC-tracked)",
        f"- classes: {', '.join(map(str, classes))}" if classes else "- classes: as found",
        "- splits (stratified, content-addressed; test frozen): "
        + ", ".join(f"{k} {v} rows (`{split['hashes'][k]}`)" for k, v in split["sizes"].items()),
        f"- git commit `{lineage.get('git_commit', 'unknown')}`, params hash `{lineage.get('params_hash')}`",
        f"- teacher: {_teacher_line(lineage)}",
    ]
    if cleaning.get("rare_classes_dropped"):
        lines += [
            "",
            f"**Classes dropped, too few rows to stratify (class: rows): {cleaning['rare_classes_dropped']}. "
            "This model never predicts them; it is not a drop-in replacement for one that does.**",
        ]
    return lines + ["", "## Cleaning", "", cleaning_table(cleaning)]


def _teacher_line(lineage: dict) -> str:
    """The teacher's backbone and, for pretrained weights, the package, version and sha256 they came from."""
    line = f"`{lineage.get('teacher.backbone', 'unknown')}` backbone, fine-tuned"
    if "teacher.weights.package" in lineage:
        line += (
            f" from the ImageNet weights of `{lineage['teacher.weights.package']}` "
            f"{lineage.get('teacher.weights.version', '?')} (sha256 `{lineage.get('teacher.weights.sha256', '?')}`)"
        )
    return line


def _metrics(table: list[dict], baseline: dict | None, teacher: dict, product: dict) -> list[str]:
    lines = [
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
    for name, row in (baseline or {}).items():
        lines.append(
            f"| baseline: {name} (scikit-learn) | {row['test_accuracy']:.4f} | {row['test_macro_f1']:.4f} | | | |"
        )
    threads = table[0].get("threads")
    return lines + [
        "",
        f"Latency: median after warm-up, CPU, {threads} thread(s).",
        *baseline_note(baseline, teacher["accuracy"], product["accuracy"]),
    ]


def _limits(params, n_classes: int) -> list[str]:
    vr = params.data.value_range
    return [
        "## Intended use and limits",
        "",
        f"- For inputs like the training data: {n_classes} classes, the same feature columns"
        + (f", values in [{vr[0]:g}, {vr[1]:g}]" if vr else "")
        + ". Missing values are imputed with the train median.",
        "- Accuracy is measured on one frozen test split from the same distribution; it says nothing about "
        "shifted data. Check per-class recall in the compression report before relying on rare classes.",
        "- Latency is this machine's; measure on yours. The student trades accuracy for size and speed: "
        "use the registered teacher where the difference matters.",
        "- Not for decisions about people without a separate fairness review.",
    ]


def model_card(
    name: str,
    params,
    lineage: dict[str, str],
    cleaning: dict,
    split: dict,
    table: list[dict],
    selection: dict,
    quantize_note: str,
    baseline: dict | None = None,
) -> str:
    """The markdown a reviewer reads in the MLflow UI before promoting (the registered version's description)."""
    pick = selection["pick"]
    product = next(r for r in table if r["variant"] == pick["variant"])
    teacher = next((r for r in table if r["variant"] == "teacher fp32"), table[0])
    compression = ["", "## Compression steps", "", recipe(params, pick["candidate"]), "", f"int8: {quantize_note}", ""]
    lines = [
        *_headline(name, params, product, teacher, selection, lineage),
        *_data(params, lineage, cleaning, split),
        *_metrics(table, baseline, teacher, product),
        *compression,
        *_limits(params, len(split["class_counts"]["train"])),
    ]
    return "\n".join(lines) + "\n"


def baseline_note(baseline: dict | None, teacher_accuracy: float, product_accuracy: float) -> list[str]:
    """A loud line when a classical model beats the teacher or the product on test."""
    if not baseline:
        return []
    name, row = max(baseline.items(), key=lambda kv: kv[1]["val_accuracy"])  # chosen on validation, as the rest
    if row["test_accuracy"] <= max(teacher_accuracy, product_accuracy):
        return [
            "",
            f"Classical baseline ({name}, fitted on the same split): test accuracy {row['test_accuracy']:.4f}, "
            f"below the teacher ({teacher_accuracy:.4f}).",
        ]
    return [
        "",
        f"**A classical baseline beats this model: {name} reaches test accuracy {row['test_accuracy']:.4f} "
        f"(teacher {teacher_accuracy:.4f}, this model {product_accuracy:.4f}). Consider whether the network "
        "earns its place.**",
    ]


def search_note(lineage: dict) -> list[str]:
    """Where a searched product came from: the study, the trial, and the reports that show every trial."""
    if not lineage.get("search.study"):
        return []
    return [
        f"**Found by `distilflow search`:** study `{lineage['search.study']}`, trial {lineage['search.trial']} of "
        f"{lineage.get('search.trials', '?')}; its candidates below were re-measured one at a time before the pick. "
        "Every trial, the front and the pick: [search.md](search.md) and [search_pareto.png](search_pareto.png) "
        f"(logged with this version's run; in the project at "
        f"`{lineage.get('search.report', PATHS['search_report'])}`).",
        "",
    ]


def selection_markdown(selection: dict) -> str:
    """Every candidate under the policy: validation figures (chosen on), test accuracy (reported), the verdict."""
    pick = (selection.get("pick") or {}).get("variant")
    lines = [
        "| candidate | val accuracy | val macro-F1 | latency b1 (ms) | latency b256 (ms) | size (KB) | "
        "test accuracy | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v in selection["verdicts"]:
        verdict = "**shipped**" if v["variant"] == pick else ("meets the constraint" if v["feasible"] else v["why"])
        lines.append(
            f"| {v['variant']} | {v['val_accuracy']:.4f} | {v['val_macro_f1']:.4f} | "
            f"{v['latency_b1_ms']:.3f} | {v['latency_b256_ms']:.2f} | {v['size_bytes'] / 1024:.1f} | "
            f"{v['test_accuracy']:.4f} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def kd_note(selection: dict) -> list[str]:
    """Said plainly when the student without distillation did better on validation than the one with it."""
    best = {}
    for v in selection["verdicts"]:
        kind = "kd" if v["candidate"].startswith("student.") else "nokd" if "nokd" in v["candidate"] else None
        if kind:
            best[kind] = max(best.get(kind, 0.0), v["val_accuracy"])
    if "kd" in best and "nokd" in best and best["nokd"] > best["kd"]:
        return [
            f"Note: the same-size student trained on labels alone scored higher on validation "
            f"({best['nokd']:.4f}) than the distilled one ({best['kd']:.4f}); distillation did not pay here.",
            "",
        ]
    return []


def card_description(card: str) -> str:
    """The whole card as a model version's description (MLflow renders it as markdown), within the store's limit."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    tail = "\n\n… (the full card is `model_card.md` among this version's files)\n"
    return card[: DESCRIPTION_LIMIT - len(tail)].rsplit("\n", 1)[0] + tail


def recipe(params, candidate: str = "student.int8") -> str:
    """How the shipped candidate was made, in one line (also a version tag)."""
    d, q = params.distill, params.quantize
    student, _, runtime = candidate.partition(".")
    shape = f"a {d.student} student {d.student_width}x{d.student_depth}"
    steps = (
        [f"{shape} on the labels alone (no KD)"]
        if student == "student_nokd"
        else [
            f"KD (T={d.temperature}, alpha={d.alpha}{f', hint {d.hint_weight}' if d.hint_weight else ''}) into {shape}"
        ]
    )
    if student == "student_pruned":
        steps.append(f"{params.prune.method} pruning {params.prune.sparsity:.0%}")
    if runtime == "int8":
        steps.append(
            f"int8 {q.backend} ({q.calibration_method} calibration, "
            f"{'per-channel' if q.per_channel else 'per-tensor'}, budget {q.max_accuracy_drop}, fastest of "
            f"{'/'.join(q.formats) if q.backend == 'onnx' else q.backend})"
        )
    else:
        steps.append("ONNX Runtime fp32")
    return " → ".join(steps)


def compression_notes(prune_report: Path | None, quantize_report: Path | None) -> list[str]:
    """What the compression steps said about themselves, for the report and the model card."""
    notes = []
    if prune_report is not None:
        report = read_json(prune_report)
        notes.append(f"pruning ({report['method']}, {report['requested_sparsity']:.0%}): {report.get('note', '')}")
    if quantize_report is not None:
        info = read_json(quantize_report)
        for name, record in info["candidates"].items():
            if record.get("runtime") != "int8":
                continue
            if record.get("error"):
                notes.append(f"{name}: no int8 candidate: {record['error']}")
            else:
                notes.append(f"{name}: {_int8_note(record)}")
        if info["teacher"].get("error"):
            notes.append(f"teacher int8 not shown: {info['teacher']['error']}")
        elif info["teacher"]:
            notes.append(f"teacher.int8: {_int8_note(info['teacher'])}")
    return notes


def _int8_note(record: dict) -> str:
    """The int8 record in one line: the remedy and why, the format kept, and whether int8 pays here."""
    note = f"remedy `{record.get('remedy')}`: {record.get('reason')}"
    if "speedup_b1" in record:
        note += (
            f"; kept {record.get('format') or record.get('backend')}: {record['speedup_b1']:.2f}× fp32's speed at "
            f"batch 1, {record['speedup_b256']:.2f}× at batch 256"
        )
    if record.get("speed_note"):
        note += f". {record['speed_note']}"
    return note
