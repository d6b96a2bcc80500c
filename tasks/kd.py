"""Knowledge distillation as a training objective: Hinton's soft targets, the FitNets hint, the student.

The loss is Hinton et al. 2015 ("Distilling the Knowledge in a Neural
Network"): the KL divergence between temperature-softened teacher and student
distributions, scaled by T², mixed with the usual cross-entropy on labels;
optionally plus a FitNets hint (Romero et al. 2015) that pulls the student's
features towards the teacher's through a learned linear projection.

The teacher never changes and the training inputs are not augmented, so its
logits (and features, for the hint) are computed once up front; every epoch
then costs only the student's forward and backward passes. Training itself is
the one loop, `tasks/engine.py:train`. No Prefect here: the losses import
only torch.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distilflow.errors import DistilflowError
from distilflow.params import DistillParams
from tasks.engine import IGNORE, FitResult, LoopConfig, masked_cross_entropy, train
from tasks.inference import TorchPredictor
from tasks.models import MLP, Classifier, SmallCNN, builtin_classifier
from tasks.splits import label_budget_subset

UNLABELLED = IGNORE  # label value for rows outside the label budget: they feed the soft term only


# ---------------------------------------------------------------------------- losses


def label_loss(student_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the labelled rows of the batch (label −1 = unlabelled).

    Averaged over labelled rows only, and 0 (not NaN) for a batch without any,
    so a label budget only thins the label term instead of poisoning it.
    """
    return masked_cross_entropy(student_logits, labels, label_smoothing)


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch.

    The softened gradients shrink as 1/T², so multiplying by T² keeps this
    term's size comparable to the label term whatever T is (Hinton 2015, §2).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
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
        """The hint loss of a batch."""
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
            f"got a {type(body).__name__} backbone; use distill.student=compact"
        )
    n_blocks = len(body.blocks)
    if not 1 <= depth < n_blocks:
        raise DistilflowError(
            f"distill.student_depth={depth}: a teacher_blocks student keeps fewer blocks than the teacher's "
            f"{n_blocks}; set it between 1 and {n_blocks - 1}"
        )
    new_body = copy.deepcopy(body)
    new_body.blocks = nn.ModuleList(list(new_body.blocks)[:depth])
    last = new_body.blocks[-1]
    new_body.feature_dim = last[0].out_channels if isinstance(body, SmallCNN) else last[0].out_features
    return Classifier(
        copy.deepcopy(teacher.adapter),
        new_body,
        new_body.feature_dim,
        teacher.head.out_features,
        blocks=list(new_body.blocks),
    )


def make_student(
    teacher: Classifier, params: DistillParams, n_features: int | None = None, seed: int | None = None
) -> Classifier:
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
        return builtin_classifier(
            image_shape, n_in, teacher.head.out_features, width=params.student_width, depth=params.student_depth
        )


# ---------------------------------------------------------------------------- training


def _labels_within_budget(y: np.ndarray, budget: int | None, seed: int) -> torch.Tensor:
    y = torch.as_tensor(np.array(y), dtype=torch.long)  # a copy: pandas hands out read-only arrays
    if budget is None:
        return y
    keep = torch.as_tensor(label_budget_subset(y.numpy(), budget, seed))
    masked = torch.full_like(y, UNLABELLED)
    masked[keep] = y[keep]
    return masked


class _Trainee(nn.Module):
    """The student (and the hint projection) as the loop trains it: logits out, features kept for the hint.

    Features go through an attribute rather than a second output, so the
    forward stays the one DistributedDataParallel wraps and validation calls.
    """

    def __init__(self, student: Classifier, hint: HintLoss | None):
        super().__init__()
        self.student, self.hint = student, hint
        self.features: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features = self.student.forward_features(x)
        return self.student.forward_head(self.features)


def kd_objective(
    trainee: _Trainee, temperature: float, alpha: float, label_smoothing: float = 0.0, hint_weight: float = 0.0
):
    """The loop's objective: `kd_loss` on rows with cached teacher logits (+ the hint), or labels alone without them.

    The soft and label terms are reported separately (`soft_loss`, `label_loss`), so
    the learning curve shows what each contributes.
    """

    def objective(model: nn.Module, batch: dict):
        logits = model(batch["x"]).float()
        features = trainee.features
        parts = {}
        if "teacher_logits" in batch:
            parts["soft_loss"] = soft_target_loss(logits, batch["teacher_logits"], temperature)
            parts["label_loss"] = label_loss(logits, batch["y"], label_smoothing) if alpha > 0 else logits.new_zeros(())
            loss = parts["soft_loss"] + alpha * parts["label_loss"]
        else:
            loss = parts["label_loss"] = label_loss(logits, batch["y"], label_smoothing)
        if trainee.hint is not None:
            parts["hint_loss"] = trainee.hint(features.float(), batch["teacher_features"])
            loss = loss + hint_weight * parts["hint_loss"]
        return loss, logits, {k: v.detach() for k, v in parts.items()}

    return objective


def distill(
    teacher: Classifier | None,
    student: Classifier,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    params: DistillParams,
    seed: int,
    device: str = "cpu",
    threads: int | None = None,
    checkpoint=None,
    desc: str = "distill",
    on_epoch=None,
) -> FitResult:
    """Train `student` (in place) on teacher soft targets + labels; return it at its best validation epoch.

    AdamW with cosine decay to 0 over `params.epochs`, no early stopping; the
    best-validation weights are restored at the end. Deterministic for a seed
    on CPU. `teacher=None` trains on the labels alone (the no-KD baseline,
    see `train_without_kd`) and then needs hint_weight=0.
    """
    if teacher is None and params.hint_weight > 0:
        raise DistilflowError("distill: hint_weight > 0 needs a teacher model")
    data = {"x": X_train, "y": _labels_within_budget(y_train, params.label_budget, seed)}
    hint = None
    if teacher is not None:
        predictor = TorchPredictor(teacher)
        data["teacher_logits"] = predictor.outputs(X_train)
        if params.hint_weight > 0:
            data["teacher_features"] = predictor.outputs(X_train, features=True)
            with torch.random.fork_rng(devices=[]):  # the projection's initial weights come from the seed alone
                torch.manual_seed(seed)
                hint = HintLoss(student.feature_dim, data["teacher_features"].shape[1])
    cfg = LoopConfig.of(params, device=device, threads=threads)
    trainee = _Trainee(student, hint)
    objective = kd_objective(trainee, params.temperature, params.alpha, params.label_smoothing, params.hint_weight)
    result = train(
        trainee, data, (X_val, y_val), cfg, seed, objective, checkpoint=checkpoint, desc=desc, on_epoch=on_epoch
    )
    result.model = student
    return result


def train_without_kd(
    student: Classifier,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    params: DistillParams,
    seed: int,
    **loop,
) -> FitResult:
    """The no-KD baseline: the same loop, epochs, label budget and seed, on the labels alone.

    Rows outside the label budget stay in the batches (contributing no loss),
    so both runs take the same number of optimiser steps and differ only in
    the teacher's soft targets.
    """
    labels_only = params.model_copy(update={"hint_weight": 0.0})
    return distill(None, student, X_train, y_train, X_val, y_val, labels_only, seed, desc="no-KD baseline", **loop)
