"""The pipeline flow: wiring only. Each line is one node of the DAG."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from distilflow.layout import Layout
from distilflow.params import Params
from distilflow.records import StageResult
from distilflow.tracking import Tracker, git_commit
from tasks.data import clean_task, ingest_task, normalize_task, split_task


def run_stage(task, **kwargs) -> tuple[StageResult, bool]:
    """Run a task; if its cache hit points at files since changed, run it afresh."""
    state = task(**kwargs, return_state=True)
    result = state.result()
    cached = state.name == "Cached"
    if cached and not result.outputs_intact():
        result, cached = task.with_options(refresh_cache=True)(**kwargs), False
    return result, cached


@flow(name="distilflow-pipeline", log_prints=True)
def pipeline(params: Params, root: str, tracking_uri: str) -> dict:
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

    return {
        "run_id": parent.run_id,
        "experiment_id": parent.experiment_id,
        "stages": stages,
        "split_hashes": split.info["hashes"],
        "preprocessor": str(layout.preprocessor),
        "classes": normalized.info["classes"],
    }
