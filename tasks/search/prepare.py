"""What a search does once, before its trials: its MLflow parent run, the study, the snapshot of shared inputs."""

from __future__ import annotations

from distilflow.io import read_json
from distilflow.layout import Layout
from distilflow.params import Params
from distilflow.redact import redact
from tasks.search import study as st
from tasks.search.space import prepared_stages
from tasks.search.trial import shared_names, snapshot


def open_parent(tracker, params: Params, storage, name: str, url: str, lineage: dict):
    """The search's MLflow run: the study's own, reopened when the study resumes, else a new one."""
    parent_id = st.parent_run_id(storage, name)
    parent = tracker.reopen(parent_id) if parent_id else None
    if parent is not None:
        return parent
    tags = {**lineage, "distilflow.search.study": name, "distilflow.search.storage": redact(url)}
    parent = tracker.open(params.experiment_name(), f"search-{name}", tags=tags)
    parent.log_params({f"search.{k}": v for k, v in params.search.model_dump(mode="json").items()})
    parent.set_tags(
        {
            "mlflow.note.content": f"`distilflow search`: study `{name}` ({params.search.target}); one nested "
            "run per trial. The pick and every trial: `search.md`; the front: `search_pareto.png`."
        }
    )
    return parent


def prepare_study(params: Params, layout: Layout, storage, name: str, parent):
    """Open (or resume) the study on the prepared outputs, snapshot them once, fail what a killed search left."""
    teacher_val = float(read_json(layout.teacher_metrics)["val.accuracy"]) if params.search.target == "student" else 0.0
    study = st.open_study(params, storage, name, teacher_val)
    study.set_user_attr("mlflow.parent_run_id", parent.run_id)
    recorded = study.user_attrs.get("distilflow.inputs")
    hashes = snapshot(layout, layout.study_inputs(name), shared_names(prepared_stages(params)), recorded)
    if recorded is None:
        study.set_user_attr("distilflow.inputs", hashes)
    for number in st.fail_interrupted(study):
        print(f"recovered: trial {number} of study {name} was interrupted; marked failed (not counted)")
    return study
