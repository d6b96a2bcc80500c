"""The select stage: the product is chosen among the run's candidates by the policy in params (never assumed).

The policy itself is `tasks/candidates.py:select_product`; this stage reads
the evaluation table, the teacher's validation accuracy and the validation
split's class counts, and writes the choice and why to `reports/selection.json`.
"""

from __future__ import annotations

from pathlib import Path

from distilflow.io import read_json, write_json
from distilflow.params import SelectParams
from distilflow.records import StageResult
from tasks.candidates import dominated, majority_macro_f1, select_product
from tasks.registry.card import selection_markdown


def select_stage(
    compression_json: Path, teacher_metrics: Path, split_report: Path, selection: Path, cfg: SelectParams
) -> StageResult:
    """Apply `select:` to every candidate on the validation split; write the pick (or why there is none)."""
    rows = [r for r in read_json(compression_json) if isinstance(r.get("candidate"), str) and r["candidate"]]
    teacher_val = float(read_json(teacher_metrics)["val.accuracy"])
    majority = majority_macro_f1(read_json(split_report)["class_counts"]["val"])
    result = select_product(rows, teacher_val, majority, cfg)
    result |= {"teacher_val_accuracy": teacher_val, "majority_macro_f1": majority, "params": cfg.model_dump()}
    if result["pick"] is not None:
        result["dominated_by"] = dominated(result["pick"], result["verdicts"])
    write_json(result, selection)
    pick = result["pick"]
    metrics = {"candidates": len(result["verdicts"]), "feasible": sum(v["feasible"] for v in result["verdicts"])}
    if pick is not None:
        metrics |= {
            "product.val_accuracy": pick["val_accuracy"],
            "product.test_accuracy": pick["test_accuracy"],
            "product.latency_b1_ms": pick["latency_b1_ms"],
            "product.size_bytes": pick["size_bytes"],
        }
    return StageResult(
        metrics=metrics,
        params=cfg.model_dump(mode="json"),
        tags={"product": pick["variant"] if pick else "none", "selection.reason": result["reason"][:500]},
        texts={"selection.md": selection_markdown(result)},
        info=result,
    )
