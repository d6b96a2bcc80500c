"""The register step of a pipeline run or a search: the product and its fp32 references, with the model card.

`register_run` holds the model's registry lock (given by the caller: the
wiring owns Prefect, flows/locks.py) and a child run named `register`, and
registers all or nothing (tasks/registry/registration.py). Not a cached
stage: each run decides afresh, and an unchanged model is detected by
content.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager

from distilflow.errors import DistilflowError
from distilflow.io import read_json, write_text
from distilflow.tracking import GIT_COMMIT_TAG
from tasks.registry.card import compression_notes, model_card, recipe
from tasks.registry.packaging import raw_example
from tasks.registry.registration import Variant, register_variants


class NotRegistered(DistilflowError):
    """The run built no model worth registering: the selection policy refused every candidate."""


def pipeline_variants(params, layout, table: list[dict], selection: dict) -> list[Variant]:
    """The product (the candidate the select stage picked) plus the fp32 teacher and KD student for reference."""
    rows = {r["variant"]: r for r in table}
    name = params.registered_model()
    pick = selection["pick"]
    if pick is None:
        raise NotRegistered(f"nothing registered: {selection['reason']}")
    return [
        Variant(name, layout.candidates / pick["candidate"], rows[pick["variant"]], "product"),
        Variant(f"{name}-teacher", layout.teacher, rows["teacher fp32"], "reference"),
        Variant(f"{name}-student", layout.student, rows["student fp32 (KD)"], "reference"),
    ]


def register_run(params, layout, tracker, parent, lineage: dict, lock: AbstractContextManager) -> dict:
    """Register the run's product under `lock` in a child run of `parent`; what the run's summary shows of it."""
    with lock, tracker.stage_run(parent, "register", lineage) as child:
        result = register_stage(tracker, child, params, layout, {**lineage, "parent_run_id": parent.run_id})
    state = "unchanged, kept" if result["unchanged"] else "registered as @challenger"
    print(f"register: {result['model']} version {result['product']} {state}")
    parent.set_tags({"registered_version": f"{result['model']}/{result['product']}"})
    return {k: result[k] for k in ("model", "unchanged", "versions")} | {"version": result["product"]}


def teacher_provenance(layout) -> dict[str, str]:
    """Where the teacher's pretrained weights came from (the teacher's arch.json): version tags of every model
    the run registers, since the product learned from that teacher. A backbone trained from scratch has no
    `teacher.weights.*` tags, only `teacher.backbone`."""
    arch = read_json(layout.teacher / "arch.json")
    weights = arch.get("weights") or {}
    tags = {"teacher.backbone": str(arch.get("source") or arch.get("kind"))}
    tags |= {f"teacher.weights.{k}": str(weights[k]) for k in ("package", "version", "sha256") if k in weights}
    return tags


def _int8_of(candidate: str, notes: list[str]) -> str:
    """The card's int8 line: the product's own int8 record, or why the product is its student's fp32 runtime."""
    student, _, runtime = candidate.partition(".")
    own = next((n for n in notes if n.startswith(f"{student}.int8")), None)
    if runtime == "int8":
        return own or "int8"
    return f"the product is the fp32 runtime; its int8 twin: {own}" if own else "the product is not quantized"


def register_stage(tracker, run, params, layout, lineage: dict[str, str]) -> dict:
    """Build the card and tags from the run's own reports, then register all variants (all or nothing).

    The register run carries the params that produced the models and the
    product's numbers, so MLflow's "compare versions" view shows them.
    """
    table = read_json(layout.compression_json)
    selection = read_json(layout.selection)
    variants = pipeline_variants(params, layout, table, selection)
    notes = compression_notes(
        layout.prune_report if params.prune.enabled else None,
        layout.quantize_report,
    )
    pick = selection["pick"]
    quantize_note = _int8_of(pick["candidate"], notes)
    split = read_json(layout.split_report)
    pre = read_json(layout.preprocessor)
    card_lineage = {**lineage, "git_commit": lineage.get(GIT_COMMIT_TAG, "unknown"), **teacher_provenance(layout)}
    card = model_card(
        params.registered_model(),
        params,
        card_lineage,
        read_json(layout.cleaning_report),
        split,
        table,
        selection,
        quantize_note,
        read_json(layout.baseline_report)["models"] if params.evaluate.baseline else None,
    )
    write_text(card, layout.model_card)
    run.log_artifact(layout.model_card)
    run.log_artifact(layout.selection)
    for found_by in ("search.md", "search_pareto.png") if lineage.get("search.study") else ():
        if (layout.reports / found_by).exists():  # what the card's "Found by search" links to
            run.log_artifact(layout.reports / found_by)
    example = raw_example(layout.resolve(params.data.source), layout.split("test"), pre["feature_columns"])
    tags = {
        **{k: v for k, v in lineage.items() if not k.startswith("mlflow.")},
        "git_commit": lineage.get(GIT_COMMIT_TAG, "unknown"),
        **{f"split_hash.{k}": v for k, v in split["hashes"].items()},
        "parent_run_id": lineage.get("parent_run_id", ""),
        "compression_recipe": recipe(params, pick["candidate"]),
        "dataset": params.data.dataset_name,
        "classes": json.dumps([str(c) for c in pre["classes"]]),
        "selection.reason": selection["reason"][:4000],
        **teacher_provenance(layout),
    }
    product = variants[0].metrics
    run.log_params(params.model_dump(mode="json"))
    run.log_metrics(
        {
            "test.accuracy": product["accuracy"],
            "test.macro_f1": product["macro_f1"],
            "val.accuracy": product["val_accuracy"],
            "size_bytes": product["file_bytes"],
            "latency_b1_ms": product["latency_b1_median_ms"],
            "latency_b256_ms": product["latency_b256_median_ms"],
        }
    )
    run.set_tags({"product": str(product["variant"]), "mlflow.note.content": card.split("\n## ")[0]})
    registered = register_variants(tracker, run, variants, layout.preprocessor, example, tags, card)
    return {
        **registered,
        "model": params.registered_model(),
        "card": str(layout.model_card),
        "product": registered["product"],
        "variant": product["variant"],
    }
