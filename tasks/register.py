"""The register stage: the run's product and fp32 references, registered all or nothing, with the model card.

Not a cached stage: each run decides afresh, and an unchanged model is
detected by content (tasks/registry/registration.py).
"""

from __future__ import annotations

from distilflow.io import read_json, write_text
from distilflow.tracking import GIT_COMMIT_TAG
from tasks.registry.card import compression_notes, model_card, recipe
from tasks.registry.packaging import raw_example
from tasks.registry.registration import Variant, register_variants


def pipeline_variants(params, layout, table: list[dict]) -> list[Variant]:
    """The product (the end of the compression chain) plus the fp32 teacher and student for reference."""
    rows = {r["variant"]: r for r in table}
    name = params.registered_model()
    if params.quantize.enabled:
        product = (layout.student_int8, rows["student int8"])
    elif params.prune.enabled:
        product = (layout.student_pruned, rows["student pruned fp32"])
    else:
        product = (layout.student, rows["student fp32 (KD)"])
    return [
        Variant(name, product[0], product[1], "product"),
        Variant(f"{name}-teacher", layout.teacher, rows["teacher fp32"], "reference"),
        Variant(f"{name}-student", layout.student, rows["student fp32 (KD)"], "reference"),
    ]


def register_stage(tracker, run, params, layout, lineage: dict[str, str]) -> dict:
    """Build the card and tags from the run's own reports, then register all variants (all or nothing).

    The register run carries the params that produced the models and the
    product's numbers, so MLflow's "compare versions" view shows them.
    """
    table = read_json(layout.compression_json)
    notes = compression_notes(
        layout.prune_report if params.prune.enabled else None,
        layout.quantize_report if params.quantize.enabled else None,
    )
    quantize_note = next((n for n in notes if n.startswith("student int8")), "not quantized")
    split = read_json(layout.split_report)
    card = model_card(
        params.registered_model(),
        params,
        lineage,
        read_json(layout.cleaning_report),
        split,
        table,
        recipe(params),
        quantize_note,
    )
    write_text(card, layout.model_card)
    run.log_artifact(layout.model_card)
    pre = read_json(layout.preprocessor)
    example = raw_example(layout.resolve(params.data.source), layout.split("test"), pre["feature_columns"])
    tags = {
        **{k: v for k, v in lineage.items() if not k.startswith("mlflow.")},
        "git_commit": lineage.get(GIT_COMMIT_TAG, "unknown"),
        **{f"split_hash.{k}": v for k, v in split["hashes"].items()},
        "parent_run_id": lineage.get("parent_run_id", ""),
        "compression_recipe": recipe(params),
        "dataset": params.data.dataset_name,
    }
    variants = pipeline_variants(params, layout, table)
    product = variants[0].metrics
    run.log_params(params.model_dump(mode="json"))
    run.log_metrics(
        {
            "test.accuracy": product["accuracy"],
            "test.macro_f1": product["macro_f1"],
            "size_bytes": product["file_bytes"],
            "latency_b1_ms": product["latency_b1_median_ms"],
            "latency_b256_ms": product["latency_b256_median_ms"],
        }
    )
    run.set_tags({"product": str(product["variant"]), "mlflow.note.content": card.split("\n## ")[0]})
    registered = register_variants(tracker, run, variants, layout.preprocessor, example, tags, card)
    return {**registered, "model": params.registered_model(), "card": str(layout.model_card)}
