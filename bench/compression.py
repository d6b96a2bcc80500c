"""1. Compression: int8 student vs fp32 teacher, and int8 vs the best fp32 runtime of the same model.

One setting is a (teacher, student) pair plus the splits they were trained
on. Every variant is scored on the frozen test split by the project's one
evaluation harness (`tasks/evaluate.py:evaluate_variant`: accuracy, size on
disk, parameters), and timed here round-robin at batch 1 and 256 in this one
process (`bench.common.interleaved_timings`), so the ratios compare runs that
saw the same machine at the same moments.

fp32 runtimes of the same model: eager PyTorch, `torch.compile` (inductor)
and ONNX Runtime fp32; the int8 model is ONNX Runtime static QDQ
(`tasks/quantization/policy.py:quantize_int8`, the pipeline's defaults and remedies).
The teacher is quantized with the same recipe too, so "int8 vs the same
model in fp32" is measured on a small and on a bigger model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bench.common import check, in_ms, interleaved_timings

BATCHES = (1, 256)


def _compiled_predictor(model: torch.nn.Module):
    """torch.compile (inductor, CPU); compiled on first call per batch shape (timed apart as compile_s)."""
    compiled = torch.compile(model.eval())

    def predict(X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return compiled(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).float().numpy()

    return predict


def _quantize(model, data: dict, workdir: Path, name: str, seed: int, threads: int) -> tuple[Path, dict]:
    """`model` quantized by the pipeline's int8 recipe (defaults and remedies): the int8 ONNX file and its record."""
    from distilflow.params import QuantizeParams
    from tasks.quantization.policy import quantize_int8

    (Xtr, _), (Xva, yva) = data["train"], data["val"]
    return quantize_int8(
        model,
        Xtr,
        Xva,
        yva,
        QuantizeParams(),
        workdir / ("quantize" if name == "student" else f"quantize-{name}"),
        out_path=workdir / f"{name}.int8.onnx",
        seed=seed,
        threads=threads,
    )


def _variants(teacher, student, Xtr: np.ndarray, workdir: Path, int8_path: Path, teacher_int8_path: Path) -> dict:
    """Every variant of the setting: each model eager, as an fp32 ONNX file and as its int8 ONNX file."""
    from tasks.onnx_export import export_onnx

    files = {
        "teacher": export_onnx(teacher, Xtr[:2], workdir / "teacher.fp32.onnx"),
        "student": export_onnx(student, Xtr[:2], workdir / "student.fp32.onnx"),
    }
    return {
        "teacher fp32 eager": teacher,
        "teacher fp32 ORT": files["teacher"],
        "teacher int8 ORT": teacher_int8_path,
        "student fp32 eager": student,
        "student fp32 ORT": files["student"],
        "student int8 ORT": int8_path,
    }


def _add_compiled(student, Xte: np.ndarray, yte: np.ndarray, rows: dict, predictors: dict, record: dict) -> None:
    """The student under torch.compile, compiled at every timed batch size first; a failure is recorded, not fatal."""
    try:
        t0 = time.perf_counter()
        fn = _compiled_predictor(student)
        for bs in BATCHES:
            fn(Xte[:bs] if len(Xte) >= bs else np.resize(Xte, (bs, Xte.shape[1])))
        compiled_acc = float((fn(Xte).argmax(1) == yte).mean())
        predictors["student fp32 compiled"] = fn
        rows["student fp32 compiled"] = {
            **rows["student fp32 eager"],
            "variant": "student fp32 compiled",
            "accuracy": compiled_acc,
            "compile_s": time.perf_counter() - t0,
        }
    except Exception as exc:  # no C++ toolchain, unsupported op: recorded, not fatal
        record["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def _time_latencies(predictors: dict, rows: dict, Xte: np.ndarray, repeats: tuple[int, int]) -> None:
    """Every predictor at batch 1 and 256, round-robin in blocks; into each row as `latency_b{bs}_ms`."""
    for bs, reps in zip(BATCHES, repeats):
        batch = np.ascontiguousarray(np.resize(Xte, (bs, Xte.shape[1])), dtype=np.float32)
        timings = interleaved_timings({v: (lambda p=p, b=batch: p(b)) for v, p in predictors.items()}, reps)
        for v, t in timings.items():
            rows[v][f"latency_b{bs}_ms"] = in_ms(t)


def compare(
    name: str,
    teacher,
    student,
    data: dict,
    workdir: Path,
    int8_path: Path | None = None,
    threads: int = 2,
    repeats: tuple[int, int] = (100, 15),
    use_compile: bool = True,
    seed: int = 0,
    teacher_int8_path: Path | None = None,
    teacher_val_drop: float | None = None,
) -> dict:
    """All variants of one setting: accuracy and size from the harness, latency side by side, then the targets.

    `data`: {"train": (X, y), "val": (X, y), "test": (X, y)} as model input (normalised float32).
    `repeats`: timed calls at batch 1 and at batch 256 (after 3 warm-up rounds).
    """
    from tasks.evaluate import evaluate_variant, load_variant
    from tasks.inference import OnnxPredictor

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        Xte, yte = data["test"]
        record: dict = {"setting": name, "threads": threads, "test_rows": int(len(yte))}
        if teacher_val_drop is not None:  # the pipeline's own int8 teacher: its record's validation drop
            record["teacher_val_drop"] = teacher_val_drop
        if int8_path is None:
            t0 = time.perf_counter()
            int8_path, qrec = _quantize(student, data, workdir, "student", seed, threads)
            record["quantize"] = {
                "remedy": qrec["remedy"],
                "reason": qrec["reason"],
                "seconds": time.perf_counter() - t0,
            }
        if teacher_int8_path is None:  # the same int8 recipe on the bigger model: where int8 does pay, or not
            teacher_int8_path, trec = _quantize(teacher, data, workdir, "teacher", seed, threads)
            record["quantize_teacher"] = {"remedy": trec["remedy"], "reason": trec["reason"]}
            record["teacher_val_drop"] = trec["accuracy_drop"]
        variants = _variants(teacher, student, data["train"][0], workdir, int8_path, teacher_int8_path)
        rows = {v: evaluate_variant(v, m, Xte, yte, threads=threads, latency_batches=()) for v, m in variants.items()}
        predictors = {
            v: (OnnxPredictor(m, threads) if isinstance(m, Path) else load_variant(m, threads)[0])
            for v, m in variants.items()
        }
        if use_compile:
            _add_compiled(student, Xte, yte, rows, predictors, record)
        _time_latencies(predictors, rows, Xte, repeats)
    finally:
        torch.set_num_threads(previous)
    record["variants"] = [
        {k: r[k] for k in ("variant", "accuracy", "file_bytes", "parameters") if k in r}
        | {k: v for k, v in r.items() if k.startswith("latency") or k == "compile_s"}
        for r in rows.values()
    ]
    record["targets"], record["ratios"] = _targets(name, rows, record.get("teacher_val_drop"))
    return record


def _best(rows: dict, prefix: str, bs: int) -> tuple[str, float]:
    """The fastest fp32 runtime of a model at one batch size (name, median ms)."""
    fp32 = {v: r[f"latency_b{bs}_ms"]["median"] for v, r in rows.items() if v.startswith(prefix) and "fp32" in v}
    best = min(fp32, key=fp32.get)
    return best, fp32[best]


def _targets(name: str, rows: dict, val_drop: float | None = None) -> tuple[list[dict], dict]:
    int8 = rows["student int8 ORT"]
    teacher, student_eager, student_ort = (
        rows["teacher fp32 eager"],
        rows["student fp32 eager"],
        rows["student fp32 ORT"],
    )
    ratios, targets = {}, []
    size_vs_teacher = teacher["file_bytes"] / int8["file_bytes"]
    targets.append(
        check(
            f"compression.{name}.size_vs_teacher",
            f"{name}: fp32 teacher size / int8 student size",
            size_vs_teacher,
            ">=",
            50,
        )
    )
    for bs in BATCHES:
        best_t, t_ms = _best(rows, "teacher", bs)
        speed = t_ms / int8[f"latency_b{bs}_ms"]["median"]
        ratios[f"speed_vs_teacher_b{bs}"] = {
            "vs": best_t,
            "ratio": speed,
            "vs_eager": teacher[f"latency_b{bs}_ms"]["median"] / int8[f"latency_b{bs}_ms"]["median"],
        }
        targets.append(
            check(
                f"compression.{name}.speed_vs_teacher_b{bs}",
                f"{name}: fastest fp32 teacher ({best_t}) / int8 student latency, batch {bs}",
                speed,
                ">=",
                10,
            )
        )
    targets.append(
        check(
            f"compression.{name}.drop_vs_teacher",
            f"{name}: accuracy drop, fp32 teacher → int8 student",
            100 * (teacher["accuracy"] - int8["accuracy"]),
            "<=",
            1.0,
            unit="pts",
        )
    )
    # same format on both sides of the size ratio: the fp32 ONNX file against the int8 ONNX file
    targets += _same_model_targets(
        name,
        rows,
        "student",
        ratios,
        size_note=f"fp32 state_dict {student_eager['file_bytes']:,} B, fp32 ONNX "
        f"{student_ort['file_bytes']:,} B, int8 ONNX {int8['file_bytes']:,} B, "
        f"{student_eager['parameters']:,} parameters",
    )
    # the teacher, a model big enough for int8 kernels to matter, against its own ORT fp32 (issue 17's targets)
    targets += _teacher_int8_targets(name, rows, ratios, val_drop)
    ratios["size_vs_teacher"] = size_vs_teacher
    return targets, ratios


# the teacher's int8 against its own ORT fp32: (batch, minimum speed-up)
TEACHER_INT8_SPEED = ((1, 1.5), (256, 2.0))


def _teacher_int8_targets(name: str, rows: dict, ratios: dict, val_drop: float | None) -> list[dict]:
    """Teacher int8 vs the teacher's ORT fp32 (the same graph, fp32): speed at batch 1 and 256, file size, and
    the validation accuracy it costs (the quantize record's; the test drop when no record is at hand)."""
    int8, ort, eager = rows["teacher int8 ORT"], rows["teacher fp32 ORT"], rows["teacher fp32 eager"]
    targets = []
    for bs, floor in TEACHER_INT8_SPEED:
        speed = ort[f"latency_b{bs}_ms"]["median"] / int8[f"latency_b{bs}_ms"]["median"]
        at_min = ort[f"latency_b{bs}_ms"]["min"] / int8[f"latency_b{bs}_ms"]["min"]
        ratios[f"teacher_speed_vs_ort_b{bs}"] = {"ratio": speed, "at_min": at_min}
        targets.append(
            check(
                f"compression.{name}.teacher_speed_vs_ort_b{bs}",
                f"{name}: teacher ORT fp32 / teacher int8 latency, batch {bs}",
                speed,
                ">=",
                floor,
                note=f"{at_min:.2f}x at the minimum latencies"
                + (" (fragile)" if (at_min >= floor) != (speed >= floor) else ""),
            )
        )
    targets.append(
        check(
            f"compression.{name}.teacher_size_vs_ort",
            f"{name}: teacher fp32 ONNX size / int8 ONNX size",
            ort["file_bytes"] / int8["file_bytes"],
            ">=",
            3.6,
            note=f"{eager['parameters']:,} parameters",
        )
    )
    drop, where = (val_drop, "validation") if val_drop is not None else (eager["accuracy"] - int8["accuracy"], "test")
    targets.append(
        check(
            f"compression.{name}.teacher_int8_drop",
            f"{name}: accuracy drop, fp32 teacher → int8 teacher ({where} split)",
            100 * drop,
            "<=",
            0.5,
            unit="pts",
        )
    )
    return targets


def _same_model_targets(name: str, rows: dict, model: str, ratios: dict, size_note: str) -> list[dict]:
    """int8 against the fastest fp32 runtime of the same model: speed at each batch size, ONNX size, accuracy drop.

    The student's ids and ratio keys are unprefixed (`speed_vs_same_b1`); the teacher's carry `teacher_`.
    """
    prefix = "" if model == "student" else f"{model}_"
    int8_label = "int8" if model == "student" else f"{model} int8"
    int8, eager, ort = rows[f"{model} int8 ORT"], rows[f"{model} fp32 eager"], rows[f"{model} fp32 ORT"]
    targets = []
    for bs in BATCHES:
        best, ms = _best(rows, model, bs)
        speed = ms / int8[f"latency_b{bs}_ms"]["median"]
        ratios[f"{prefix}speed_vs_same_b{bs}"] = {"vs": best, "ratio": speed}
        targets.append(
            check(
                f"compression.{name}.{prefix}speed_vs_same_b{bs}",
                f"{name}: fastest fp32 runtime of the {model} ({best}) / {int8_label}, batch {bs}",
                speed,
                ">=",
                2,
            )
        )
    targets.append(
        check(
            f"compression.{name}.{prefix}size_vs_same",
            f"{name}: {model} fp32 ONNX size / int8 ONNX size",
            ort["file_bytes"] / int8["file_bytes"],
            ">=",
            3.6,
            note=size_note,
        )
    )
    targets.append(
        check(
            f"compression.{name}.{prefix}drop_vs_same",
            f"{name}: accuracy drop, fp32 {model} → int8 {model}",
            100 * (eager["accuracy"] - int8["accuracy"]),
            "<=",
            0.3,
            unit="pts",
        )
    )
    return targets


def from_layout(name: str, root: Path, workdir: Path, **kw) -> dict:
    """A setting from a pipeline project's artifacts: the teacher, the KD student and its int8 candidate, plus
    the product the select stage shipped and the KD gain with all labels (where distillation must earn its keep
    like Hinton's setup, not only at low label budgets where the student also learns from unlabelled rows)."""
    from distilflow.io import read_json
    from distilflow.layout import Layout
    from tasks.backbones import load_classifier
    from tasks.dataset import load_splits
    from tasks.inference import int8_file

    layout = Layout(root)
    pre, data = load_splits(layout.train, layout.val, layout.test, layout.preprocessor)
    teacher, _ = load_classifier(layout.teacher, len(pre["classes"]))
    student, _ = load_classifier(layout.student, len(pre["classes"]))
    int8 = int8_file(layout.candidates / "student.int8") if (layout.candidates / "student.int8").is_dir() else None
    teacher_int8 = int8_file(layout.teacher_int8) if layout.teacher_int8.is_dir() else None
    quantized = read_json(layout.quantize_report)["teacher"] if layout.quantize_report.is_file() else {}
    record = compare(
        name,
        teacher.eval(),
        student.eval(),
        data,
        workdir,
        int8 if int8 and int8.suffix == ".onnx" else None,
        teacher_int8_path=teacher_int8 if teacher_int8 and teacher_int8.suffix == ".onnx" else None,
        teacher_val_drop=quantized.get("accuracy_drop"),
        **kw,
    )
    if layout.selection.is_file():
        selection = read_json(layout.selection)
        record["selection"] = {"pick": selection["pick"], "reason": selection["reason"]}
        if selection["pick"]:
            teacher_acc = next(
                r["accuracy"] for r in read_json(layout.compression_json) if r["variant"] == "teacher fp32"
            )
            record["targets"].append(
                check(
                    f"compression.{name}.product_drop",
                    f"{name}: teacher fp32 → shipped product ({selection['pick']['variant']}), test accuracy drop",
                    100 * (teacher_acc - selection["pick"]["test_accuracy"]),
                    "<=",
                    1.0,
                    unit="pts",
                    note="chosen on validation by select:, reported on test",
                )
            )
    if layout.student_metrics.is_file():
        gain = read_json(layout.student_metrics)["kd_gain"]["all"]
        record["kd_all_labels"] = gain
        record["targets"].append(
            check(
                f"compression.{name}.kd_gain_all_labels",
                f"{name}: KD student − the same student without KD, all labels, test accuracy",
                100 * gain["gain"],
                ">=",
                0.0,
                unit="pts",
                note=f"with KD {gain['kd']:.4f}, without {gain['no_kd']:.4f} (validation "
                f"{gain.get('kd_val', float('nan')):.4f} / {gain.get('no_kd_val', float('nan')):.4f})",
            )
        )
    return record
