"""Pretrain a backbone on MNIST and register it: the source for real transfer to digits."""

from __future__ import annotations

import time

from prefect import flow

from distilflow.hashing import params_hash
from distilflow.layout import Layout
from distilflow.params import Params
from distilflow.tracking import Tracker, git_commit
from flows.common import run_stage
from tasks.finetune import pretrain_task

ALIAS = "pretrained"


def pretrain_fingerprint(params: Params) -> str:
    """What the registered pretrained model was built from; a change means pretrain again."""
    return params_hash({"pretrain": params.pretrain.model_dump(mode="json"), "seed": params.seed})


@flow(name="distilflow-pretrain", log_prints=True)
def pretrain(params: Params, root: str, tracking_uri: str) -> dict:
    layout = Layout(root)
    tracker = Tracker(tracking_uri, layout.root)
    lineage = {"git_commit": git_commit(layout.root), "params_hash": params.hash()}
    name = params.pretrain.registered_model
    with tracker.run(f"distilflow-pretrain-{params.pretrain.dataset}", f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}",
                     tags=lineage) as parent:
        parent.log_params({"pretrain": params.pretrain.model_dump(mode="json"), "seed": params.seed})
        result, cached = run_stage(pretrain_task, pretrain=params.pretrain, seed=params.seed, layout=layout)
        tracker.log_stage(parent, "pretrain", result, cached, lineage)
        version = tracker.register_classifier(
            parent, layout.pretrained / "classifier", layout.pretrained / "preprocessor.json", name, ALIAS,
            input_example=result.info["input_example"],
            tags={**lineage, "dataset": params.pretrain.dataset, "pretrain_fingerprint": pretrain_fingerprint(params)})
    print(f"registered {name} version {version} as @{ALIAS} (val accuracy {result.metrics['val_accuracy']:.4f})")
    return {"run_id": parent.run_id, "model": name, "version": version, "uri": f"models:/{name}@{ALIAS}"}
