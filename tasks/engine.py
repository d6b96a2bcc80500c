"""The one training loop. Fine-tuning, pretraining, distillation and QAT all train through `train()`.

What differs between them is data, not code: the loss (`objective`), which
parameters train at which learning rate (`groups`, `before_epoch`), and the
batch transform (`augment`). Every use gets the same:
- device selection (`auto` picks CUDA when present) and bf16 autocast on CUDA;
- AdamW, linear warmup then cosine decay (transformers' schedule), gradient clipping;
- a thread count that is set for the run and restored after it;
- validation after every epoch at `val_batch_size`, early stopping on validation
  accuracy, and the best epoch's weights restored at the end;
- a checkpoint after every epoch (model, optimiser, schedule, RNG state), so a
  run killed with SIGKILL resumes and ends exactly where an uninterrupted run would;
- a progress bar on a terminal (silent in CI logs), and a per-epoch history that
  the stage logs to MLflow and `on_epoch` sees as it happens (the search's pruner).

`fit()` is the supervised configuration of that loop for `TrainParams`
(fine-tuning strategies, discriminative learning rates, augmentation).
Data-parallel training (`train.devices > 1`) runs the same loop in N processes:
see `tasks/distributed.py`.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distilflow.params import AugmentParams, TrainParams
from tasks.inference import TorchPredictor
from tasks.models import Classifier

IGNORE = -1  # label value that the loss and the train accuracy skip (rows outside a label budget)

Batch = dict[str, torch.Tensor]
# (model, batch) -> (loss, logits, {named loss terms, for the history})
Objective = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class LoopConfig:
    """How the loop trains: the numbers every use shares."""

    epochs: int
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    grad_clip: float | None = None
    patience: int | None = None  # epochs without a better val accuracy before stopping; None = never
    device: str = "auto"
    threads: int | None = None
    val_batch_size: int = 512
    precision: str = "bf16"  # bf16 autocast on CUDA ("fp32": none); the CPU always trains in fp32
    channels_last: bool = False  # NHWC weights on CUDA


@dataclass
class FitResult:
    """The trained model (best epoch's weights loaded) and what happened on the way."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_accuracy: float = 0.0
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    labelled_rows: int = 0  # training rows with a label (a label budget leaves the others to the soft targets)


def pick_device(choice: str) -> torch.device:
    """`auto` → CUDA when available, else CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def decay_groups(named: list[tuple[list[nn.Parameter], float, str]], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: each (params, lr, name) split so biases and norm scales (1-D) get no weight decay."""
    groups = []
    for params, lr, name in named:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": name})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}.no_decay"})
    return groups


def cross_entropy(label_smoothing: float = 0.0) -> Objective:
    """The supervised objective: cross-entropy over the batch (every row labelled; KD's objective handles −1)."""

    def objective(model: nn.Module, batch: Batch):
        logits = model(batch["x"])
        return F.cross_entropy(logits.float(), batch["y"], label_smoothing=label_smoothing), logits, {}

    return objective


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the labelled rows (label −1 = unlabelled); 0, not NaN, when there are none."""
    n_labelled = (labels != IGNORE).sum().clamp(min=1)
    total = F.cross_entropy(
        logits.float(), labels, ignore_index=IGNORE, reduction="sum", label_smoothing=label_smoothing
    )
    return total / n_labelled


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> None:
    """`clip_grad_norm_`, minus its rescaling pass when the norm is already within `max_norm`.

    The same result (it would multiply by 1.0), one read of every gradient
    fewer: on an 11M-parameter ResNet that pass cost about 5% of a step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = nn.utils.get_total_norm(grads, foreach=True)
    if total > max_norm:
        nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)


# ---------------------------------------------------------------------------- checkpoints and progress


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` beside `path` under a name unique to this process, then rename: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path | None) -> dict | None:
    """A checkpoint written by `save_checkpoint`, weights only (no pickled code), or None."""
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def progress(total: int, desc: str):
    """A tqdm bar on a terminal; silence in CI logs and pipes (disable=None)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None, unit="batch")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for a block, then give the caller's back."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------- the loop


def _as_tensors(data: dict, device: torch.device) -> Batch:
    out = {}
    for key, value in data.items():
        tensor = torch.as_tensor(np.array(value) if isinstance(value, np.ndarray) else value)  # a copy: pandas
        if tensor.is_floating_point():  # hands out read-only arrays
            tensor = tensor.float()
        if device.type == "cuda":  # page-locked host memory: faster, asynchronous copies to the GPU
            tensor = tensor.pin_memory()
        out[key] = tensor
    return out


def train(
    model: nn.Module,
    data: dict,
    val: tuple[np.ndarray, np.ndarray] | None,
    cfg: LoopConfig,
    seed: int,
    objective: Objective | None = None,
    groups: list[dict] | None = None,
    before_epoch: Callable[[nn.Module, int], dict] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    checkpoint: Path | None = None,
    desc: str = "train",
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train `model` in place; return it with its best validation epoch's weights loaded.

    `data`: equal-length arrays, at least `x` and `y` (label −1 = unlabelled),
    plus whatever the objective reads (e.g. `teacher_logits`). `val`: (X, y)
    for model selection, or None (then the last epoch is kept).
    """
    from transformers.optimization import get_cosine_schedule_with_warmup

    from tasks import distributed

    objective = objective or cross_entropy()
    device = pick_device(cfg.device)
    ddp = distributed.current()
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    model.to(device)
    tensors = _as_tensors(data, device)
    n_rows = len(tensors["x"])
    local_batch = ddp.local_batch(cfg.batch_size) if ddp else cfg.batch_size
    steps_per_epoch = math.ceil(n_rows / cfg.batch_size)
    if groups is None:
        groups = decay_groups([(list(model.parameters()), cfg.lr, "all")], cfg.weight_decay)
    # fused: one kernel per step for all parameters (CPU and CUDA), instead of a few per tensor
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    )
    use_amp = device.type == "cuda" and cfg.precision == "bf16"
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    clip = [p for g in groups for p in g["params"]]

    has_unlabelled = bool((tensors["y"] == IGNORE).any())
    result = FitResult(model=model, labelled_rows=int((tensors["y"] != IGNORE).sum()))
    best_state = copy.deepcopy(model.state_dict())
    start, bad_epochs = 0, 0
    saved = load_checkpoint(checkpoint)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        shuffle.set_state(saved["shuffle_rng"])
        best_state, bad_epochs = saved["best_state"], saved["bad_epochs"]
        result.history, result.best_epoch, result.best_val_accuracy = (
            saved["history"],
            saved["best_epoch"],
            saved["best_val"],
        )
        start = result.resumed_from_epoch = saved["epoch"]
        result.stopped_early = saved["stopped_early"]

    with torch_threads(cfg.threads):
        for epoch in range(start, cfg.epochs):
            if result.stopped_early:
                break
            model.train()
            row = {"epoch": epoch, **(before_epoch(model, epoch) if before_epoch else {})}
            wrapped = ddp.wrap(model) if ddp else model  # after before_epoch: DDP hooks the params that train now
            t0, seen = time.perf_counter(), 0
            # running sums stay tensors: no host sync per step, one .item() per epoch
            sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=device)}
            correct = torch.zeros((), dtype=torch.long, device=device)
            order = torch.randperm(n_rows, generator=shuffle)
            if ddp:
                order = ddp.shard(order, cfg.batch_size)
            n_labelled = int((tensors["y"][order] != IGNORE).sum()) if has_unlabelled else len(order)
            trainable = [p for p in clip if p.requires_grad]
            with progress(steps_per_epoch, f"{desc} {epoch + 1}/{cfg.epochs}") as bar:
                for i in range(0, len(order), local_batch):
                    idx = order[i : i + local_batch]
                    batch = {k: v[idx].to(device, non_blocking=True) for k, v in tensors.items()}
                    if augment is not None:
                        batch["x"] = augment(batch["x"])
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        loss, logits, parts = objective(wrapped, batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        clip_gradients(trainable, cfg.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    rows = len(idx)
                    seen += rows
                    sums["loss"] += loss.detach() * rows
                    for name, term in parts.items():
                        sums[name] = sums.get(name, 0.0) + term * rows
                    correct += (logits.argmax(1) == batch["y"]).sum()  # an unlabelled row (-1) never matches
                    bar.update(1)
            elapsed = time.perf_counter() - t0
            sums = {k: float(v) for k, v in sums.items()}
            correct = int(correct)
            if ddp:
                seen, correct, n_labelled, sums = ddp.reduce_epoch(seen, correct, n_labelled, sums)
            row |= {
                "train_loss": sums.pop("loss") / seen,
                **{f"train_{k}": v / seen for k, v in sums.items()},
                "train_accuracy": correct / max(1, n_labelled),
            }
            if val is not None:
                row |= validate(model, val, cfg.val_batch_size)
            row |= {
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": seen / elapsed,
                "epoch_time_s": elapsed,
                "ended_ms": int(time.time() * 1000),
            }
            result.history.append(row)
            val_acc = row.get("val_accuracy", float("nan"))
            if val is None or not len(val[1]) or result.best_epoch < 0 or val_acc > result.best_val_accuracy:
                result.best_epoch, result.best_val_accuracy, bad_epochs = epoch, val_acc, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
                result.stopped_early = cfg.patience is not None and bad_epochs >= cfg.patience
            if checkpoint is not None and (not ddp or ddp.is_main):
                save_checkpoint(
                    checkpoint,
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "shuffle_rng": shuffle.get_state(),
                        "best_state": best_state,
                        "bad_epochs": bad_epochs,
                        "history": result.history,
                        "best_epoch": result.best_epoch,
                        "best_val": result.best_val_accuracy,
                        "stopped_early": result.stopped_early,
                    },
                )
            if on_epoch is not None:
                on_epoch(row)
    model.load_state_dict(best_state)
    model.eval()
    return result


def validate(model: nn.Module, val: tuple[np.ndarray, np.ndarray], batch_size: int) -> dict[str, float]:
    """Validation loss and accuracy of `model` on (X, y), in eval mode without grad."""
    X, y = val
    if not len(y):
        return {"val_loss": float("nan"), "val_accuracy": float("nan")}
    logits = TorchPredictor(model, batch_size).outputs(X)
    y = torch.as_tensor(np.array(y), dtype=torch.long)  # a copy: pandas hands out read-only arrays
    return {
        "val_loss": F.cross_entropy(logits, y).item(),
        "val_accuracy": (logits.argmax(1) == y).float().mean().item(),
    }


# ---------------------------------------------------------------------------- fine-tuning strategies


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


def unfrozen_blocks(strategy: str, n_blocks: int, epoch: int, unfreeze_every: int) -> int:
    """How many backbone blocks (counted from the top) train in this epoch."""
    if strategy == "full":
        return n_blocks
    if strategy == "linear_probe":
        return 0
    return min(n_blocks, epoch // unfreeze_every)


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


def loop_config(cfg: TrainParams, **overrides) -> LoopConfig:
    """The loop settings of a `train:`-shaped params section."""
    base = dict(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_epochs=cfg.warmup_epochs,
        grad_clip=cfg.grad_clip,
        patience=cfg.patience,
        device=cfg.device,
        threads=cfg.threads,
        precision=cfg.precision,
        channels_last=cfg.channels_last,
    )
    return LoopConfig(**{**base, **overrides})


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
      every `unfreeze_every` epochs (ULMFiT's gradual unfreezing).
    All use discriminative learning rates (each block `lr_decay` times the one above).
    With `cfg.devices > 1` the same call runs data-parallel in that many
    processes (tasks/distributed.py) and returns rank 0's result.
    """
    from tasks import distributed

    if cfg.devices > 1 and distributed.current() is None:
        result = distributed.launch(
            fit,
            model,
            X_train,
            y_train,
            X_val,
            y_val,
            cfg,
            seed,
            image_shape,
            checkpoint,
            desc,
            devices=cfg.devices,
            device=cfg.device,
        )
        model.load_state_dict(result.model.state_dict())
        model.eval()
        result.model = model
        return result
    settings = loop_config(cfg)
    objective = cross_entropy(cfg.label_smoothing)
    augmenter = make_augmenter(cfg.augment, image_shape)
    if cfg.strategy == "linear_probe" and augmenter is None:
        set_trainable(model, 0)
        device = pick_device(cfg.device)
        model.to(device)
        with torch_threads(cfg.threads):  # the frozen backbone sees each image once
            features = TorchPredictor(model).outputs(X_train, features=True)
            val_features = TorchPredictor(model).outputs(X_val, features=True)
        head = _Head(model)
        result = train(
            head,
            {"x": features, "y": y_train},
            (val_features, y_val),
            settings,
            seed,
            objective,
            groups=decay_groups([(list(head.parameters()), cfg.lr, "head")], cfg.weight_decay),
            checkpoint=checkpoint,
            desc=desc,
            on_epoch=on_epoch,
        )
        for row in result.history:
            row["unfrozen_blocks"] = 0
        model.eval()
        return FitResult(
            model,
            result.history,
            result.best_epoch,
            result.best_val_accuracy,
            result.stopped_early,
            result.resumed_from_epoch,
            result.labelled_rows,
        )
    n_blocks = len(model.blocks)

    def schedule(m: Classifier, epoch: int) -> dict:
        k = unfrozen_blocks(cfg.strategy, n_blocks, epoch, cfg.unfreeze_every)
        set_trainable(m, k)
        freeze_norm_stats(m, k, cfg.freeze_batchnorm)
        return {"unfrozen_blocks": k}

    augment = (lambda x: augment_flat(augmenter, x, image_shape)) if augmenter is not None else None
    return train(
        model,
        {"x": X_train, "y": y_train},
        (X_val, y_val),
        settings,
        seed,
        objective,
        groups=param_groups(model, cfg.lr, cfg.lr_decay, cfg.weight_decay),
        before_epoch=schedule,
        augment=augment,
        checkpoint=checkpoint,
        desc=desc,
        on_epoch=on_epoch,
    )
