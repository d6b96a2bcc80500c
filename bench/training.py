"""6. Training throughput: `tasks/finetuning.py:fit` (on the one loop, `tasks/engine.py:train`) against a bare
PyTorch loop, same model and data.

The bare loop is the floor any trainer pays: forward, cross-entropy,
backward, AdamW step (torch's default implementation, as a user writes it),
over shuffled mini-batches. `fit` uses the fused AdamW kernel and skips the
clipping rescale when the gradient norm is within bounds; both count. `fit` adds what the
project asks of it (discriminative LR groups, warmup-cosine schedule,
gradient clipping, running loss/accuracy, a validation pass per epoch, best
weights). Both start from the same initial weights and run alternately,
`repeats` times each, in this process. Two ratios are reported: the training
loop alone (fit's own per-epoch samples/s, which excludes validation) and the
whole `fit` call per trained sample, validation included, against the bare
loop plus the same per-epoch validation pass (a forward over the val split
without grad), so both sides do the same arithmetic and the ratio shows only
what `fit` adds per sample. The whole `fit` call against the bare training
loop alone is reported too, for reference.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch.nn import functional as F

from bench.common import check, summarize
from tasks.engine import LoopConfig

VAL_BATCH = LoopConfig(epochs=1).val_batch_size  # the batch size fit() validates at: both sides do the same work


def bare_loop(
    model: torch.nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    X_val: np.ndarray | None = None,
    val_batch_size: int = VAL_BATCH,
) -> float:
    """Plain mini-batch AdamW training; returns training samples per second.

    With `X_val`, each epoch ends with a plain validation forward pass (eval
    mode, no grad, at `fit`'s validation batch size), the work `fit` does per epoch too.
    """
    torch.manual_seed(seed)
    Xt, yt = (
        torch.tensor(X, dtype=torch.float32),
        torch.tensor(y, dtype=torch.long),
    )  # copies: pandas hands out read-only arrays
    Xv = None if X_val is None else torch.tensor(X_val, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(Xt))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(Xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if Xv is not None:
            model.eval()
            with torch.no_grad():
                for i in range(0, len(Xv), val_batch_size):
                    model(Xv[i : i + val_batch_size])
    return epochs * len(Xt) / (time.perf_counter() - t0)


def _timed_pairs(model, data: dict, cfg, repeats: int, image_shape, seed: int) -> list[dict]:
    """`repeats` back-to-back rounds of fit, the bare loop, and the bare loop with validation, after one warm-up
    round; every side starts from the same initial weights. Samples/s of each side, per round."""
    from tasks.finetuning import fit

    (Xtr, ytr), (Xva, yva) = data["train"], data["val"]
    epochs, batch_size = cfg.epochs, cfg.batch_size
    initial = copy.deepcopy(model.state_dict())
    pairs = []
    for r in range(repeats + 1):  # pair 0 warms up both
        model.load_state_dict(initial)
        t0, c0 = time.perf_counter(), time.process_time()
        result = fit(model, Xtr, ytr, Xva, yva, cfg, seed, image_shape, desc="bench")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        model.load_state_dict(initial)
        bare = bare_loop(model, Xtr, ytr, epochs, batch_size, cfg.lr, seed)
        model.load_state_dict(initial)
        c2 = time.process_time()
        bare_val = bare_loop(model, Xtr, ytr, epochs, batch_size, cfg.lr, seed, X_val=Xva)
        bare_val_cpu = time.process_time() - c2
        if r == 0:
            continue
        pairs.append(
            {
                "fit loop": float(np.median([h["samples_per_s"] for h in result.history])),
                "fit end-to-end": epochs * len(Xtr) / wall,
                "bare loop": bare,
                "bare loop + validation": bare_val,
                "fit end-to-end (CPU time)": epochs * len(Xtr) / cpu,
                "bare loop + validation (CPU time)": epochs * len(Xtr) / bare_val_cpu,
            }
        )
    return pairs


def _fit_targets(name: str, ratios: dict, n_train: int, n_val: int) -> list[dict]:
    """fit()'s training loop and its whole call, each at least 0.95× the bare loop's samples/s."""
    return [
        check(
            f"training.{name}.loop",
            f"{name}: fit() training-loop samples/s / bare PyTorch loop",
            ratios["ratio_loop"]["median"],
            ">=",
            0.95,
        ),
        check(
            f"training.{name}.end_to_end",
            f"{name}: fit() end-to-end samples/s / bare PyTorch loop with the same per-epoch validation pass",
            ratios["ratio_end_to_end"]["median"],
            ">=",
            0.95,
            note=f"validation is {n_val} rows per epoch against {n_train} trained; CPU-time ratio "
            f"{ratios['ratio_end_to_end_cpu']['median']:.2f}×; against the bare training loop alone (no validation) "
            f"{ratios['ratio_end_to_end_vs_training_only']['median']:.2f}×",
        ),
    ]


def compare_fit(
    name: str,
    model: torch.nn.Module,
    data: dict,
    epochs: int,
    repeats: int,
    image_shape,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """`repeats` back-to-back pairs (fit, then the bare loop) after one warm-up pair; ratios taken per pair.

    A ratio per pair, then the median over pairs: a slow spell of the machine
    that spans a pair cancels out, which comparing two medians would not do.
    CPU time (all threads of this process) is the cross-check that other
    processes on the machine disturb least.
    """
    from distilflow.params import TrainParams

    cfg = TrainParams(epochs=epochs, batch_size=batch_size, patience=epochs, device="cpu")
    pairs = _timed_pairs(model, data, cfg, repeats, image_shape, seed)
    per_pair = lambda num, den: summarize([p[num] / p[den] for p in pairs])  # noqa: E731
    ratios = {
        "ratio_loop": per_pair("fit loop", "bare loop"),
        "ratio_end_to_end": per_pair("fit end-to-end", "bare loop + validation"),
        "ratio_end_to_end_cpu": per_pair("fit end-to-end (CPU time)", "bare loop + validation (CPU time)"),
        "ratio_end_to_end_vs_training_only": per_pair("fit end-to-end", "bare loop"),
    }
    n_train, n_val = int(len(data["train"][1])), int(len(data["val"][1]))
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_rows": n_train,
        "val_rows": n_val,
        "epochs": epochs,
        "batch_size": batch_size,
        "samples_per_s": {k: summarize([p[k] for p in pairs]) for k in pairs[0]},
        "pairs": pairs,
        **ratios,
        "targets": _fit_targets(name, ratios, n_train, n_val),
    }


def ddp_scaling(model: torch.nn.Module, data: dict, epochs: int, pairs: int, image_shape) -> dict:
    """fit() in one process (2 threads) against the same call as DDP over 2 processes (1 thread each), alternating.

    Same global batch and seed on both sides. Wall time includes DDP's process start and rendezvous;
    the per-epoch samples/s (from fit's own history) leaves them out. On a 2-core machine this only
    shows what data parallelism costs or saves against intra-op threads; it says nothing of GPUs.
    """
    from distilflow.params import TrainParams
    from tasks.finetuning import fit

    (Xtr, ytr), (Xva, yva) = data["train"], data["val"]
    initial = copy.deepcopy(model.state_dict())
    rows = []
    for r in range(pairs + 1):
        row = {}
        for label, devices, threads in (("1 process × 2 threads", 1, 2), ("DDP 2 processes × 1 thread", 2, 1)):
            model.load_state_dict(initial)
            cfg = TrainParams(epochs=epochs, patience=epochs, device="cpu", devices=devices, threads=threads)
            t0 = time.perf_counter()
            result = fit(model, Xtr, ytr, Xva, yva, cfg, 0, image_shape, desc="bench ddp")
            row[label] = {
                "wall_samples_per_s": epochs * len(ytr) / (time.perf_counter() - t0),
                "epoch_samples_per_s": float(np.median([h["samples_per_s"] for h in result.history])),
                "val_accuracy": result.history[-1]["val_accuracy"],
            }
        if r:
            rows.append(row)
    labels = list(rows[0])
    return {
        "pairs": rows,
        "wall_ratio": summarize(
            [p[labels[1]]["wall_samples_per_s"] / p[labels[0]]["wall_samples_per_s"] for p in rows]
        ),
        "epoch_ratio": summarize(
            [p[labels[1]]["epoch_samples_per_s"] / p[labels[0]]["epoch_samples_per_s"] for p in rows]
        ),
        "note": "DDP over 2 CPU processes vs 1 process with 2 threads, same global batch 64; gloo backend",
    }


def run(epochs: int = 2, repeats: int = 5, resnet: bool = True) -> dict:
    """On digits: `cnn` = the demo teacher's family (width 32, depth 4, 8×8 resized to 28×28);
    `resnet18` = the 11M-parameter ResNet-18 layout at the native 8×8."""
    from bench.quality import digits_splits
    from distilflow.params import BackboneParams
    from tasks.backbones import load_backbone

    torch.set_num_threads(2)
    data = digits_splits()
    models = {
        "cnn": BackboneParams(spec="builtin:cnn", width=32, depth=4, input_size=(28, 28)),
        "resnet18": BackboneParams(spec="builtin:resnet18"),
    }
    results = []
    for name, bp in list(models.items())[: 2 if resnet else 1]:
        torch.manual_seed(0)
        model, _ = load_backbone(bp, (8, 8, 1), 64, 10)
        results.append(compare_fit(name, model, data, epochs, repeats, (8, 8, 1)))
        r = results[-1]
        print(
            f"  training {name}: fit loop {r['ratio_loop']['median']:.3f}×, end-to-end "
            f"{r['ratio_end_to_end']['median']:.3f}× of the bare loop",
            flush=True,
        )
    torch.manual_seed(0)
    cnn, _ = load_backbone(models["cnn"], (8, 8, 1), 64, 10)
    ddp = ddp_scaling(cnn, data, epochs, max(1, repeats // 2), (8, 8, 1))
    print(
        f"  training ddp: 2 processes / 1 process, epoch samples/s {ddp['epoch_ratio']['median']:.2f}×, "
        f"wall {ddp['wall_ratio']['median']:.2f}×",
        flush=True,
    )
    cuda = torch.cuda.is_available()
    return {
        "setting": f"sklearn digits train split ({len(data['train'][1])} rows), batch 64, {epochs} epochs per "
        f"run, {repeats} back-to-back pairs after one warm-up pair (ratio per pair, median over "
        f"pairs), torch threads {torch.get_num_threads()}, CPU",
        "cuda": (
            "not measured: a GPU is present, but this harness times the CPU path only"
            if cuda
            else "not measured: no GPU in this session (the CUDA path, bf16 autocast and pinned memory, is "
            "untested here)"
        ),
        "models": results,
        "ddp": ddp,
        "targets": [t for r in results for t in r["targets"]],
    }
