"""Knowledge distillation: a compact student learns from the fine-tuned teacher.

The loss is Hinton et al. 2015 ("Distilling the Knowledge in a Neural
Network"): the KL divergence between temperature-softened teacher and student
distributions, scaled by T², mixed with the usual cross-entropy on labels;
optionally plus a FitNets hint (Romero et al. 2015) that pulls the student's
features towards the teacher's through a learned linear projection.

The teacher never changes and the training inputs are not augmented, so its
logits (and features, for the hint) are computed once up front; every epoch
then costs only the student's forward and backward passes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distilflow.errors import DistilflowError
from distilflow.params import DistillParams
from tasks.finetune import label_budget_subset, predict_logits, warmup_cosine
from tasks.models import MLP, Classifier, SmallCNN, builtin_classifier

UNLABELLED = -1  # label value for rows outside the label budget: they feed the soft term only


# ---------------------------------------------------------------------------- losses


def label_loss(student_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the labelled rows of the batch (label −1 = unlabelled).

    Averaged over labelled rows only, and 0 (not NaN) for a batch without any,
    so a label budget only thins the label term instead of poisoning it.
    """
    n_labelled = (labels != UNLABELLED).sum().clamp(min=1)
    total = F.cross_entropy(student_logits, labels, ignore_index=UNLABELLED, reduction="sum",
                            label_smoothing=label_smoothing)
    return total / n_labelled


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch.

    The softened gradients shrink as 1/T², so multiplying by T² keeps this
    term's size comparable to the label term whatever T is (Hinton 2015, §2).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """T² · KL(teacher_T ‖ student_T) + alpha · CE(student, labels)  (Hinton et al. 2015).

    `alpha` weights the label (hard) term against the soft term: alpha=0
    learns from the teacher alone. Hinton 2015 found a small weight on the
    label term works best. The T² factor keeps the soft term's gradients the
    same size as T changes (§2). The labels-only baseline is not a value of
    alpha but `train_without_kd`.
    """
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    hard = label_loss(student_logits, labels, label_smoothing) if alpha > 0 else student_logits.new_zeros(())
    return soft + alpha * hard


class HintLoss(nn.Module):
    """FitNets hint (Romero et al. 2015): MSE(W · student_features, teacher_features).

    The linear map W (student feature_dim → teacher feature_dim) is learned
    with the student and thrown away afterwards. FitNets hints a middle layer;
    here the hint is the penultimate feature vector (`forward_features`),
    which every `Classifier` exposes whatever its architecture.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.proj(student_features), teacher_features)


# ---------------------------------------------------------------------------- the student


def truncated_teacher(teacher: Classifier, depth: int) -> Classifier:
    """The teacher's adapter and first `depth` blocks (weights copied) with a new head.

    Structure transfer for the built-in family: the early blocks already
    compute useful low-level features, so the student starts from them.
    """
    body = teacher.backbone
    if not isinstance(body, (SmallCNN, MLP)):
        raise DistilflowError(
            f"distill.student=teacher_blocks needs a built-in teacher (backbone.spec builtin:cnn), "
            f"got a {type(body).__name__} backbone; use distill.student=compact")
    n_blocks = len(body.blocks)
    if not 1 <= depth < n_blocks:
        raise DistilflowError(
            f"distill.student_depth={depth}: a teacher_blocks student keeps fewer blocks than the teacher's "
            f"{n_blocks}; set it between 1 and {n_blocks - 1}")
    new_body = copy.deepcopy(body)
    new_body.blocks = nn.ModuleList(list(new_body.blocks)[:depth])
    last = new_body.blocks[-1]
    new_body.feature_dim = last[0].out_channels if isinstance(body, SmallCNN) else last[0].out_features
    return Classifier(copy.deepcopy(teacher.adapter), new_body, new_body.feature_dim, teacher.head.out_features,
                      blocks=list(new_body.blocks))


def make_student(teacher: Classifier, params: DistillParams, n_features: int | None = None,
                 seed: int | None = None) -> Classifier:
    """The student `params.student` asks for, with the teacher's classes and input shape.

    `compact`: a from-scratch built-in model (CNN when the teacher's adapter
    has an image shape, else an MLP over `n_features`). It reads the native
    images, so a teacher that upsamples (an `hf:` ResNet at 224 px) does not
    pass that cost on. `teacher_blocks`: see `truncated_teacher`.
    `seed` makes the fresh weights reproducible without touching global RNG.
    """
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if params.student == "teacher_blocks":
            return truncated_teacher(teacher, params.student_depth)
        image_shape = teacher.adapter.image_shape
        if image_shape is None and n_features is None:
            raise DistilflowError("make_student: a tabular teacher (no image_shape) needs n_features for the student")
        n_in = math.prod(image_shape) if image_shape else n_features
        return builtin_classifier(image_shape, n_in, teacher.head.out_features,
                                  width=params.student_width, depth=params.student_depth)


@torch.no_grad()
def cache_teacher_logits(teacher: nn.Module, X: np.ndarray | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Teacher logits for every row, once: eval mode (BatchNorm running stats, no dropout), no grad."""
    return predict_logits(teacher, torch.as_tensor(X, dtype=torch.float32), batch_size)


@torch.no_grad()
def cache_teacher_features(teacher: Classifier, X: np.ndarray | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    teacher.eval()
    X = torch.as_tensor(X, dtype=torch.float32)
    device = next(teacher.parameters()).device
    return torch.cat([teacher.forward_features(X[i : i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(X), batch_size)])


# ---------------------------------------------------------------------------- the loop


@dataclass
class DistillResult:
    model: Classifier
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_accuracy: float = 0.0
    labelled_rows: int = 0


def _labels_within_budget(y: np.ndarray, budget: int | None, seed: int) -> torch.Tensor:
    y = torch.as_tensor(np.array(y), dtype=torch.long)  # a copy: pandas hands out read-only arrays
    if budget is None:
        return y
    keep = torch.as_tensor(label_budget_subset(y.numpy(), budget, seed))
    masked = torch.full_like(y, UNLABELLED)
    masked[keep] = y[keep]
    return masked


def distill(teacher: Classifier | None, student: Classifier, X_train: np.ndarray, y_train: np.ndarray,
            X_val: np.ndarray, y_val: np.ndarray, params: DistillParams, seed: int) -> DistillResult:
    """Train `student` (in place) on teacher soft targets + labels; return it at its best validation epoch.

    AdamW with cosine decay to 0 over `params.epochs`; no early stopping, the
    best-validation weights are restored at the end. Deterministic for a
    seed on CPU. `teacher=None` trains on the labels alone (the no-KD
    baseline, see `train_without_kd`) and then needs hint_weight=0.
    """
    if teacher is None and params.hint_weight > 0:
        raise DistilflowError("distill: hint_weight > 0 needs a teacher model")
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    Xtr = torch.as_tensor(X_train, dtype=torch.float32)
    ytr = _labels_within_budget(y_train, params.label_budget, seed)
    Xva, yva = torch.as_tensor(X_val, dtype=torch.float32), torch.as_tensor(np.array(y_val), dtype=torch.long)
    t_logits = cache_teacher_logits(teacher, Xtr) if teacher is not None else None
    hint = None
    if params.hint_weight > 0:
        t_feats = cache_teacher_features(teacher, Xtr)
        hint = HintLoss(student.feature_dim, t_feats.shape[1])

    trainable = list(student.parameters()) + (list(hint.parameters()) if hint else [])
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]  # biases and norm scales: no weight decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": params.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=params.lr)
    steps_per_epoch = math.ceil(len(Xtr) / params.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(0, params.epochs * steps_per_epoch))

    result = DistillResult(model=student, labelled_rows=int((ytr != UNLABELLED).sum()))
    best_state = copy.deepcopy(student.state_dict())
    for epoch in range(params.epochs):
        student.train()
        t0, seen, sums, correct, n_labelled = time.perf_counter(), 0, {"loss": 0.0, "hint": 0.0}, 0, 0
        order = torch.randperm(len(Xtr), generator=shuffle)
        for i in range(0, len(order), params.batch_size):
            idx = order[i : i + params.batch_size]
            xb, yb = Xtr[idx], ytr[idx]
            features = student.forward_features(xb)
            logits = student.forward_head(features)
            if t_logits is not None:
                loss = kd_loss(logits, t_logits[idx], yb, params.temperature, params.alpha, params.label_smoothing)
            else:
                loss = label_loss(logits, yb, params.label_smoothing)
            if hint is not None:
                hint_term = hint(features, t_feats[idx])
                loss = loss + params.hint_weight * hint_term
                sums["hint"] += hint_term.item() * len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(idx)
            sums["loss"] += loss.item() * len(idx)
            labelled = yb != UNLABELLED
            correct += (logits.argmax(1)[labelled] == yb[labelled]).sum().item()
            n_labelled += labelled.sum().item()

        val_logits = predict_logits(student, Xva)
        val_acc = (val_logits.argmax(1) == yva).float().mean().item() if len(yva) else float("nan")
        result.history.append({
            "epoch": epoch, "train_loss": sums["loss"] / seen, "hint_loss": sums["hint"] / seen,
            "train_accuracy": correct / max(1, n_labelled),
            "val_loss": F.cross_entropy(val_logits, yva).item() if len(yva) else float("nan"),
            "val_accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": time.perf_counter() - t0,
        })
        if result.best_epoch < 0 or val_acc > result.best_val_accuracy:
            result.best_epoch, result.best_val_accuracy = epoch, val_acc
            best_state = copy.deepcopy(student.state_dict())
    student.load_state_dict(best_state)
    student.eval()
    return result


def train_without_kd(student: Classifier, X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray,
                     y_val: np.ndarray, params: DistillParams, seed: int) -> DistillResult:
    """The no-KD baseline: the same loop, epochs, label budget and seed, on the labels alone.

    Rows outside the label budget stay in the batches (contributing no loss),
    so both runs take the same number of optimiser steps and differ only in
    the teacher's soft targets.
    """
    labels_only = params.model_copy(update={"hint_weight": 0.0})
    return distill(None, student, X_train, y_train, X_val, y_val, labels_only, seed)


# ---------------------------------------------------------------------------- stage (I/O at the edge)


def student_arch(teacher_arch: dict, student: Classifier, params: DistillParams) -> dict:
    """The `arch.json` record that rebuilds `student` (see tasks/backbones.py)."""
    body = student.backbone
    if params.student == "teacher_blocks":
        return {**teacher_arch, "depth": params.student_depth, "widths": [b[0].out_channels for b in body.blocks]
                if isinstance(body, SmallCNN) else None, "source": "teacher_blocks"}
    shape = student.adapter.image_shape
    return {"kind": "builtin:cnn", "width": params.student_width, "depth": params.student_depth,
            "image_shape": list(shape) if shape else None, "n_features": teacher_arch["n_features"],
            "num_classes": student.head.out_features, "in_channels": shape[2] if shape else None,
            "input_size": list(shape[:2]) if shape else None, "dropout": 0.0, "source": "compact"}


def distill_stage(layout, params: DistillParams, seed: int) -> dict:
    """Distil artifacts/teacher into a student; train the no-KD twin; measure the KD gain.

    The gain (student with KD − without, frozen test split) is measured with
    all labels and at each `gain_label_budgets` labels per class.
    """
    from tasks.backbones import load_classifier, save_classifier
    from tasks.finetune import accuracy, classification_metrics, load_splits
    from tasks.plots import learning_curve

    pre, data = load_splits(layout)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = data["train"], data["val"], data["test"]
    teacher, teacher_arch = load_classifier(layout.teacher, len(pre["classes"]))
    n_features = Xtr.shape[1]

    def pair(p: DistillParams) -> tuple[DistillResult, DistillResult]:
        kd = distill(teacher, make_student(teacher, p, n_features, seed), Xtr, ytr, Xva, yva, p, seed)
        base = train_without_kd(make_student(teacher, p, n_features, seed), Xtr, ytr, Xva, yva, p, seed)
        return kd, base

    kd, base = pair(params)
    save_classifier(kd.model, student_arch(teacher_arch, kd.model, params), layout.student)
    save_classifier(base.model, student_arch(teacher_arch, base.model, params), layout.student_nokd)
    gains = {"all": {"kd": accuracy(kd.model, Xte, yte), "no_kd": accuracy(base.model, Xte, yte)}}
    for budget in params.gain_label_budgets:
        kd_b, base_b = pair(params.model_copy(update={"label_budget": budget}))
        gains[budget] = {"kd": accuracy(kd_b.model, Xte, yte), "no_kd": accuracy(base_b.model, Xte, yte)}
    for row in gains.values():
        row["gain"] = row["kd"] - row["no_kd"]
    test_pred = predict_logits(kd.model, torch.from_numpy(Xte)).argmax(1).numpy()
    plot = learning_curve(kd.history, layout.reports / "student_learning_curve.png", "student (KD)")
    return {"history": kd.history, "test": classification_metrics(yte, test_pred, pre["classes"]),
            "kd_gain": gains, "parameters": sum(p.numel() for p in kd.model.parameters()), "plot": str(plot)}


from prefect import task  # noqa: E402

from distilflow.caching import content_cache_key  # noqa: E402
from distilflow.records import StageResult  # noqa: E402


@task(name="distill", cache_key_fn=content_cache_key, persist_result=True)
def distill_task(teacher: Path, data: list[Path], params: DistillParams, seed: int, layout) -> StageResult:
    info = distill_stage(layout, params, seed)
    metrics = {f"test.{k}": v for k, v in info["test"].items()} | {"parameters": info["parameters"]}
    metrics |= {f"kd.{k}.{b}": v for b, row in info["kd_gain"].items() for k, v in row.items()}
    table = ["| labels | student with KD | without KD | KD gain |", "|---|---:|---:|---:|"]
    table += [f"| {'all' if b == 'all' else f'{b}/class'} | {r['kd']:.4f} | {r['no_kd']:.4f} | {r['gain']:+.4f} |"
              for b, r in info["kd_gain"].items()]
    return StageResult.of([layout.student, layout.student_nokd], metrics=metrics,
                          params=params.model_dump(mode="json"), artifacts=[info["plot"], str(layout.student)],
                          texts={"kd_gain.md": "\n".join(table) + "\n"},
                          history=info["history"],
                          info={"kd_gain": info["kd_gain"]})
