"""Pruning: remove the weights (or whole channels) that matter least.

Two kinds, because they buy different things:
- `l1_unstructured`: global magnitude pruning (the smallest |w| across every
  conv/linear weight go to zero; Han et al. 2015, "Learning both Weights and
  Connections"). Accuracy holds up to high sparsity, but the zeros live
  inside dense tensors: the file and the dense CPU kernels are unchanged
  unless something downstream exploits sparsity. The report says so.
- `channel`: drop each conv block's output channels with the smallest filter
  L1 norm (Li et al. 2017, "Pruning Filters for Efficient ConvNets") and
  rebuild smaller Conv/BatchNorm layers, the next block's input and the head.
  Fewer parameters, a smaller file, faster inference; built-in CNN family only.
Both accept a short fine-tune callable, run while the pruned model is still
pruned, so the surviving weights can compensate.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from distilflow.errors import DistilflowError
from distilflow.io import write_json
from distilflow.params import DistillParams, PruneParams
from distilflow.records import StageResult
from tasks import kd
from tasks.backbones import load_classifier, save_classifier
from tasks.dataset import load_splits
from tasks.metrics import accuracy
from tasks.models import Classifier, ConvBlock, SmallCNN, count_parameters

Finetune = Callable[[nn.Module], object]


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every conv and linear layer, in model order."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over the conv/linear weights."""
    total = zeros = 0
    for module, name in prunable_weights(model):
        w = getattr(module, name)
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / total if total else 0.0


def state_dict_bytes(model: nn.Module) -> tuple[int, int]:
    """(raw, gzip-compressed) size of the saved state_dict, in bytes."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    raw = buf.getvalue()
    return len(raw), len(gzip.compress(raw, compresslevel=6))


def _size_report(before: nn.Module, after: nn.Module) -> dict:
    (raw0, gz0), (raw1, gz1) = state_dict_bytes(before), state_dict_bytes(after)
    return {
        "params_before": count_parameters(before),
        "params_after": count_parameters(after),
        "file_bytes_before": raw0,
        "file_bytes_after": raw1,
        "gzip_bytes_before": gz0,
        "gzip_bytes_after": gz1,
        "sparsity_before": sparsity(before),
        "sparsity_after": sparsity(after),
    }


# ---------------------------------------------------------------------------- unstructured


def magnitude_prune(model: nn.Module, amount: float, finetune: Finetune | None = None) -> tuple[nn.Module, dict]:
    """Global L1 unstructured pruning of a copy of `model` to `amount` sparsity, made permanent.

    One global threshold across layers (not `amount` per layer), so layers
    with many redundant weights give up more (Frankle & Carbin 2019 prune
    globally for the same reason). `finetune(model)` runs while the masks are
    attached, so pruned weights stay zero while the rest adapt; then
    `prune.remove` folds the masks into plain weight tensors.
    """
    if not 0 <= amount < 1:
        raise DistilflowError(f"prune.sparsity must be in [0, 1), got {amount}")
    pruned = copy.deepcopy(model)
    targets = prunable_weights(pruned)
    if not targets:
        raise DistilflowError(f"prune: {type(model).__name__} has no conv or linear weights to prune")
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=amount)
    if finetune is not None:
        finetune(pruned)
    for module, name in targets:
        torch_prune.remove(module, name)
    pruned.eval()
    report = {"method": "l1_unstructured", "requested_sparsity": amount, **_size_report(model, pruned)}
    report["note"] = (
        f"Unstructured pruning zeroed {report['sparsity_after']:.0%} of the conv/linear weights but the tensors "
        f"stay dense: the saved file is {report['file_bytes_after']:,} bytes (was {report['file_bytes_before']:,}) "
        f"and dense CPU kernels do the same work. It only shrinks when compressed (gzip: "
        f"{report['gzip_bytes_before']:,} → {report['gzip_bytes_after']:,} bytes) or run by a sparse runtime; "
        f"use prune.method=channel for a smaller, faster dense model."
    )
    return pruned, report


# ---------------------------------------------------------------------------- structured (channels)


def _keep_channels(conv: nn.Conv2d, amount: float) -> torch.Tensor:
    """Indices (ascending) of the output channels with the largest filter L1 norms."""
    n_keep = max(1, round(conv.out_channels * (1 - amount)))
    l1 = conv.weight.detach().abs().sum(dim=(1, 2, 3))
    return torch.sort(torch.topk(l1, n_keep).indices).values


def _smaller_block(block: ConvBlock, keep_in: torch.Tensor, keep_out: torch.Tensor) -> ConvBlock:
    conv, bn = block[0], block[1]
    pool = any(isinstance(m, nn.MaxPool2d) for m in block)
    new = ConvBlock(len(keep_in), len(keep_out), pool=pool)
    with torch.no_grad():
        new[0].weight.copy_(conv.weight[keep_out][:, keep_in])
        new_bn = new[1]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, name).copy_(getattr(bn, name)[keep_out])
        new_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
    new_bn.eps, new_bn.momentum = bn.eps, bn.momentum
    return new


def channel_prune(model: Classifier, amount: float, finetune: Finetune | None = None) -> tuple[Classifier, dict]:
    """Drop `amount` of each conv block's output channels (lowest filter L1), rebuilding dense layers.

    The first block's input channels (the image's) and the head's outputs
    (the classes) never change. The model's output shape and interface stay
    the same; `finetune(model)` then recovers accuracy on the smaller network.
    """
    if not 0 <= amount < 1:
        raise DistilflowError(f"prune.sparsity must be in [0, 1), got {amount}")
    if not isinstance(model, Classifier) or not isinstance(model.backbone, SmallCNN):
        name = type(getattr(model, "backbone", model)).__name__
        raise DistilflowError(
            f"prune.method=channel works on the built-in CNN family (SmallCNN) only, got {name}; "
            "use prune.method=l1_unstructured"
        )
    pruned = copy.deepcopy(model)
    body = pruned.backbone
    keep_in = torch.arange(body.blocks[0][0].in_channels)
    new_blocks = []
    for block in body.blocks:
        keep_out = _keep_channels(block[0], amount)
        new_blocks.append(_smaller_block(block, keep_in, keep_out))
        keep_in = keep_out
    body.blocks = nn.ModuleList(new_blocks)
    body.feature_dim = pruned.feature_dim = len(keep_in)
    old_head = pruned.head
    pruned.head = nn.Linear(len(keep_in), old_head.out_features)
    with torch.no_grad():
        pruned.head.weight.copy_(old_head.weight[:, keep_in])
        pruned.head.bias.copy_(old_head.bias)
    pruned._blocks = list(body.blocks)
    if finetune is not None:
        finetune(pruned)
    pruned.eval()
    report = {
        "method": "channel",
        "requested_sparsity": amount,
        **_size_report(model, pruned),
        "channels_before": [b[0].out_channels for b in model.backbone.blocks],
        "channels_after": [b[0].out_channels for b in body.blocks],
    }
    report["note"] = (
        f"Channel pruning rebuilt smaller dense layers: {report['params_before']:,} → "
        f"{report['params_after']:,} parameters, {report['file_bytes_before']:,} → "
        f"{report['file_bytes_after']:,} bytes."
    )
    return pruned, report


def prune_model(model: Classifier, params: PruneParams, finetune: Finetune | None = None) -> tuple[Classifier, dict]:
    """Apply `params.method` at `params.sparsity`; returns (pruned copy, report)."""
    if params.method == "channel":
        return channel_prune(model, params.sparsity, finetune)
    return magnitude_prune(model, params.sparsity, finetune)


# ---------------------------------------------------------------------------- stage (I/O at the edge)


def prune_stage(
    train: Path,
    val: Path,
    test: Path,
    preprocessor: Path,
    student: Path,
    teacher: Path,
    student_pruned: Path,
    prune_report: Path,
    cfg: PruneParams,
    distill_cfg: DistillParams,
    seed: int,
    device: str,
    threads: int | None,
) -> StageResult:
    """Prune the student (fine-tuning it with KD from the teacher while pruned); save the pruned student."""
    pre, data = load_splits(train, val, test, preprocessor)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = data["train"], data["val"], data["test"]
    teacher_model, _ = load_classifier(teacher, len(pre["classes"]))
    model, arch = load_classifier(student, len(pre["classes"]))
    short = distill_cfg.model_copy(update={"epochs": cfg.finetune_epochs})
    finetune = (
        (
            lambda m: kd.distill(
                teacher_model, m, Xtr, ytr, Xva, yva, short, seed, device, threads, desc="prune fine-tune"
            )
        )
        if cfg.finetune_epochs
        else None
    )
    pruned, report = prune_model(model, cfg, finetune)
    if isinstance(pruned.backbone, SmallCNN):  # channel pruning leaves irregular widths
        arch = {**arch, "widths": [block[0].out_channels for block in pruned.backbone.blocks]}
    save_classifier(pruned, arch, student_pruned)
    report["test_accuracy"] = accuracy(pruned, Xte, yte)
    write_json(report, prune_report)
    numbers = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StageResult(
        metrics=numbers,
        params=cfg.model_dump(mode="json"),
        texts={"prune_report.json": json.dumps(report, indent=2, default=str)},
        info=report,
    )
