"""Figures people would rather look at than read: learning curves, confusion matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(history: list[dict], path: str | Path, title: str = "fine-tuning") -> Path:
    """Loss and accuracy per epoch, train against val, as a PNG.

    Cross-entropy is compared with cross-entropy: for a distilled student the
    training objective (T²·KL soft term + alpha · label CE) is drawn in a
    panel of its own, term by term, instead of beside the validation CE.
    """
    plt = _pyplot()
    epochs = [h["epoch"] + 1 for h in history]
    terms = [k for k in ("train_soft_loss", "train_label_loss", "train_hint_loss") if k in history[0]]
    fig, axes = plt.subplots(1, 3 if terms else 2, figsize=(13 if terms else 9, 3.5))
    ax_loss, ax_acc = axes[-2], axes[-1]
    if terms:
        labels = {
            "train_soft_loss": "soft targets: T²·KL(teacher ‖ student)",
            "train_label_loss": "labels: CE",
            "train_hint_loss": "FitNets hint: MSE",
        }
        for key in terms:
            axes[0].plot(epochs, [h[key] for h in history], "o-", label=labels[key])
        axes[0].set(xlabel="epoch", ylabel="loss term (train)", title=f"{title}: distillation objective")
        ax_loss.plot(epochs, [h["train_label_loss"] for h in history], "o-", label="train CE (labelled rows)")
    else:
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train CE")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val CE")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: cross-entropy")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def accuracy_latency_plot(
    names: list[str], latency_ms, accuracy, size_bytes, front, path: str | Path, title: str, xlabel: str, ylabel: str
) -> Path:
    """Accuracy against latency, bubble area ∝ size, the Pareto front joined by a line.

    Points are numbered and named in a key beside the axes, so long names
    never collide, and the axes leave room for the largest bubble.
    """
    plt = _pyplot()
    latency_ms, accuracy, size_bytes = (np.asarray(v, dtype=float) for v in (latency_ms, accuracy, size_bytes))
    front = np.asarray(front, dtype=bool)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    area = 60 + 900 * size_bytes / max(size_bytes.max(), 1)
    colors = np.where(front, "tab:red", "tab:blue")
    ax.scatter(latency_ms, accuracy, s=area, alpha=0.45, c=colors, edgecolors="black")
    for i, (x, y) in enumerate(zip(latency_ms, accuracy)):
        ax.annotate(str(i + 1), (x, y), ha="center", va="center", fontsize=8, weight="bold")
    order = np.argsort(latency_ms[front])
    ax.plot(latency_ms[front][order], accuracy[front][order], "--", color="tab:red", lw=1, label="Pareto front")
    if latency_ms.min() > 0 and latency_ms.max() / latency_ms.min() > 20:  # torch teacher vs int8 student: decades
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.18)  # room for the biggest bubble at the edges
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    key = "\n".join(
        f"{i + 1}. {n} ({s / 1024:,.0f} KB){' *' if f else ''}"
        for i, (n, s, f) in enumerate(zip(names, size_bytes, front))
    )
    fig.text(0.70, 0.5, key + "\n\n* on the Pareto front", va="center", fontsize=8, family="monospace")
    fig.tight_layout(rect=(0, 0, 0.69, 1))
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """The figure as a PNG, written beside `path` and renamed into place (never half-written)."""
    from distilflow.io import atomic_path

    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def confusion_matrix_plot(y_true: np.ndarray, y_pred: np.ndarray, classes: list, path: str | Path, title: str) -> Path:
    """The confusion matrix (rows: true class, columns: predicted) as a PNG."""
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(cm, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                cm[i, j],
                ha="center",
                va="center",
                fontsize=7,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def write_history(history: list[dict], path: str | Path) -> Path:
    """Per-epoch values as CSV, one row per epoch (what `dvc plots show` draws)."""
    import pandas as pd

    from distilflow.io import atomic_path

    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False, float_format="%.6g")
    return Path(path)
