"""The distill stage: the teacher's knowledge into a compact student, and the same student without it.

The KD loss, the hint and the student live in `tasks/kd.py`; this module is
the stage's I/O. The no-KD twin (same architecture, budget, seed, labels
only) is saved too: the KD gain is measured against it, and the product
selection may ship it when it is better.
"""

from __future__ import annotations

from pathlib import Path

from distilflow.hashing import params_hash, path_hash
from distilflow.io import write_json
from distilflow.params import DistillParams
from distilflow.records import StageResult
from tasks import kd
from tasks.backbones import load_classifier, save_classifier
from tasks.dataset import load_splits
from tasks.inference import TorchPredictor
from tasks.metrics import accuracy, classification_metrics
from tasks.models import Classifier, SmallCNN, count_parameters
from tasks.plots import confusion_matrix_plot, learning_curve, write_history


def student_arch(teacher_arch: dict, student: Classifier, cfg: DistillParams) -> dict:
    """The `arch.json` record that rebuilds `student` (see tasks/backbones.py)."""
    body = student.backbone
    if cfg.student == "teacher_blocks":
        return {
            **teacher_arch,
            "depth": cfg.student_depth,
            "widths": [b[0].out_channels for b in body.blocks] if isinstance(body, SmallCNN) else None,
            "source": "teacher_blocks",
        }
    shape = student.adapter.image_shape
    return {
        "kind": "builtin:cnn",
        "width": cfg.student_width,
        "depth": cfg.student_depth,
        "image_shape": list(shape) if shape else None,
        "n_features": teacher_arch["n_features"],
        "num_classes": student.head.out_features,
        "in_channels": shape[2] if shape else None,
        "input_size": list(shape[:2]) if shape else None,
        "dropout": 0.0,
        "source": "compact",
    }


def distill_stage(
    train: Path,
    val: Path,
    test: Path,
    preprocessor: Path,
    teacher: Path,
    student: Path,
    student_nokd: Path,
    student_metrics: Path,
    student_history: Path,
    student_curve: Path,
    student_confusion: Path,
    cfg: DistillParams,
    seed: int,
    device: str,
    threads: int | None,
    checkpoints: Path,
    on_epoch=None,
) -> StageResult:
    """Distil the teacher into a student; train the no-KD twin; measure the KD gain on the frozen test split.

    The gain (student with KD − without) is measured with all labels and at
    each `gain_label_budgets` labels per class.
    """
    pre, data = load_splits(train, val, test, preprocessor)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = data["train"], data["val"], data["test"]
    teacher_model, teacher_arch = load_classifier(teacher, len(pre["classes"]))
    n_features = Xtr.shape[1]
    loop = dict(device=device, threads=threads)
    # everything that shapes the runs, so a resume never continues from other inputs' weights
    key = params_hash([path_hash(p) for p in (train, val, preprocessor, teacher)] + [seed])

    def pair(p: DistillParams, watch=None):
        run = f"{key}-{params_hash(p.model_dump(mode='json'))}"
        with_kd = kd.distill(
            teacher_model,
            kd.make_student(teacher_model, p, n_features, seed),
            Xtr,
            ytr,
            Xva,
            yva,
            p,
            seed,
            on_epoch=watch,
            checkpoint=checkpoints / f"distill-{run}-kd.pt",
            **loop,
        )
        without = kd.train_without_kd(
            kd.make_student(teacher_model, p, n_features, seed),
            Xtr,
            ytr,
            Xva,
            yva,
            p,
            seed,
            checkpoint=checkpoints / f"distill-{run}-nokd.pt",
            **loop,
        )
        return with_kd, without

    with_kd, without = pair(cfg, on_epoch)
    save_classifier(with_kd.model, student_arch(teacher_arch, with_kd.model, cfg), student)
    save_classifier(without.model, student_arch(teacher_arch, without.model, cfg), student_nokd)
    gains = {
        "all": {
            "kd": accuracy(with_kd.model, Xte, yte),
            "no_kd": accuracy(without.model, Xte, yte),
            "kd_val": with_kd.best_val_accuracy,
            "no_kd_val": without.best_val_accuracy,
        }
    }
    for budget in cfg.gain_label_budgets:
        kd_b, base_b = pair(cfg.model_copy(update={"label_budget": budget}))
        gains[budget] = {
            "kd": accuracy(kd_b.model, Xte, yte),
            "no_kd": accuracy(base_b.model, Xte, yte),
            "kd_val": kd_b.best_val_accuracy,
            "no_kd_val": base_b.best_val_accuracy,
        }
    for row in gains.values():
        row["gain"] = row["kd"] - row["no_kd"]
    for stale in checkpoints.glob(f"distill-{key}-*.pt"):
        stale.unlink(missing_ok=True)

    test_pred = TorchPredictor(with_kd.model)(Xte).argmax(1)
    metrics = {f"test.{k}": v for k, v in classification_metrics(yte, test_pred, pre["classes"]).items()}
    metrics |= {"val.accuracy": with_kd.best_val_accuracy, "parameters": count_parameters(with_kd.model)}
    metrics |= {f"kd.{k}.{b}": v for b, row in gains.items() for k, v in row.items()}
    write_json({**metrics, "kd_gain": {str(b): row for b, row in gains.items()}}, student_metrics)
    write_history(with_kd.history, student_history)
    learning_curve(with_kd.history, student_curve, "student (KD)")
    confusion_matrix_plot(yte, test_pred, pre["classes"], student_confusion, "student (KD): test confusion")
    table = [
        "| labels | student with KD | without KD | KD gain (test) | val with / without |",
        "|---|---:|---:|---:|---:|",
    ]
    table += [
        f"| {'all' if b == 'all' else f'{b}/class'} | {r['kd']:.4f} | {r['no_kd']:.4f} | {r['gain']:+.4f} | "
        f"{r['kd_val']:.4f} / {r['no_kd_val']:.4f} |"
        for b, r in gains.items()
    ]
    return StageResult(
        metrics=metrics,
        params=cfg.model_dump(mode="json"),
        artifacts=[str(student_curve), str(student_confusion), str(student)],
        texts={"kd_gain.md": "\n".join(table) + "\n"},
        history=with_kd.history,
        info={"kd_gain": gains},
    )
