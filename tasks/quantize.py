"""The quantize stage: every student as a product candidate, in ONNX Runtime fp32 and (within budget) int8.

The int8 work is tasks/quantization/ (backends, QAT, the fallback policy);
this module is the stage's I/O: it loads the students and the teacher, writes
`candidates/<student>.<fp32|int8>/` with the quantization record beside each
int8 model (as optimum does), and the report.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch import nn

from distilflow.errors import DistilflowError
from distilflow.io import atomic_dir, write_json
from distilflow.params import QuantizeParams
from distilflow.records import StageResult
from tasks.backbones import load_classifier
from tasks.dataset import load_splits
from tasks.inference import MODEL_FILE
from tasks.onnx_export import export_ort_fp32
from tasks.quantization.policy import BACKENDS, quantize_int8

RECORD_FILE = "quantization.json"  # the quantization config and its record, beside the model (as optimum does)
TIMINGS = ("seconds", "latency_ms", "speedup_b1", "speedup_b256", "pays", "speed_note")  # in the report only


def _int8_into(
    folder: Path, model: nn.Module, Xtr, ytr, Xva, yva, cfg: QuantizeParams, seed: int, threads: int, work: Path
) -> dict:
    """int8 of `model` into `folder` (model + record); over budget, the folder holds only the record."""
    suffix = BACKENDS[cfg.backend].suffix
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _, record = quantize_int8(
            model,
            Xtr,
            Xva,
            yva,
            cfg,
            work,
            out_path=folder / f"{MODEL_FILE}{suffix}",
            X_train=Xtr,
            y_train=ytr,
            seed=seed,
            threads=threads,
        )
    except DistilflowError as exc:
        record = {"error": str(exc)}
    # no timings in the folder: its content (hence every key and hash downstream) depends on the model alone
    kept = {k: v for k, v in record.items() if k not in TIMINGS}
    write_json({"config": cfg.model_dump(mode="json"), **kept}, folder / RECORD_FILE)
    return record


def quantize_stage(
    train: Path,
    val: Path,
    test: Path,
    preprocessor: Path,
    student: Path,
    student_nokd: Path,
    student_pruned: Path | None,
    teacher: Path,
    candidates: Path,
    teacher_int8: Path,
    quantize_report: Path,
    cfg: QuantizeParams,
    seed: int,
    threads: int,
) -> StageResult:
    """Every student as a product candidate: ONNX Runtime fp32 and (when `quantize.enabled`) int8 within budget.

    `candidates/<student>.<fp32|int8>/` each hold one runtime of one student
    (the KD student, its no-KD twin, the pruned student); the select stage
    chooses among them. A student whose int8 misses the accuracy budget
    after every remedy simply has no int8 candidate (its record says why).
    The teacher's int8 is written for reference, for the comparison table.
    """
    pre, data = load_splits(train, val, test, preprocessor)
    (Xtr, ytr), (Xva, yva) = data["train"], data["val"]
    n = len(pre["classes"])
    students = {"student": student, "student_nokd": student_nokd, "student_pruned": student_pruned}
    records: dict = {}
    with tempfile.TemporaryDirectory() as work, atomic_dir(candidates) as out:
        for name, folder in students.items():
            if folder is None:
                continue
            model = load_classifier(folder, n)[0]
            fp32 = out / f"{name}.fp32"
            fp32.mkdir()
            export_ort_fp32(model, Xtr[:2], fp32 / f"{MODEL_FILE}.onnx")
            records[f"{name}.fp32"] = {"source": str(folder), "runtime": "ORT fp32"}
            if cfg.enabled:
                int8 = _int8_into(
                    out / f"{name}.int8", model, Xtr, ytr, Xva, yva, cfg, seed, threads, Path(work) / name
                )
                records[f"{name}.int8"] = {"source": str(folder), "runtime": "int8", **int8}
        with atomic_dir(teacher_int8) as tmp:
            teacher_record = (
                _int8_into(
                    tmp, load_classifier(teacher, n)[0], Xtr, ytr, Xva, yva, cfg, seed, threads, Path(work) / "teacher"
                )
                if cfg.enabled and cfg.teacher
                else {"error": "quantize.enabled=false" if not cfg.enabled else "quantize.teacher=false"}
            )
    info = {"candidates": records, "teacher": teacher_record, "student": records.get("student.int8", {})}
    write_json(info, quantize_report)
    kd_int8 = records.get("student.int8", {})
    return StageResult(
        metrics={f"{name}.{k}": v for name, r in records.items() for k, v in _headline(r).items()}
        | {f"teacher.{k}": v for k, v in _headline(teacher_record).items()},
        params=cfg.model_dump(mode="json"),
        tags={"quantize.remedy": str(kd_int8.get("remedy")), "quantize.reason": str(kd_int8.get("reason", ""))[:500]},
        texts={"quantize_record.json": json.dumps(info, indent=2, default=str)},
        info={"candidates": sorted(records), "teacher_error": teacher_record.get("error")},
    )


def _headline(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
