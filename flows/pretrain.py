"""The pretrain flow: a backbone trained on MNIST and registered, a source for transfer to digits.

It registers through the same all-or-nothing path as the pipeline
(tasks/registry/registration.py), with the alias `pretrained`. A run whose
`backbone.spec` names that model builds it first when it is missing or stale
(`ensure_pretrained`, called by the pipeline flow and the `stage` command).
"""

from __future__ import annotations

import time

from prefect import flow
from pydantic import SecretStr

from distilflow.layout import Layout
from distilflow.params import Params, PretrainParams
from distilflow.stages import PRETRAIN
from distilflow.tracking import Tracker, lineage_tags
from flows.stages import run_task
from tasks.backbone_source import pretrain_fingerprint, pretrained_is_current
from tasks.registry.registration import Variant, register_variants

ALIAS = "pretrained"


@flow(name="distilflow-pretrain", log_prints=True)
def pretrain(pretrain_params: PretrainParams, seed: int, root: str, tracking_uri: str | SecretStr) -> dict:
    """Train the backbone on MNIST (cached by content) and register it as `<registered_model>@pretrained`."""
    layout = Layout(root)
    tracker = Tracker(tracking_uri, layout.root)
    params = Params(pretrain=pretrain_params, seed=seed)
    lineage = lineage_tags(layout.root, params)
    name = pretrain_params.registered_model
    with tracker.run(
        f"distilflow-pretrain-{pretrain_params.dataset}", f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}", tags=lineage
    ) as parent:
        parent.log_params({"pretrain": pretrain_params.model_dump(mode="json"), "seed": seed})
        result, cached, _ = run_task(PRETRAIN, params, layout)
        tracker.record_stage(parent, "pretrain", result, cached, lineage)
        parent.log_metrics(result.metrics)
        tags = {
            "git_commit": lineage["mlflow.source.git.commit"],
            "params_hash": lineage["params_hash"],
            "dataset": pretrain_params.dataset,
            "pretrain_fingerprint": pretrain_fingerprint(pretrain_params, seed),
        }
        card = (
            f"# {name}\n\nA {pretrain_params.backbone.spec} backbone pretrained on {pretrain_params.dataset} by "
            f"distilflow's pretrain flow (validation accuracy {result.metrics['val.accuracy']:.4f}); the "
            "pipeline's default `backbone.spec` fine-tunes it.\n"
        )
        registered = register_variants(
            tracker,
            parent,
            [
                Variant(
                    name,
                    layout.pretrained / "classifier",
                    {"variant": "pretrained backbone", "accuracy": result.metrics["val.accuracy"]},
                    "product",
                )
            ],
            layout.pretrained / "preprocessor.json",
            result.info["input_example"],
            tags,
            card,
            alias=ALIAS,
        )
    version = registered["product"]
    print(f"registered {name} version {version} as @{ALIAS} (val accuracy {result.metrics['val.accuracy']:.4f})")
    return {"run_id": parent.run_id, "model": name, "version": version, "uri": f"models:/{name}@{ALIAS}"}


def ensure_pretrained(params: Params, root: str, tracker: Tracker) -> None:
    """Run the pretrain flow first when `backbone.spec` names its model and that is missing or stale."""
    if not pretrained_is_current(params.backbone, params.pretrain, params.seed, tracker):
        # Prefect stores a SecretStr parameter as ********
        pretrain(pretrain_params=params.pretrain, seed=params.seed, root=root, tracking_uri=SecretStr(tracker.uri))
