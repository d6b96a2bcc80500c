"""Fine-tuning strategies: how `fit` configures the one training loop (tasks/engine.py) for `TrainParams`.

Which backbone blocks train in which epoch (`unfrozen_blocks`, `set_trainable`,
`freeze_norm_stats`), at which learning rate (`param_groups`: discriminative
rates, ULMFiT), and how the training images are augmented (kornia). The
schedule is data, not a subclass (Lightning's BackboneFinetuning idea).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilflow.params import AugmentParams, TrainParams
from tasks.engine import FitResult, LoopConfig, cross_entropy, decay_groups, pick_device, torch_threads, train
from tasks.inference import TorchPredictor
from tasks.models import Classifier


def block_params(model: Classifier) -> list[list[nn.Parameter]]:
    """Backbone parameters grouped by block, input to output.

    Parameters outside every listed block (a final norm, a pooler) join the
    top block, so no backbone parameter is left out of the schedule.
    """
    groups, seen = [], set()
    for block in model.blocks:
        params = [p for p in block.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        groups.append(params)
    rest = [p for p in model.backbone.parameters() if id(p) not in seen]
    if rest:
        groups[-1] = groups[-1] + rest
    return groups


def unfrozen_blocks(strategy: str, n_blocks: int, epoch: int, unfreeze_every: int, most: int | None = None) -> int:
    """How many backbone blocks (counted from the top) train in this epoch (progressive: at most `most`)."""
    if strategy == "full":
        return n_blocks
    if strategy == "linear_probe":
        return 0
    return min(n_blocks if most is None else most, epoch // unfreeze_every)


def set_trainable(model: Classifier, n_top_blocks: int) -> None:
    """Head always trains; the top `n_top_blocks` backbone blocks train; the rest are frozen."""
    groups = block_params(model)
    for i, params in enumerate(groups):
        train_it = i >= len(groups) - n_top_blocks
        for p in params:
            p.requires_grad_(train_it)
    for p in model.head.parameters():
        p.requires_grad_(True)


def freeze_norm_stats(model: Classifier, n_top_blocks: int, every_norm: bool = False) -> None:
    """Frozen blocks keep their BatchNorm running statistics (eval mode); with `every_norm`, unfrozen ones too.

    `every_norm` (train.freeze_batchnorm): an ImageNet backbone fine-tuned for a few dozen steps
    cannot re-estimate its statistics (TF's momentum 0.99 moves them ~1% a step), so its layers
    train against batch statistics it never sees at eval time; kept at ImageNet's, they agree.
    """
    blocks = model.blocks
    for block in blocks[: len(blocks) - n_top_blocks]:
        block.eval()
    if n_top_blocks == 0:
        model.backbone.eval()
    if every_norm:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def param_groups(model: Classifier, lr: float, lr_decay: float, weight_decay: float) -> list[dict]:
    """Discriminative LRs (ULMFiT, Howard & Ruder 2018): head at `lr`, top block at lr·decay, next at lr·decay², ..."""
    blocks = block_params(model)
    named = [(list(model.head.parameters()), lr, "head")]
    named += [(params, lr * lr_decay ** (len(blocks) - i), f"block{i}") for i, params in enumerate(blocks)]
    return decay_groups(named, weight_decay)


def make_augmenter(aug: AugmentParams, image_shape) -> nn.Module | None:
    """kornia affine (shift, rotation, scale) + Gaussian noise, on image-shaped batches."""
    if not aug.enabled or image_shape is None:
        return None
    import kornia.augmentation as K

    ops = [
        K.RandomAffine(
            degrees=aug.rotation, translate=(aug.shift, aug.shift), scale=(1 - aug.scale, 1 + aug.scale), p=1.0
        )
    ]
    if aug.noise > 0:
        ops.append(K.RandomGaussianNoise(std=aug.noise, p=1.0))
    return nn.Sequential(*ops)


def augment_flat(augmenter: nn.Module, x: torch.Tensor, image_shape) -> torch.Tensor:
    """Augment flat (N, H*W*C) rows as images and flatten them back."""
    h, w, c = image_shape
    img = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    return augmenter(img).permute(0, 2, 3, 1).reshape(x.shape[0], -1)


class _Head(nn.Module):
    """The head alone (dropout + linear), trained on features computed once by a frozen backbone."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.dropout, self.head = model.dropout, model.head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))


def _launch_ddp(model: Classifier, args: tuple, cfg: TrainParams) -> FitResult:
    """`fit` data-parallel in `cfg.devices` processes; rank 0's weights loaded into `model`."""
    from tasks import distributed

    result = distributed.launch(fit, model, *args, devices=cfg.devices, device=cfg.device)
    model.load_state_dict(result.model.state_dict())
    model.eval()
    result.model = model
    return result


def _probe(model: Classifier, X_train, y_train, X_val, y_val, cfg: TrainParams, seed: int, **loop) -> FitResult:
    """A linear probe: the frozen backbone sees each image once, and only the head trains on its features."""
    set_trainable(model, 0)
    model.to(pick_device(cfg.device))
    with torch_threads(cfg.threads):
        features = TorchPredictor(model).outputs(X_train, features=True)
        val_features = TorchPredictor(model).outputs(X_val, features=True)
    head = _Head(model)
    groups = decay_groups([(list(head.parameters()), cfg.lr, "head")], cfg.weight_decay)
    data = {"x": features, "y": y_train}
    result = train(
        head, data, (val_features, y_val), LoopConfig.of(cfg), seed, cross_entropy(cfg.label_smoothing), groups, **loop
    )
    for row in result.history:
        row["unfrozen_blocks"] = 0
    model.eval()
    result.model = model
    return result


def _phase(checkpoint: Path | None, name: str) -> Path | None:
    """The checkpoint of one phase of a two-phase fit (each resumes on its own)."""
    return None if checkpoint is None else checkpoint.with_name(f"{checkpoint.stem}-{name}{checkpoint.suffix}")


def _schedule(cfg: TrainParams, n_blocks: int, offset: int = 0) -> Callable[[Classifier, int], dict]:
    """The per-epoch freezing of a strategy: which top blocks train, and which BatchNorm statistics stay fixed."""

    def before_epoch(model: Classifier, epoch: int) -> dict:
        k = unfrozen_blocks(cfg.strategy, n_blocks, epoch + offset, cfg.unfreeze_every, cfg.max_unfrozen)
        set_trainable(model, k)
        freeze_norm_stats(model, k, cfg.freeze_batchnorm)
        return {"unfrozen_blocks": k}

    return before_epoch


def _unfreeze(model: Classifier, data: tuple, cfg: TrainParams, seed: int, augment, offset: int = 0, **loop):
    """The whole network under the strategy's schedule (`offset` epochs of it already spent on a probe)."""
    X_train, y_train, X_val, y_val = data
    return train(
        model,
        {"x": X_train, "y": y_train},
        (X_val, y_val),
        LoopConfig.of(cfg),
        seed,
        cross_entropy(cfg.label_smoothing),
        groups=param_groups(model, cfg.lr, cfg.lr_decay, cfg.weight_decay),
        before_epoch=_schedule(cfg, len(model.blocks), offset),
        augment=augment,
        **loop,
    )


def _probe_then_unfreeze(model: Classifier, data: tuple, cfg: TrainParams, seed: int, checkpoint, desc, on_epoch):
    """`progressive` with `probe_epochs`: the head on features computed once, then the top blocks unfreeze.

    The probe is cheap (the frozen backbone sees each image once), so the expensive epochs that run the
    whole network start from a trained head. Both phases keep their best epoch; the better one is kept.
    """
    probe = cfg.model_copy(update={"epochs": cfg.probe_epochs, "patience": cfg.probe_epochs})
    first = _probe(
        model, *data, probe, seed, checkpoint=_phase(checkpoint, "probe"), desc=f"{desc} probe", on_epoch=on_epoch
    )
    if cfg.epochs == cfg.probe_epochs:
        return first
    probed = copy.deepcopy(model.state_dict())
    offset = cfg.unfreeze_every  # the first epoch after the probe already trains the top block
    rest = cfg.model_copy(update={"epochs": cfg.epochs - cfg.probe_epochs, "warmup_epochs": 0})
    watch = (lambda row: on_epoch({**row, "epoch": row["epoch"] + cfg.probe_epochs})) if on_epoch else None
    second = _unfreeze(
        model, data, rest, seed, None, offset, checkpoint=_phase(checkpoint, "unfreeze"), desc=desc, on_epoch=watch
    )
    for row in second.history:
        row["epoch"] += cfg.probe_epochs
    best = second
    if first.best_val_accuracy > second.best_val_accuracy:  # unfreezing did not beat the probe: keep the probe
        model.load_state_dict(probed)
        best = first
    model.eval()
    return FitResult(
        model,
        first.history + second.history,
        best.best_epoch + (cfg.probe_epochs if best is second else 0),
        best.best_val_accuracy,
        second.stopped_early,
        first.resumed_from_epoch + second.resumed_from_epoch,
        first.labelled_rows,
    )


def fit(
    model: Classifier,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    cfg: TrainParams,
    seed: int,
    image_shape=None,
    checkpoint: Path | None = None,
    desc: str = "train",
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Supervised training of a `Classifier` by `cfg.strategy` (fine-tuning, pretraining, from scratch).

    - `linear_probe`: the backbone is frozen; without augmentation its features
      are computed once and only the head trains on them;
    - `full`: every layer trains;
    - `progressive`: the head first, then one more backbone block from the top
      every `unfreeze_every` epochs (ULMFiT's gradual unfreezing), at most
      `max_unfrozen` of them; with `probe_epochs`, those first head-only epochs
      are a linear probe on features computed once.
    All use discriminative learning rates (each block `lr_decay` times the one above).
    With `cfg.devices > 1` the same call runs data-parallel in that many
    processes (tasks/distributed.py) and returns rank 0's result.
    """
    from tasks import distributed

    if cfg.devices > 1 and distributed.current() is None:
        return _launch_ddp(model, (X_train, y_train, X_val, y_val, cfg, seed, image_shape, checkpoint, desc), cfg)
    data = (X_train, y_train, X_val, y_val)
    augmenter = make_augmenter(cfg.augment, image_shape)
    if augmenter is None and cfg.strategy == "linear_probe":
        return _probe(model, *data, cfg, seed, checkpoint=checkpoint, desc=desc, on_epoch=on_epoch)
    if augmenter is None and cfg.strategy == "progressive" and cfg.probe_epochs:
        return _probe_then_unfreeze(model, data, cfg, seed, checkpoint, desc, on_epoch)
    augment = (lambda x: augment_flat(augmenter, x, image_shape)) if augmenter is not None else None
    return _unfreeze(model, data, cfg, seed, augment, checkpoint=checkpoint, desc=desc, on_epoch=on_epoch)
