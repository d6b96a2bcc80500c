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


class Twins:
    """The KD student and its no-KD twin: the same architecture, inputs, label budget and seed, with or without
    the teacher's soft targets. Each run checkpoints under a key of everything that shapes it."""

    def __init__(self, teacher: Classifier, data: dict, seed: int, key: str, checkpoints: Path, **loop):
        self.teacher, self.seed, self.key, self.checkpoints, self.loop = teacher, seed, key, checkpoints, loop
        (self.Xtr, self.ytr), (self.Xva, self.yva) = data["train"], data["val"]

    def train(self, p: DistillParams, on_epoch=None) -> tuple:
        """(with KD, without KD) FitResults for distill params `p`."""
        run = f"{self.key}-{params_hash(p.model_dump(mode='json'))}"
        split = (self.Xtr, self.ytr, self.Xva, self.yva, p, self.seed)
        n_features = self.Xtr.shape[1]
        with_kd = kd.distill(
            self.teacher,
            kd.make_student(self.teacher, p, n_features, self.seed),
            *split,
            on_epoch=on_epoch,
            checkpoint=self.checkpoints / f"distill-{run}-kd.pt",
            **self.loop,
        )
        student = kd.make_student(self.teacher, p, n_features, self.seed)
        without = kd.train_without_kd(
            student, *split, checkpoint=self.checkpoints / f"distill-{run}-nokd.pt", **self.loop
        )
        return with_kd, without

    def forget(self) -> None:
        """Drop this stage's checkpoints once its runs are done."""
        for stale in self.checkpoints.glob(f"distill-{self.key}-*.pt"):
            stale.unlink(missing_ok=True)


def _gain(with_kd, without, X_test, y_test) -> dict:
    kd_acc, no_kd_acc = accuracy(with_kd.model, X_test, y_test), accuracy(without.model, X_test, y_test)
    return {
        "kd": kd_acc,
        "no_kd": no_kd_acc,
        "kd_val": with_kd.best_val_accuracy,
        "no_kd_val": without.best_val_accuracy,
        "gain": kd_acc - no_kd_acc,
    }


def gain_table(gains: dict) -> str:
    """The KD gain per label budget, as the markdown table the distill run shows."""
    table = [
        "| labels | student with KD | without KD | KD gain (test) | val with / without |",
        "|---|---:|---:|---:|---:|",
    ]
    table += [
        f"| {'all' if b == 'all' else f'{b}/class'} | {r['kd']:.4f} | {r['no_kd']:.4f} | {r['gain']:+.4f} | "
        f"{r['kd_val']:.4f} / {r['no_kd_val']:.4f} |"
        for b, r in gains.items()
    ]
    return "\n".join(table) + "\n"


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
    Xte, yte = data["test"]
    teacher_model, teacher_arch = load_classifier(teacher, len(pre["classes"]))
    # everything that shapes the runs, so a resume never continues from other inputs' weights
    key = params_hash([path_hash(p) for p in (train, val, preprocessor, teacher)] + [seed])
    twins = Twins(teacher_model, data, seed, key, checkpoints, device=device, threads=threads)
    with_kd, without = twins.train(cfg, on_epoch)
    save_classifier(with_kd.model, student_arch(teacher_arch, with_kd.model, cfg), student)
    save_classifier(without.model, student_arch(teacher_arch, without.model, cfg), student_nokd)
    gains = {"all": _gain(with_kd, without, Xte, yte)}
    for budget in cfg.gain_label_budgets:
        gains[budget] = _gain(*twins.train(cfg.model_copy(update={"label_budget": budget})), Xte, yte)
    twins.forget()

    test_pred = TorchPredictor(with_kd.model)(Xte).argmax(1)
    metrics = {f"test.{k}": v for k, v in classification_metrics(yte, test_pred, pre["classes"]).items()}
    metrics |= {"val.accuracy": with_kd.best_val_accuracy, "parameters": count_parameters(with_kd.model)}
    metrics |= {f"kd.{k}.{b}": v for b, row in gains.items() for k, v in row.items()}
    write_json({**metrics, "kd_gain": {str(b): row for b, row in gains.items()}}, student_metrics)
    write_history(with_kd.history, student_history)
    learning_curve(with_kd.history, student_curve, "student (KD)")
    confusion_matrix_plot(yte, test_pred, pre["classes"], student_confusion, "student (KD): test confusion")
    return StageResult(
        metrics=metrics,
        params=cfg.model_dump(mode="json"),
        artifacts=[str(student_curve), str(student_confusion), str(student)],
        texts={"kd_gain.md": gain_table(gains)},
        history=with_kd.history,
        info={"kd_gain": gains},
    )
