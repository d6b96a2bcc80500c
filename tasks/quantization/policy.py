"""Post-training int8 within an accuracy budget: `quantize_int8` and its remedies, cheapest first.

If int8 loses more than `max_accuracy_drop` of validation accuracy against
its own fp32 source, the remedies run in order, and the first one within
budget wins:
  1. calibration: per-channel weights with percentile, then min/max ranges
     (outliers stretch a min/max range and crush everything else). Entropy is
     not tried: ORT's quantize_static does not pass its bin count on, and its
     ranges come out equal to min/max's (measured);
  2. exclude_stem: the first conv in fp32. The input layer is the most
     sensitive one in practice (Krishnamoorthi 2018, "Quantizing deep
     convolutional networks for efficient inference"); on EfficientNet-Lite0 it
     alone brought int8 from 98.9% to 99.4% agreement with fp32 (bench/);
  3. exclude_sensitive: a sensitivity pass quantizes the model once per
     conv/linear layer with only that layer left in fp32, ranks layers by how
     much that lowers the accuracy drop (logit error breaks ties), then leaves
     the worst 1, 2, ..., `exclude_sensitive_max` in fp32;
  4. qat: only if `quantize.qat`: a short fake-quant fine-tune
     (tasks/quantization/qat.py), then the same quantizer again.
The backends calibrate once per method and reuse the ranges for every attempt
and probe. The winner is then quantized in each of `quantize.formats`, and of
those within budget the fastest (batch 1 and 256, against the fp32 model,
round-robin) is kept; when even that is no faster than fp32, the record says
int8 does not pay for this model, and why as far as it can be told. Every
candidate is written under a scratch folder; only a model within budget is
moved to the output path, so an over-budget model is never left there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from torch import nn

from distilflow.errors import DistilflowError
from distilflow.io import atomic_path
from distilflow.params import QuantizeParams
from tasks.inference import measure_latency
from tasks.quantization.attempt import Attempt, calibration_subset
from tasks.quantization.cpu import has_vnni, reduce_range
from tasks.quantization.fx import TorchFxBackend
from tasks.quantization.ort import OrtBackend
from tasks.quantization.qat import qat_finetune

BACKENDS = {"onnx": OrtBackend, "torch_fx": TorchFxBackend}
SPEED_BATCHES = (1, 256)


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean()) if len(y) else float("nan")


class Ladder:
    """The attempts on one model, each scored on the validation split against its fp32 source."""

    def __init__(self, backend, X_val: np.ndarray, y_val: np.ndarray, params: QuantizeParams, scratch: Path):
        self.backend, self.X_val, self.y_val, self.params, self.scratch = backend, X_val, y_val, params, scratch
        self.fp32_logits = backend.fp32_predict()(X_val)
        self.fp32_acc = _accuracy(self.fp32_logits, y_val)
        self.tried: list[tuple[Attempt, Path, dict]] = []
        self.sensitivity: list[dict] = []
        self.qat = "not needed" if params.qat else "off (quantize.qat=false): QAT was not run"

    def run(self, attempt: Attempt, on=None) -> bool:
        """Quantize with `attempt` (on the QAT model's backend if given); whether it is within budget."""
        on = on or self.backend
        path = self.scratch / f"attempt{len(self.tried)}{on.suffix}"
        on.quantize(attempt, path)
        logits = on.predict(path)(self.X_val)
        acc = _accuracy(logits, self.y_val)
        result = {
            "remedy": attempt.remedy,
            "per_channel": attempt.per_channel,
            "calibration_method": attempt.calibration_method,
            "excluded": list(attempt.excluded),
            "int8_accuracy": acc,
            "accuracy_drop": self.fp32_acc - acc,
            "agreement_with_fp32": float((logits.argmax(1) == self.fp32_logits.argmax(1)).mean()),
            "logit_mse": float(np.mean((logits - self.fp32_logits) ** 2)),
            "within_budget": self.fp32_acc - acc <= self.params.max_accuracy_drop + 1e-12,
        }
        self.tried.append((attempt, path, result))
        return result["within_budget"]

    def best(self) -> tuple[Attempt, Path, dict]:
        """The closest attempt so far: least accuracy lost, then least logit error."""
        return min(self.tried, key=lambda t: (t[2]["accuracy_drop"], t[2]["logit_mse"]))

    @property
    def last(self) -> dict:
        """The latest attempt's result."""
        return self.tried[-1][2]


def as_configured(ladder: Ladder, p: QuantizeParams) -> str | None:
    """The configured quantizer, as is."""
    if ladder.run(Attempt("none", p.per_channel, p.calibration_method, format=p.formats[0])):
        return f"within budget as configured (drop {ladder.last['accuracy_drop']:.4f} ≤ {p.max_accuracy_drop})"
    return None


def other_calibration(ladder: Ladder, p: QuantizeParams) -> str | None:
    """Remedy 1: per-channel weights with each of the other activation-range methods."""
    first = ladder.tried[0][2]
    for method in dict.fromkeys((p.calibration_method, "percentile", "minmax")):
        if (True, method) == (p.per_channel, p.calibration_method):
            continue  # that is the configured attempt that just failed
        if ladder.run(Attempt("calibration", True, method, format=p.formats[0])):
            return (
                f"{p.calibration_method} calibration{'' if p.per_channel else ' (per-tensor)'} "
                f"lost {first['accuracy_drop']:.4f} > {p.max_accuracy_drop}; per-channel {method} ranges fixed it"
            )
    return None


def exclude_stem(ladder: Ladder, p: QuantizeParams) -> str | None:
    """Remedy 2: the first conv (the stem, which sees the raw pixels) in fp32, with the best ranges so far."""
    layers = ladder.backend.candidates()
    if p.exclude_sensitive_max <= 0 or len(layers) < 2:
        return None
    base = ladder.best()[0]
    if ladder.run(Attempt("exclude_stem", base.per_channel, base.calibration_method, (layers[0],), base.format)):
        return (
            f"calibration alone stayed over budget; keeping the first layer {layers[0]} in fp32 brought the drop "
            f"within {p.max_accuracy_drop}"
        )
    return None


def _rank_layers(ladder: Ladder, base: Attempt) -> list[str]:
    """The sensitivity pass: each layer alone in fp32; most harmful when quantized first."""
    for name in ladder.backend.candidates():
        ladder.run(Attempt("sensitivity_probe", base.per_channel, base.calibration_method, (name,), base.format))
        r = ladder.last
        ladder.sensitivity.append(
            {"layer": name, "accuracy_drop_when_fp32": r["accuracy_drop"], "logit_mse_when_fp32": r["logit_mse"]}
        )
    # the budget is on accuracy; logit error breaks ties on a small validation split
    by_harm = sorted(ladder.sensitivity, key=lambda s: (s["accuracy_drop_when_fp32"], s["logit_mse_when_fp32"]))
    return [s["layer"] for s in by_harm]


def exclude_sensitive(ladder: Ladder, p: QuantizeParams) -> str | None:
    """Remedy 2: leave the 1, 2, ... most sensitive layers in fp32 (never all of them)."""
    if p.exclude_sensitive_max <= 0:
        return None
    base = ladder.best()[0]
    ranked = _rank_layers(ladder, base)
    # keep at least one layer quantized, or the "int8" model is just the fp32 one
    for k in range(1, min(p.exclude_sensitive_max, len(ranked) - 1) + 1):
        attempt = Attempt(
            "exclude_sensitive", base.per_channel, base.calibration_method, tuple(ranked[:k]), base.format
        )
        if ladder.run(attempt):
            return (
                f"calibration alone stayed over budget; keeping the {k} most sensitive layer(s) "
                f"{ranked[:k]} in fp32 brought the drop within {p.max_accuracy_drop}"
            )
    return None


def qat(ladder: Ladder, p: QuantizeParams, model: nn.Module, X_calib, X_train, y_train, seed: int) -> str | None:
    """Remedy 3 (`quantize.qat`): a fake-quant fine-tune, then the best attempt's quantizer on it."""
    if not p.qat:
        return None
    ladder.qat = "tried"
    qat_dir = ladder.scratch / "qat"
    qat_dir.mkdir()
    qat_backend = type(ladder.backend)(
        qat_finetune(model, X_train, y_train, p, seed), X_calib, qat_dir, ladder.backend.threads
    )
    base = ladder.best()[0]
    for excluded in [()] + ([base.excluded] if base.excluded else []):
        if ladder.run(Attempt("qat", base.per_channel, base.calibration_method, excluded, base.format), on=qat_backend):
            ladder.qat = "used"
            kept = f" with {list(excluded)} in fp32" if excluded else ""
            return (
                f"post-training remedies stayed over budget; {p.qat_epochs} epoch(s) of fake-quant "
                f"fine-tuning{kept} fixed it"
            )
    return None


def over_budget(ladder: Ladder, p: QuantizeParams) -> DistilflowError:
    """What the user reads when no attempt fits: the closest one, what was tried, what was off, the fixes."""
    closest = ladder.best()[2]
    remedies = ("calibration", "exclude_stem", "exclude_sensitive", "qat")
    ladder_tried = [r for r in remedies if any(a.remedy == r for a, _, _ in ladder.tried)]
    off = [
        k
        for k, on in (("quantize.exclude_sensitive_max=0", p.exclude_sensitive_max), ("quantize.qat=false", p.qat))
        if not on
    ]
    return DistilflowError(
        f"int8 quantization ({p.backend}) lost {closest['accuracy_drop']:.4f} validation accuracy at best "
        f"(fp32 {ladder.fp32_acc:.4f} → int8 {closest['int8_accuracy']:.4f}), over quantize.max_accuracy_drop="
        f"{p.max_accuracy_drop}, after trying: {', '.join(ladder_tried) or 'no remedy'}"
        f"{'; off: ' + ', '.join(off) if off else ''}. No int8 model was written. Fix: raise "
        "quantize.max_accuracy_drop, set quantize.qat=true, raise quantize.exclude_sensitive_max, "
        "or ship the fp32 model."
    )


def _latencies(predicts: dict, X: np.ndarray, repeats: int, rounds: int = 2) -> dict[str, dict[str, float]]:
    """Median ms per call at each of SPEED_BATCHES, the contenders timed round-robin (a slow spell hits all)."""
    samples: dict = {name: {bs: [] for bs in SPEED_BATCHES} for name in predicts}
    for _ in range(rounds):
        for name, predict in predicts.items():
            for bs in SPEED_BATCHES:
                samples[name][bs].append(measure_latency(predict, X, bs, repeats=repeats, warmup=2)["median_ms"])
    return {name: {f"b{bs}": float(np.median(v)) for bs, v in by.items()} for name, by in samples.items()}


def _why_slow(fp32_b1_ms: float) -> str:
    """What is known about why int8 does not pay here: the CPU's int8 path and the model's call overhead."""
    causes = [] if has_vnni() else ["this CPU has no VNNI, so ORT's u8×s8 GEMMs take the slow path"]
    if fp32_b1_ms < 0.05:
        causes.append(
            f"a batch-1 call of the fp32 model takes {fp32_b1_ms * 1000:.0f} µs: call overhead, not arithmetic"
        )
    return "; ".join(causes) or "VNNI is there and fp32 is not call-bound: ORT's profiler tells which layers lose"


def fastest(ladder: Ladder, winner: tuple, p: QuantizeParams) -> tuple[tuple, dict]:
    """The winner in each of `quantize.formats` within budget, timed against fp32; (the fastest, its speed record)."""
    contenders = {winner[0].format: winner}
    if isinstance(ladder.backend, OrtBackend):
        for fmt in p.formats:
            if fmt not in contenders and ladder.run(winner[0].as_format(fmt)):
                contenders[fmt] = ladder.tried[-1]
    predicts = {"fp32": ladder.backend.fp32_predict()} | {
        f: ladder.backend.predict(c[1]) for f, c in contenders.items()
    }
    ms = _latencies(predicts, ladder.X_val, p.speed_repeats)
    # the geometric mean of the two batch sizes' speed-ups; a tie goes to the first format listed
    score = {f: (ms["fp32"]["b1"] / ms[f]["b1"] * ms["fp32"]["b256"] / ms[f]["b256"]) ** 0.5 for f in contenders}
    best = max(contenders, key=lambda f: (round(score[f], 2), -p.formats.index(f) if f in p.formats else 0))
    speed = {f"speedup_{b}": ms["fp32"][b] / ms[best][b] for b in ("b1", "b256")}
    speed |= {"format": best, "latency_ms": ms, "pays": all(v > 1 for v in speed.values())}
    if not speed["pays"]:
        speed["speed_note"] = (
            f"int8 runs at {speed['speedup_b1']:.2f}× the speed of fp32 at batch 1 and {speed['speedup_b256']:.2f}× at "
            f"batch 256 here: int8 does not pay for this model ({_why_slow(ms['fp32']['b1'])}); its fp32 runtime is "
            "the faster candidate"
        )
    return contenders[best], speed


def _record(ladder: Ladder, p: QuantizeParams, X_calib, winner, why: str, out_path: Path) -> dict:
    attempt, _, result = winner
    return {
        "backend": p.backend,
        "exporter": ladder.backend.exporter,
        "fp32_accuracy": ladder.fp32_acc,
        "max_accuracy_drop": p.max_accuracy_drop,
        "calibration_rows": len(X_calib),
        "validation_rows": len(ladder.y_val),
        "attempts": [r for _, _, r in ladder.tried],
        "sensitivity": ladder.sensitivity,
        "qat": ladder.qat,
        "path": str(out_path),
        "remedy": attempt.remedy,
        "reason": why,
        "int8_accuracy": result["int8_accuracy"],
        "accuracy_drop": result["accuracy_drop"],
        "agreement_with_fp32": result["agreement_with_fp32"],
        "per_channel": attempt.per_channel,
        "calibration_method": attempt.calibration_method,
        "excluded_layers": list(attempt.excluded),
        "format": attempt.format if isinstance(ladder.backend, OrtBackend) else None,
        "reduce_range": ladder.backend.reduce_range,
        "fp32_bytes": ladder.backend.fp32_bytes(),
        "int8_bytes": os.path.getsize(out_path),
    }


def quantize_int8(
    model: nn.Module,
    X_calib: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    params: QuantizeParams,
    workdir: str | Path,
    out_path: str | Path | None = None,
    X_train: np.ndarray | None = None,
    y_train: np.ndarray | None = None,
    seed: int = 0,
    threads: int = 1,
) -> tuple[Path, dict]:
    """Quantize `model` to int8 within `params.max_accuracy_drop`; returns (int8 model path, record).

    `X_calib`: rows to calibrate on (a train subset; at most
    `params.calibration_size` are drawn with `seed`). The drop is measured on
    (X_val, y_val) against the fp32 model the backend quantizes (the exported
    ONNX for the onnx backend). QAT needs `X_train`/`y_train`. A stale file at
    `out_path` is removed first; the new one appears there only on success.
    Raises DistilflowError, naming what was tried, when nothing fits the budget.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    backend_cls = BACKENDS[params.backend]
    out_path = Path(out_path) if out_path is not None else workdir / f"model_int8{backend_cls.suffix}"
    out_path.unlink(missing_ok=True)
    if params.qat and (X_train is None or y_train is None):
        raise DistilflowError("quantize.qat=true needs the labelled train split (X_train, y_train) for the fine-tune")
    X_calib = calibration_subset(np.asarray(X_calib), params.calibration_size, seed)
    X_val, y_val = np.ascontiguousarray(X_val, dtype=np.float32), np.asarray(y_val)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="quantize-", dir=workdir))
    try:
        backend = backend_cls(model, X_calib, scratch, threads, reduce_range(params.reduce_range))
        ladder = Ladder(backend, X_val, y_val, params, scratch)
        remedies = (as_configured, other_calibration, exclude_stem, exclude_sensitive)
        why = next((w for remedy in remedies if (w := remedy(ladder, params))), None)
        why = why or qat(ladder, params, model, X_calib, X_train, y_train, seed)
        if why is None:
            raise over_budget(ladder, params)
        winner, speed = fastest(ladder, ladder.tried[-1], params)
        with atomic_path(out_path) as tmp:
            shutil.copyfile(winner[1], tmp)
        record = _record(ladder, params, X_calib, winner, why, out_path) | speed
        return out_path, record | {"seconds": time.perf_counter() - started}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
