"""The pipeline flow: wiring only. The DAG is distilflow/stages.py; this runs it and tracks it in MLflow."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow
from pydantic import SecretStr

from distilflow.io import restored_on_failure
from distilflow.layout import Layout
from distilflow.locks import file_lock
from distilflow.params import Params
from distilflow.stages import stages_for, upstream
from distilflow.tracking import Tracker, lineage_tags, run_name
from flows.stages import run_task
from tasks.splits import SPLITS

RUN_LOCK = ".distilflow/run.lock"


def register(params: Params, layout: Layout, tracker: Tracker, parent, lineage: dict) -> dict:
    """The register step: a child run holding the registered models, under the model's registry lock."""
    from flows.registry import registry_lock
    from tasks.register import register_stage

    with (
        registry_lock(tracker, params.registered_model(), params.registry.lock_timeout_s),
        tracker.stage_run(parent, "register", lineage) as child,
    ):
        result = register_stage(tracker, child, params, layout, {**lineage, "parent_run_id": parent.run_id})
    state = "unchanged, kept" if result["unchanged"] else "registered as @challenger"
    print(f"register: {result['model']} version {result['product']} {state}")
    parent.set_tags({"registered_version": f"{result['model']}/{result['product']}"})
    return {
        "model": result["model"],
        "version": result["product"],
        "unchanged": result["unchanged"],
        "versions": result["versions"],
    }


@flow(name="distilflow-pipeline", log_prints=True)
def pipeline(
    params: Params,
    root: str,
    tracking_uri: str | SecretStr,
    stop_after: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Run every stage the params switch on, or those up to and including `stop_after` (e.g. "normalize").

    One run per project at a time (`run_lock`), and all or nothing: if any stage
    fails, every output is put back as it was before the run.
    """
    layout = Layout(root)
    with project_transaction(params, layout, stages_for(params, stop_after)):
        summary = _pipeline(params, layout, tracking_uri, stop_after, overrides)
    if summary.get("refused"):  # every output is kept and the runs are closed: say, in one line, why nothing ships
        from tasks.register import NotRegistered

        raise NotRegistered(f"nothing registered: {summary['refused']}")
    return summary


def _pipeline(
    params: Params, layout: Layout, tracking_uri: str | SecretStr, stop_after: str | None, overrides: list[str] | None
) -> dict:
    from tasks.registry.recovery import kill_dead_runs

    tracker = Tracker(tracking_uri, layout.root)
    for run_id in kill_dead_runs(tracker):  # runs a crashed process left RUNNING (this machine's)
        print(f"recovered: marked MLflow run {run_id} KILLED (its process is gone)")
    lineage = lineage_tags(layout.root, params)

    with tracker.run(params.experiment_name(), run_name(params, overrides), tags=lineage) as parent:
        tracker.describe_parent(parent, params, overrides, stop_after, prefect_flow_run())
        results, stages = run_stages(stages_for(params, stop_after), params, layout, tracker, parent, lineage)
        parent.set_tags(
            {
                **lineage,
                **(results["split"].tags if "split" in results else {}),
                "distilflow.cached_stages": ",".join(n for n, s in stages.items() if s == "cached") or "-",
            }
        )
        summary = summarize(parent, results, stages)
        refused = "select" in results and results["select"].info["pick"] is None
        if refused:
            parent.set_tags({"registration": "refused", "selection.reason": results["select"].info["reason"][:4000]})
        elif "select" in results and params.registry.enabled:
            summary["registered"] = register(params, layout, tracker, parent, lineage)
            stages["register"] = "unchanged" if summary["registered"]["unchanged"] else "ran"
    if refused:
        summary["refused"] = results["select"].info["reason"]
    return summary


@contextmanager
def project_transaction(params: Params, layout: Layout, stages: list) -> Iterator[None]:
    """The project's run lock (`run_lock`), and every output of `stages` put back as it was if the block fails."""
    outputs = [layout.path(name) for stage in stages for name in stage.outs.values()]
    with (
        file_lock(
            layout.root / RUN_LOCK,
            params.run_lock.timeout_s,
            f"project {layout.root}",
            "another run",
            "run_lock.on_busy / run_lock.timeout_s",
            wait=params.run_lock.on_busy == "wait",
        ),
        restored_on_failure(outputs + [layout.path("model_card")], layout.root / ".distilflow"),
    ):
        yield


def run_stages(stages: list, params: Params, layout: Layout, tracker: Tracker, parent, lineage: dict):
    """Run `stages` in order as Prefect tasks (edges drawn), each recorded as a child run of `parent`.

    Returns ({stage: StageResult}, {stage: "ran" | "cached"}); adds the data's md5 to `lineage`.
    """
    results, ran, states = {}, {}, {}
    for stage in stages:
        runtime = {"tracker": tracker, "root": str(layout.root)} if stage.name == "backbone" else {}
        wait_for = [states[name] for name in upstream(stage, params) if name in states]
        result, cached, states[stage.name] = run_task(stage, params, layout, wait_for=wait_for, **runtime)
        results[stage.name], ran[stage.name] = result, "cached" if cached else "ran"
        tracker.record_stage(parent, stage.name, result, cached, lineage)
        if stage.name == "ingest":
            lineage["data_md5"] = result.tags["data_md5"]
        if stage.name == "split":
            tracker.log_dataset(parent, {s: layout.path(s) for s in SPLITS}, params.data.dataset_name)
        print(f"{stage.name}: {ran[stage.name]}")
    return results, ran


def prefect_flow_run() -> dict[str, str]:
    """This flow run's id, name and UI link (no link on a temporary API, which serves no UI)."""
    from prefect.runtime import flow_run

    from distilflow.redact import redact

    url = flow_run.ui_url
    if url and not os.environ.get("PREFECT_API_URL"):  # the temporary API: no UI answers at that address
        url = None
    return {"id": str(flow_run.id or ""), "name": str(flow_run.name or ""), "url": redact(url) if url else ""}


def summarize(parent, results: dict, stages: dict) -> dict:
    """What the CLI prints and the parent run shows: the headline numbers of each stage that ran."""
    summary = {"run_id": parent.run_id, "experiment_id": parent.experiment_id, "stages": stages}
    parent.log_metrics({"rows_clean": results["clean"].metrics["rows_out"], **results["split"].metrics})
    summary["split_hashes"] = results["split"].info["hashes"]
    summary["classes"] = results["normalize"].info["classes"]
    if "baseline" in results:
        summary["baseline"] = results["baseline"].info["models"]
        parent.log_metrics({f"baseline.{k}": v for k, v in results["baseline"].metrics.items()})
    if "finetune" in results:
        summary["teacher"] = results["finetune"].metrics
        parent.log_metrics({f"teacher.{k}": v for k, v in results["finetune"].metrics.items() if k.startswith("test.")})
    if "transfer_gain" in results:
        parent.log_metrics(results["transfer_gain"].metrics)
        summary["transfer_gain"] = results["transfer_gain"].info["gains"]
    if "distill" in results:
        parent.log_metrics({f"student.{k}": v for k, v in results["distill"].metrics.items()})
        summary["kd_gain"] = results["distill"].info["kd_gain"]
    if "evaluate" in results:
        parent.log_metrics(results["evaluate"].metrics)
        for path in results["evaluate"].artifacts:
            parent.log_artifact(path)
        summary["compression"] = results["evaluate"].info["table"]
        summary["notes"] = results["evaluate"].info["notes"]
    if "select" in results:
        summary["selection"] = results["select"].info
        parent.log_metrics({k: v for k, v in results["select"].metrics.items()})
        parent.set_tags(results["select"].tags)
        parent.log_text(results["select"].texts["selection.md"], "selection.md")
    return summary
