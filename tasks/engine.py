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

`train` reads as the loop; what it carries across epochs (the optimiser and
schedule, the RNG, the best weights, the checkpoint's contents) is `_Loop`,
and one pass over the training rows is `_Loop.epoch`. `tasks/finetuning.py:fit`
is the supervised configuration of the loop for `TrainParams` (strategies,
discriminative learning rates, freezing, augmentation). Data-parallel training
(`train.devices > 1`) runs the same loop in N processes: see `tasks/distributed.py`.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tasks.inference import TorchPredictor

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

    @classmethod
    def of(cls, section, **overrides) -> LoopConfig:
        """The loop settings a params section (`train:`, `distill:`, ...) holds, by field name, plus `overrides`."""
        shared = {f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)}
        return cls(**{**shared, **overrides})


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


class _Loop:
    """What one `train` call carries from epoch to epoch, and what its checkpoint holds."""

    def __init__(self, model: nn.Module, tensors: Batch, cfg: LoopConfig, seed: int, groups, device, ddp):
        from transformers.optimization import get_cosine_schedule_with_warmup

        self.model, self.tensors, self.cfg, self.device, self.ddp = model, tensors, cfg, device, ddp
        self.shuffle = torch.Generator().manual_seed(seed)
        self.n_rows = len(tensors["x"])
        self.local_batch = ddp.local_batch(cfg.batch_size) if ddp else cfg.batch_size
        self.steps_per_epoch = math.ceil(self.n_rows / cfg.batch_size)
        if groups is None:
            groups = decay_groups([(list(model.parameters()), cfg.lr, "all")], cfg.weight_decay)
        # fused: one kernel per step for all parameters (CPU and CUDA), instead of a few per tensor
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, cfg.warmup_epochs * self.steps_per_epoch, cfg.epochs * self.steps_per_epoch
        )
        self.use_amp = device.type == "cuda" and cfg.precision == "bf16"
        self.clip = [p for g in groups for p in g["params"]]
        self.has_unlabelled = bool((tensors["y"] == IGNORE).any())
        self.result = FitResult(model=model, labelled_rows=int((tensors["y"] != IGNORE).sum()))
        self.best_state, self.bad_epochs = copy.deepcopy(model.state_dict()), 0

    def resume(self, saved: dict | None) -> int:
        """Continue from a checkpoint (`save_checkpoint` of `state`); the epoch to start at."""
        if saved is None:
            return 0
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        self.shuffle.set_state(saved["shuffle_rng"])
        self.best_state, self.bad_epochs = saved["best_state"], saved["bad_epochs"]
        r = self.result
        r.history, r.best_epoch, r.best_val_accuracy = saved["history"], saved["best_epoch"], saved["best_val"]
        r.stopped_early = saved["stopped_early"]
        r.resumed_from_epoch = saved["epoch"]
        return saved["epoch"]

    def state(self, next_epoch: int) -> dict:
        """Everything a killed run needs to end exactly where an uninterrupted one would."""
        r = self.result
        return {
            "epoch": next_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "shuffle_rng": self.shuffle.get_state(),
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "history": r.history,
            "best_epoch": r.best_epoch,
            "best_val": r.best_val_accuracy,
            "stopped_early": r.stopped_early,
        }

    def _step(self, wrapped: nn.Module, batch: Batch, objective: Objective, trainable: list) -> tuple:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            loss, logits, parts = objective(wrapped, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            clip_gradients(trainable, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss, logits, parts

    def epoch(self, wrapped: nn.Module, objective: Objective, augment, desc: str) -> dict:
        """One pass over the training rows in a fresh shuffled order; the epoch's train figures."""
        t0, seen = time.perf_counter(), 0
        # running sums stay tensors: no host sync per step, one .item() per epoch
        sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=self.device)}
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        order = torch.randperm(self.n_rows, generator=self.shuffle)
        if self.ddp:
            order = self.ddp.shard(order, self.cfg.batch_size)
        n_labelled = int((self.tensors["y"][order] != IGNORE).sum()) if self.has_unlabelled else len(order)
        trainable = [p for p in self.clip if p.requires_grad]
        with progress(self.steps_per_epoch, desc) as bar:
            for i in range(0, len(order), self.local_batch):
                idx = order[i : i + self.local_batch]
                batch = {k: v[idx].to(self.device, non_blocking=True) for k, v in self.tensors.items()}
                if augment is not None:
                    batch["x"] = augment(batch["x"])
                loss, logits, parts = self._step(wrapped, batch, objective, trainable)
                seen += len(idx)
                sums["loss"] += loss.detach() * len(idx)
                for name, term in parts.items():
                    sums[name] = sums.get(name, 0.0) + term * len(idx)
                correct += (logits.argmax(1) == batch["y"]).sum()  # an unlabelled row (-1) never matches
                bar.update(1)
        return self._figures(seen, int(correct), n_labelled, {k: float(v) for k, v in sums.items()}, t0)

    def _figures(self, seen: int, correct: int, n_labelled: int, sums: dict, t0: float) -> dict:
        elapsed = time.perf_counter() - t0
        if self.ddp:
            seen, correct, n_labelled, sums = self.ddp.reduce_epoch(seen, correct, n_labelled, sums)
        return {
            "train_loss": sums.pop("loss") / seen,
            **{f"train_{k}": v / seen for k, v in sums.items()},
            "train_accuracy": correct / max(1, n_labelled),
            "_seen": seen,
            "_elapsed": elapsed,
        }

    def keep_best(self, epoch: int, row: dict, val) -> None:
        """The best validation epoch's weights so far; early stopping after `patience` epochs without one."""
        r, val_acc = self.result, row.get("val_accuracy", float("nan"))
        if val is None or not len(val[1]) or r.best_epoch < 0 or val_acc > r.best_val_accuracy:
            r.best_epoch, r.best_val_accuracy, self.bad_epochs = epoch, val_acc, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_epochs += 1
            r.stopped_early = self.cfg.patience is not None and self.bad_epochs >= self.cfg.patience


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
    from tasks import distributed

    objective = objective or cross_entropy()
    device, ddp = pick_device(cfg.device), distributed.current()
    torch.manual_seed(seed)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    loop = _Loop(model, _as_tensors(data, device), cfg, seed, groups, device, ddp)
    start = loop.resume(load_checkpoint(checkpoint))
    with torch_threads(cfg.threads):
        for epoch in range(start, cfg.epochs):
            if loop.result.stopped_early:
                break
            model.train()
            row = {"epoch": epoch, **(before_epoch(model, epoch) if before_epoch else {})}
            wrapped = ddp.wrap(model) if ddp else model  # after before_epoch: DDP hooks the params that train now
            row |= loop.epoch(wrapped, objective, augment, f"{desc} {epoch + 1}/{cfg.epochs}")
            seen, elapsed = row.pop("_seen"), row.pop("_elapsed")
            if val is not None:
                row |= validate(model, val, cfg.val_batch_size)
            row |= {
                "lr": loop.optimizer.param_groups[0]["lr"],
                "samples_per_s": seen / elapsed,
                "epoch_time_s": elapsed,
            }
            row["ended_ms"] = int(time.time() * 1000)
            loop.result.history.append(row)
            loop.keep_best(epoch, row, val)
            if checkpoint is not None and (not ddp or ddp.is_main):
                save_checkpoint(checkpoint, loop.state(epoch + 1))
            if on_epoch is not None:
                on_epoch(row)
    model.load_state_dict(loop.best_state)
    model.eval()
    return loop.result


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
