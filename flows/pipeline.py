"""The pipeline flow: wiring only. Each line is one node of the DAG."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from distilflow.errors import DistilflowError
from distilflow.hashing import path_hash
from distilflow.layout import Layout
from distilflow.params import Params
from distilflow.records import StageResult
from distilflow.tracking import STAGE_TAG, Tracker, git_commit
from flows.common import run_stage
from flows.pretrain import pretrain, pretrain_fingerprint
from tasks.data import SPLITS, clean_task, ingest_task, normalize_task, split_task
from tasks.distill import distill_task
from tasks.evaluate import evaluate_task
from tasks.finetune import finetune_task, transfer_gain_task
from tasks.prune import prune_task
from tasks.quantize import quantize_task
from tasks.registry import CHALLENGER, register_task


def model_inputs(layout: Layout) -> list[Path]:
    """What every model stage reads (tasks/finetune.py:load_splits), hence part of its cache key."""
    return [layout.split(name) for name in SPLITS] + [layout.preprocessor]


def ensure_backbone(params: Params, tracker: Tracker, root: str) -> str | None:
    """An identity of the backbone's weights for cache keys (registered version, or file content).

    The demo's own pretrained model is (re)built by the pretrain flow when it is
    missing or was built from other `pretrain` params. A hub id is not pinned:
    its identity is the spec alone.
    """
    spec = params.backbone.spec
    kind, _, ref = spec.partition(":")
    if kind in ("file", "hf"):
        return f"{spec}#{path_hash(Path(ref))}" if Path(ref).exists() else spec
    if kind != "mlflow":
        return None
    mv = tracker.model_version(ref)
    if ref.startswith(f"models:/{params.pretrain.registered_model}@") and (
            mv is None or mv.tags.get("pretrain_fingerprint") != pretrain_fingerprint(params)):
        pretrain(params=params, root=root, tracking_uri=tracker.uri)
        mv = tracker.model_version(ref)
    if mv is None:
        raise DistilflowError(f"backbone.spec {spec}: no such registered model version in {tracker.uri}")
    return f"{mv.name}/{mv.version}"


def compress(params: Params, layout: Layout, data: list[Path], stage, parent) -> dict:
    """distill → (prune) → (quantize) → evaluate, wired; returns what the summary reports."""
    student = stage("distill", distill_task, teacher=layout.teacher, data=data, params=params.distill,
                    seed=params.seed, layout=layout)
    parent.log_metrics({f"student.{k}": v for k, v in student.metrics.items()})
    variants = {"teacher fp32": layout.teacher, "student fp32 (KD)": layout.student,
                "student fp32 (no KD)": layout.student_nokd}
    notes, source = [], layout.student
    if params.prune.enabled:
        pruned = stage("prune", prune_task, student=layout.student, teacher=layout.teacher, data=data,
                       params=params.prune, distill_params=params.distill, seed=params.seed, layout=layout)
        variants["student pruned fp32"] = source = layout.student_pruned
        notes.append(f"pruning ({params.prune.method}, {params.prune.sparsity:.0%}): {pruned.info.get('note', '')}")
    if params.quantize.enabled:
        quant = stage("quantize", quantize_task, source=source, teacher=layout.teacher, data=data,
                      params=params.quantize, seed=params.seed, threads=params.evaluate.threads, layout=layout)
        variants["student int8"] = layout.int8("student", params.quantize.backend)
        notes.append(f"student int8: remedy `{quant.info['remedy']}`: {quant.info['reason']}")
        if quant.info["teacher_error"]:
            notes.append(f"teacher int8 not shown: {quant.info['teacher_error']}")
        else:
            variants["teacher int8"] = layout.int8("teacher", params.quantize.backend)
    evaluated = stage("evaluate", evaluate_task, variants=variants, data=data,
                      threads=params.evaluate.threads, repeats=params.evaluate.repeats, notes=notes, layout=layout)
    parent.log_metrics(evaluated.metrics)
    for path in evaluated.artifacts:
        parent.log_artifact(path)
    return {"kd_gain": student.info["kd_gain"], "compression": evaluated.info["table"], "notes": notes}


def register(params: Params, layout: Layout, tracker: Tracker, parent, lineage: dict, summary: dict) -> dict:
    """The register stage: a child run holding the registered models, under the model's registry lock."""
    from flows.registry import registry_lock

    quantize_note = next((n for n in summary["notes"] if n.startswith("student int8")), "not quantized")
    with registry_lock(tracker, params.registered_model(), params.registry.lock_timeout_s):
        with tracker.run("", "register", tags={STAGE_TAG: "register", **lineage}, parent=parent) as child:
            result = register_task(tracker, child, params, layout, {**lineage, "parent_run_id": parent.run_id},
                                    summary["compression"], quantize_note)
    state = "unchanged, kept" if result["unchanged"] else f"registered as @{CHALLENGER}"
    print(f"register: {result['model']} version {result['product']} {state}")
    parent.set_tags({"registered_version": f"{result['model']}/{result['product']}"})
    return {"model": result["model"], "version": result["product"], "unchanged": result["unchanged"],
            "versions": result["versions"]}


@flow(name="distilflow-pipeline", log_prints=True)
def pipeline(params: Params, root: str, tracking_uri: str, stop_after: str | None = None) -> dict:
    """Run every stage, or those up to and including `stop_after` (e.g. "normalize")."""
    layout = Layout(root)
    tracker = Tracker(tracking_uri, layout.root)
    lineage = {"git_commit": git_commit(layout.root), "params_hash": params.hash()}
    stages: dict[str, str] = {}
    run_name = f"{params.data.dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}"

    with tracker.run(params.experiment_name(), run_name, tags=lineage) as parent:
        parent.log_params(params.model_dump(mode="json"))
        parent.log_dict(params.model_dump(mode="json"), "params.effective.json")

        def stage(name: str, task, **kwargs) -> StageResult:
            result, cached = run_stage(task, **kwargs)
            stages[name] = "cached" if cached else "ran"
            tracker.log_stage(parent, name, result, cached, lineage)
            print(f"{name}: {stages[name]}")
            return result

        ingested = stage("ingest", ingest_task, source=layout.resolve(params.data.source), data=params.data, layout=layout)
        lineage["data_md5"] = ingested.tags["data_md5"]
        parent.set_tags(lineage)
        cleaned = stage("clean", clean_task, ingested=layout.ingested, clean_params=params.clean, data=params.data,
                        min_per_class=params.split.n_parts, layout=layout)
        split = stage("split", split_task, cleaned=layout.cleaned, split=params.split, seed=params.seed, layout=layout)
        parent.set_tags(split.tags)
        normalized = stage("normalize", normalize_task, train=layout.split("train"), method=params.normalize.method,
                           image_shape=params.data.image_shape, layout=layout)
        parent.log_metrics({"rows_clean": cleaned.info["rows_out"], **split.metrics})
        summary = {"run_id": parent.run_id, "experiment_id": parent.experiment_id, "stages": stages,
                   "split_hashes": split.info["hashes"], "classes": normalized.info["classes"]}
        if stop_after != "normalize":
            source_version = ensure_backbone(params, tracker, str(layout.root))
            data = model_inputs(layout)
            common = dict(data=data, backbone=params.backbone, train=params.train, seed=params.seed,
                          image_shape=params.data.image_shape, source_version=source_version,
                          tracking_uri=tracking_uri, layout=layout)
            teacher = stage("finetune", finetune_task, **common)
            parent.log_metrics({f"teacher.{k}": v for k, v in teacher.metrics.items() if k.startswith("test.")})
            summary["teacher"] = teacher.metrics
            if params.transfer.enabled and source_version is not None:
                gain = stage("transfer_gain", transfer_gain_task, transfer=params.transfer, **common)
                parent.log_metrics(gain.metrics)
                summary["transfer_gain"] = gain.info["gains"]
            if params.distill.enabled:
                summary |= compress(params, layout, data, stage, parent)
                if params.registry.enabled:
                    summary["registered"] = register(params, layout, tracker, parent, lineage, summary)
                    stages["register"] = "unchanged" if summary["registered"]["unchanged"] else "ran"

    return summary
