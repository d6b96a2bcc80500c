"""The transfer_gain stage: does the pretrained backbone help? Pretrained vs from scratch at low label budgets."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from distilflow.io import write_json
from distilflow.params import BackboneParams, TrainParams, TransferParams
from distilflow.records import StageResult
from tasks.backbones import build_classifier, load_backbone
from tasks.dataset import load_splits
from tasks.finetuning import fit
from tasks.metrics import accuracy
from tasks.splits import label_budget_subset


def transfer_gain_stage(
    train: Path,
    val: Path,
    test: Path,
    preprocessor: Path,
    backbone: Path,
    transfer_report: Path,
    spec: BackboneParams,
    train_params: TrainParams,
    transfer: TransferParams,
    seed: int,
    image_shape,
) -> StageResult:
    """Test accuracy of the pretrained backbone vs the same architecture from scratch, at each label budget.

    Same subset, epochs, schedule and seed for both; only the initial weights differ.
    """
    pre, data = load_splits(train, val, test, preprocessor)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = data["train"], data["val"], data["test"]
    cfg = train_params.model_copy(
        update={
            "epochs": transfer.epochs,
            "patience": transfer.epochs,
            "label_budget": None,
            "probe_epochs": 0,
            "strategy": transfer.strategy,
            "lr": transfer.lr,
            "batch_size": transfer.batch_size,
        }
    )
    torch.manual_seed(seed)  # loaded once; each budget trains a copy of the same starting point
    pretrained, arch = load_backbone(spec, image_shape, Xtr.shape[1], len(pre["classes"]), backbone, pre=pre)
    gains = {}
    for budget in transfer.label_budgets:
        keep = label_budget_subset(ytr, budget, seed)
        accs = {}
        for init in ("pretrained", "scratch"):
            if init == "pretrained":
                model = copy.deepcopy(pretrained)
            else:
                torch.manual_seed(seed)
                model = build_classifier(arch)
            fit(model, Xtr[keep], ytr[keep], Xva, yva, cfg, seed, image_shape, desc=f"{init}@{budget}")
            accs[init] = accuracy(model, Xte, yte)
        gains[budget] = {**accs, "gain": accs["pretrained"] - accs["scratch"], "labels_per_class": budget}
    write_json({str(b): row for b, row in gains.items()}, transfer_report)
    metrics = {
        f"transfer.{k}.{b}_per_class": v for b, row in gains.items() for k, v in row.items() if k != "labels_per_class"
    }
    table = ["| labels/class | pretrained | scratch | transfer gain |", "|---:|---:|---:|---:|"]
    table += [f"| {b} | {r['pretrained']:.4f} | {r['scratch']:.4f} | {r['gain']:+.4f} |" for b, r in gains.items()]
    return StageResult(metrics=metrics, texts={"transfer_gain.md": "\n".join(table) + "\n"}, info={"gains": gains})
