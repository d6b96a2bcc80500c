"""The finetune stage: the pretrained backbone, fine-tuned on the train split, becomes the teacher.

Strategies are data (`train.strategy`), not subclasses; the loop is
`tasks/finetuning.py:fit`. A checkpoint after every epoch, keyed by everything
that shapes the run, lets a killed run resume where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distilflow.hashing import params_hash, path_hash
from distilflow.io import write_json
from distilflow.params import BackboneParams, TrainParams
from distilflow.records import StageResult
from tasks.backbones import load_backbone, save_classifier
from tasks.dataset import load_splits
from tasks.finetuning import fit
from tasks.inference import TorchPredictor
from tasks.metrics import classification_metrics
from tasks.models import count_parameters
from tasks.plots import confusion_matrix_plot, learning_curve, write_history
from tasks.splits import label_budget_subset


def finetune_stage(
    train: Path,
    val: Path,
    test: Path,
    preprocessor: Path,
    backbone: Path,
    teacher: Path,
    teacher_metrics: Path,
    teacher_history: Path,
    teacher_curve: Path,
    teacher_confusion: Path,
    spec: BackboneParams,
    train_params: TrainParams,
    seed: int,
    image_shape,
    checkpoints: Path,
    on_epoch=None,
) -> StageResult:
    """Fine-tune the backbone on the train split; save the best epoch's model as the teacher."""
    pre, data = load_splits(train, val, test, preprocessor)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = data["train"], data["val"], data["test"]
    if train_params.label_budget:
        keep = label_budget_subset(ytr, train_params.label_budget, seed)
        Xtr, ytr = Xtr[keep], ytr[keep]
    torch.manual_seed(seed)  # the new head's (and a from-scratch backbone's) initial weights
    model, arch = load_backbone(spec, image_shape, Xtr.shape[1], len(pre["classes"]), backbone, pre=pre)
    # everything that shapes the run, so a resume never continues from other inputs' weights
    key = params_hash(
        [path_hash(p) for p in (train, val, preprocessor, backbone)]
        + [spec.model_dump(mode="json"), train_params.model_dump(mode="json"), seed, image_shape]
    )
    checkpoint = checkpoints / f"finetune-{key}.pt"
    fitted = fit(
        model, Xtr, ytr, Xva, yva, train_params, seed, image_shape, checkpoint, desc="fine-tune", on_epoch=on_epoch
    )
    save_classifier(model, arch, teacher)
    checkpoint.unlink(missing_ok=True)

    predict = TorchPredictor(model)
    test_pred, val_pred = predict(Xte).argmax(1), predict(Xva).argmax(1)
    metrics = {f"test.{k}": v for k, v in classification_metrics(yte, test_pred, pre["classes"]).items()}
    metrics |= {f"val.{k}": v for k, v in classification_metrics(yva, val_pred, pre["classes"]).items()}
    metrics |= {"parameters": count_parameters(model), "best_epoch": fitted.best_epoch, "train_rows": len(ytr)}
    write_json(metrics, teacher_metrics)
    write_history(fitted.history, teacher_history)
    learning_curve(fitted.history, teacher_curve, "teacher")
    confusion_matrix_plot(yte, test_pred, pre["classes"], teacher_confusion, "teacher: test confusion")
    source = arch.get("source", spec.spec)
    return StageResult(
        metrics=metrics,
        params={"backbone": spec.model_dump(mode="json"), "train": train_params.model_dump(mode="json")},
        tags={"backbone.source": source},
        artifacts=[str(teacher_curve), str(teacher_confusion), str(teacher)],
        history=fitted.history,
        info={
            "best_epoch": fitted.best_epoch,
            "stopped_early": fitted.stopped_early,
            "resumed_from_epoch": fitted.resumed_from_epoch,
            "arch_source": source,
        },
    )
