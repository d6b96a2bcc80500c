"""The pipeline flow: wiring only. The DAG is distilflow/stages.py; this runs it as Prefect tasks, tracked in MLflow."""

from __future__ import annotations

from prefect import flow
from pydantic import SecretStr

from distilflow.layout import Layout
from distilflow.params import Params
from distilflow.project import project_transaction
from distilflow.stages import stages_for, upstream
from distilflow.tracking import Tracker, lineage_tags, run_name
from flows.locks import registry_lock
from flows.pretrain import ensure_pretrained
from flows.stages import run_task
from tasks.registry.recovery import kill_dead_runs
from tasks.registry.run import NotRegistered, register_run
from tasks.run_summary import parent_tags, refusal, summarize
from tasks.splits import SPLITS


@flow(name="distilflow-pipeline", log_prints=True)
def pipeline(
    params: Params,
    root: str,
    tracking_uri: str | SecretStr,
    stop_after: str | None = None,
    overrides: list[str] | None = None,
    prefect_ui: bool = False,
) -> dict:
    """Run every stage the params switch on, or those up to and including `stop_after` (e.g. "normalize").

    One run per project at a time (`run_lock`), and all or nothing: if any stage
    fails, every output is put back as it was before the run. `prefect_ui`: the
    API serves a UI (a Prefect server, not the temporary API), so the MLflow run links to it.
    """
    layout = Layout(root)
    with project_transaction(params, layout, stages_for(params, stop_after)):
        summary = _pipeline(params, layout, Tracker(tracking_uri, layout.root), stop_after, overrides, prefect_ui)
    if summary.get("refused"):  # every output is kept and the runs are closed: say, in one line, why nothing ships
        raise NotRegistered(f"nothing registered: {summary['refused']}")
    return summary


def _pipeline(params: Params, layout: Layout, tracker: Tracker, stop_after, overrides, prefect_ui: bool) -> dict:
    for run_id in kill_dead_runs(tracker):  # runs a crashed process left RUNNING (this machine's)
        print(f"recovered: marked MLflow run {run_id} KILLED (its process is gone)")
    lineage = lineage_tags(layout.root, params)
    with tracker.run(params.experiment_name(), run_name(params, overrides), tags=lineage) as parent:
        tracker.describe_parent(parent, params, overrides, stop_after, prefect_flow_run(prefect_ui))
        results, stages = run_stages(stages_for(params, stop_after), params, layout, tracker, parent, lineage)
        parent.set_tags(parent_tags(results, stages, lineage))
        summary = summarize(parent, results, stages)
        refused = refusal(results)
        if refused:
            parent.set_tags({"registration": "refused", "selection.reason": refused[:4000]})
            summary["refused"] = refused
        elif "select" in results and params.registry.enabled:
            summary["registered"] = register(params, layout, tracker, parent, lineage)
            stages["register"] = "unchanged" if summary["registered"]["unchanged"] else "ran"
    return summary


def register(params: Params, layout: Layout, tracker: Tracker, parent, lineage: dict) -> dict:
    """The register step (tasks/registry/run.py) under the model's registry lock."""
    lock = registry_lock(tracker, params.registered_model(), params.registry.lock_timeout_s)
    return register_run(params, layout, tracker, parent, lineage, lock)


def run_stages(stages: list, params: Params, layout: Layout, tracker: Tracker, parent, lineage: dict):
    """Run `stages` in order as Prefect tasks (edges drawn), each recorded as a child run of `parent`.

    Returns ({stage: StageResult}, {stage: "ran" | "cached"}); adds the data's md5 to `lineage`.
    """
    results, ran, states = {}, {}, {}
    for stage in stages:
        runtime = {"tracker": tracker} if stage.name == "backbone" else {}
        if runtime and params.backbone.spec.startswith("mlflow:"):
            ensure_pretrained(params, str(layout.root), tracker)
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


def prefect_flow_run(prefect_ui: bool) -> dict[str, str]:
    """This flow run's id, name and UI link (no link on a temporary API, which serves no UI)."""
    from prefect.runtime import flow_run

    from distilflow.redact import redact

    url = flow_run.ui_url if prefect_ui else None
    return {"id": str(flow_run.id or ""), "name": str(flow_run.name or ""), "url": redact(url) if url else ""}
