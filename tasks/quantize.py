"""Post-training int8 quantization with an accuracy budget.

Default backend `onnx_qdq`: export to ONNX, then ONNX Runtime static
quantization in QDQ format with uint8 activations and int8 per-channel
weights, calibrated on a train subset. On this project's CPUs (AVX512-VNNI)
that was the fastest int8 path at batch 1, while ORT's default S8S8 and
dynamic quantization of convs were slower than fp32. Whether int8 beats ORT
fp32 at all depends on the model (bench/results): 2.3x at batch 1 on the demo's
391k-parameter CNN teacher, but no faster on the 6k-parameter student (call
overhead dominates) and 3x slower on ResNet-18 at 8x8 input.
Second backend `torch_fx`: torch.ao.quantization FX graph mode (x86 engine),
saved as TorchScript. Both are deprecated-or-moving targets upstream
(torch.ao.quantization is deprecated in favour of torchao's pt2e), which is
why ONNX Runtime is the default.

Accuracy-aware fallback: if int8 loses more than `max_accuracy_drop` of
validation accuracy against its own fp32 source, the remedies run in order,
cheapest first, and the first one within budget wins:
  1. calibration: per-channel weights with percentile, then entropy ranges
     (outliers stretch a min/max range and crush everything else);
  2. exclude_sensitive: a sensitivity pass quantizes the model once per
     conv/linear layer with only that layer left in fp32, ranks layers by how
     much that lowers the logit error, then leaves the worst 1, 2, ...,
     `exclude_sensitive_max` in fp32;
  3. qat: only if `quantize.qat`: a short fake-quant fine-tune (BN folded,
     int8 weights and uint8 activations simulated with straight-through
     gradients, Jacob et al. 2018), then the same quantizer again.
Every candidate is written under `workdir`; only a model within budget is
moved to the output path, so an over-budget model is never left there.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilflow.errors import DistilflowError
from distilflow.io import atomic_dir, atomic_path, write_json
from distilflow.params import QuantizeParams
from distilflow.records import StageResult
from tasks.backbones import load_classifier
from tasks.dataset import load_splits
from tasks.engine import LoopConfig, train
from tasks.inference import MODEL_FILE, OnnxPredictor, TorchPredictor, quiet_output

ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
QUANTIZABLE_ONNX_OPS = ("Conv", "Gemm", "MatMul")


# ---------------------------------------------------------------------------- ONNX export


def export_onnx(
    model: nn.Module, example: torch.Tensor | np.ndarray, path: str | Path, dynamo: bool | None = None
) -> Path:
    """Export `model` to a single self-contained ONNX file with a dynamic batch axis.

    dynamo=None tries the torch.export-based exporter (the default since torch
    2.9; needs onnxscript) and falls back to the legacy TorchScript one if it
    fails. `external_data=False` because the dynamo exporter otherwise writes
    the weights to a separate `<name>.data` file next to the model.
    """
    return _export_onnx(model, example, path, dynamo)[0]


def _export_onnx(model: nn.Module, example, path, dynamo: bool | None = None) -> tuple[Path, str]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    example = torch.as_tensor(np.asarray(example[:2]), dtype=torch.float32)
    if len(example) < 2:  # torch.export specialises a size-1 dimension to a constant
        example = example.repeat(2, *([1] * (example.ndim - 1)))
    errors = []
    for use_dynamo in [True, False] if dynamo is None else [dynamo]:
        try:
            with quiet_output():
                if use_dynamo:
                    torch.onnx.export(
                        model,
                        (example,),
                        path,
                        dynamo=True,
                        external_data=False,
                        verbose=False,
                        input_names=[ONNX_INPUT],
                        output_names=[ONNX_OUTPUT],
                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                    )
                else:
                    torch.onnx.export(
                        model,
                        (example,),
                        path,
                        dynamo=False,
                        input_names=[ONNX_INPUT],
                        output_names=[ONNX_OUTPUT],
                        opset_version=17,
                        dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                    )
            return path, "dynamo" if use_dynamo else "torchscript"
        except Exception as exc:  # exporter failures come in many types; keep the first line of each
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'}: {str(exc).strip().splitlines()[0][:300]}")
    raise DistilflowError(f"ONNX export of {type(model).__name__} failed ({'; '.join(errors)})")


# ---------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Attempt:
    """One quantizer configuration: how ranges are calibrated and which layers stay fp32."""

    remedy: str
    per_channel: bool
    calibration_method: str
    excluded: tuple[str, ...] = ()


class OnnxQdqBackend:
    """fp32 ONNX (exported, then ORT's pre-processing) → static QDQ int8 ONNX."""

    suffix = ".onnx"

    def __init__(self, model: nn.Module, X_calib: np.ndarray, workdir: Path, threads: int = 1):
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.X_calib, self.workdir, self.threads = X_calib, workdir, threads
        exported, self.exporter = _export_onnx(model, X_calib, workdir / "fp32.onnx")
        self.fp32_path = workdir / "fp32_pre.onnx"
        with quiet_output():  # shape inference + graph optimisation (BatchNorm folding), as ORT recommends
            quant_pre_process(str(exported), str(self.fp32_path))

    def candidates(self) -> list[str]:
        """The layers the sensitivity pass may leave in fp32."""
        import onnx

        graph = onnx.load(str(self.fp32_path)).graph
        return [n.name for n in graph.node if n.op_type in QUANTIZABLE_ONNX_OPS]

    def fp32_predict(self):
        """The fp32 model this backend quantizes, as a predictor of logits."""
        return OnnxPredictor(self.fp32_path, self.threads)

    def fp32_bytes(self) -> int:
        """Size of that fp32 model in this backend's format."""
        return os.path.getsize(self.fp32_path)

    def quantize(self, attempt: Attempt, out: Path) -> Path:
        """Write the int8 model of `attempt` to `out`."""
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[attempt.calibration_method]

        class Batches(CalibrationDataReader):
            def __init__(self, X: np.ndarray, batch_size: int = 64):
                self._it = iter([{ONNX_INPUT: X[i : i + batch_size]} for i in range(0, len(X), batch_size)])

            def get_next(self):
                return next(self._it, None)

        with quiet_output():
            quantize_static(
                str(self.fp32_path),
                str(out),
                Batches(self.X_calib),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=attempt.per_channel,
                calibrate_method=method,
                nodes_to_exclude=list(attempt.excluded),
            )
        return out

    def predict(self, path: Path):
        """A predictor of logits for the int8 model at `path`."""
        return OnnxPredictor(path, self.threads)


class TorchFxBackend:
    """torch.ao.quantization FX graph mode, x86 engine, saved as TorchScript (`.pt`).

    `percentile` and `entropy` both map to torch's HistogramObserver, which
    searches for the range minimising L2 quantization error; torch.ao has no
    percentile or KL observer.
    """

    suffix = ".pt"

    def __init__(self, model: nn.Module, X_calib: np.ndarray, workdir: Path, threads: int = 1):
        self.model = copy.deepcopy(model).cpu().eval()
        self.X_calib = torch.as_tensor(X_calib, dtype=torch.float32)
        self.workdir, self.threads, self.exporter = workdir, threads, "torch.ao.quantization.quantize_fx"

    def candidates(self) -> list[str]:
        """The layers the sensitivity pass may leave in fp32."""
        return [name for name, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def fp32_predict(self):
        """The fp32 model this backend quantizes, as a predictor of logits."""
        return TorchPredictor(self.model, 1024)

    def fp32_bytes(self) -> int:
        """Size of that fp32 model in this backend's format."""
        buf = io.BytesIO()
        with quiet_output():
            torch.jit.save(torch.jit.trace(self.model, self.X_calib[:2]), buf)
        return len(buf.getvalue())

    def quantize(self, attempt: Attempt, out: Path) -> Path:
        """Write the int8 model of `attempt` to `out`."""
        from torch.ao.quantization import (
            HistogramObserver,
            MinMaxObserver,
            QConfig,
            QConfigMapping,
            default_per_channel_weight_observer,
            default_weight_observer,
        )
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        with quiet_output():
            torch.backends.quantized.engine = "x86"
            observer = MinMaxObserver if attempt.calibration_method == "minmax" else HistogramObserver
            # reduce_range: 7-bit activations avoid int16 overflow in x86 kernels without VNNI (torch's x86 default)
            weight = default_per_channel_weight_observer if attempt.per_channel else default_weight_observer
            qconfig = QConfig(activation=observer.with_args(dtype=torch.quint8, reduce_range=True), weight=weight)
            mapping = QConfigMapping().set_global(qconfig)
            for name in attempt.excluded:
                mapping = mapping.set_module_name(name, None)
            # the adapter's reshape/permute would otherwise leave the first conv's input unobserved (fp32)
            custom = PrepareCustomConfig().set_non_traceable_module_names(
                ["adapter"] if hasattr(self.model, "adapter") else []
            )
            prepared = prepare_fx(copy.deepcopy(self.model), mapping, (self.X_calib[:2],), prepare_custom_config=custom)
            with torch.no_grad():
                for i in range(0, len(self.X_calib), 64):
                    prepared(self.X_calib[i : i + 64])
            quantized = convert_fx(prepared)
            scripted = torch.jit.trace(quantized, self.X_calib[:2])
            torch.jit.save(scripted, str(out))
        return out

    def predict(self, path: Path):
        """A predictor of logits for the int8 model at `path`."""
        with quiet_output():
            return TorchPredictor(torch.jit.load(str(path)), 1024)


BACKENDS = {"onnx_qdq": OnnxQdqBackend, "torch_fx": TorchFxBackend}


# ---------------------------------------------------------------------------- QAT (fake-quant fine-tune)


class _ActivationFakeQuant:
    """Forward pre-hook: uint8 asymmetric fake quantization of a layer's input, EMA min/max range."""

    def __init__(self, momentum: float = 0.1):
        self.momentum, self.lo, self.hi = momentum, None, None

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        if module.training or self.lo is None:
            lo, hi = x.detach().min().item(), x.detach().max().item()
            m = self.momentum if self.lo is not None else 1.0
            self.lo = (1 - m) * (self.lo or 0.0) + m * lo
            self.hi = (1 - m) * (self.hi or 0.0) + m * hi
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        scale = max((hi - lo) / 255, 1e-8)
        zero_point = int(min(255, max(0, round(-lo / scale))))
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255),) + tuple(args[1:])


class _WeightFakeQuant(nn.Module):
    """Parametrization: symmetric int8 per-output-channel fake quantization of a weight."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = (w.detach().abs().reshape(w.shape[0], -1).amax(dim=1) / 127).clamp(min=1e-8)
        zero = torch.zeros(w.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every Conv2d→BatchNorm2d pair fused into one conv (eval statistics).

    Done before fake quantization because the exporter folds BatchNorm too:
    the weights that get quantized are the folded ones.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                setattr(module, name_a, fuse_conv_bn_eval(a, b))
                setattr(module, name_b, nn.Identity())
    return model


def qat_finetune(
    model: nn.Module, X_train: np.ndarray, y_train: np.ndarray, params: QuantizeParams, seed: int
) -> nn.Module:
    """A fake-quant fine-tune (`params.qat_epochs`, AdamW at `params.qat_lr`); returns plain fp32 weights.

    A simple QAT: weights are trained through int8 rounding (straight-through
    estimator) and come back snapped to the int8 grid, so the quantizer's own
    per-channel weight quantization later is (near) lossless. Activation
    ranges are simulated here but calibrated afresh by the backend.
    """
    from torch.nn.utils import parametrize

    qmodel = fold_batchnorm(model)
    layers = [m for m in qmodel.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = []
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", _WeightFakeQuant())
        hooks.append(layer.register_forward_pre_hook(_ActivationFakeQuant()))
    cfg = LoopConfig(epochs=params.qat_epochs, batch_size=64, lr=params.qat_lr, device="cpu")
    train(qmodel, {"x": X_train, "y": y_train}, None, cfg, seed, desc="QAT")
    for hook in hooks:
        hook.remove()
    for layer in layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return qmodel.eval()


# ---------------------------------------------------------------------------- the accuracy-aware loop


def calibration_subset(X: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` rows drawn without replacement with `seed` (all rows if fewer)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(X))[: min(size, len(X))])
    return np.ascontiguousarray(X[idx], dtype=np.float32)


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean()) if len(y) else float("nan")


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
    ONNX for onnx_qdq). QAT needs `X_train`/`y_train`. A stale file at
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
    t_start = time.perf_counter()

    scratch = Path(tempfile.mkdtemp(prefix="quantize-", dir=workdir))
    try:
        backend = backend_cls(model, X_calib, scratch, threads)
        fp32_logits = backend.fp32_predict()(X_val)
        fp32_acc = _accuracy(fp32_logits, y_val)
        budget = params.max_accuracy_drop
        record: dict = {
            "backend": params.backend,
            "exporter": backend.exporter,
            "fp32_accuracy": fp32_acc,
            "max_accuracy_drop": budget,
            "calibration_rows": len(X_calib),
            "validation_rows": len(y_val),
            "attempts": [],
            "sensitivity": [],
            "qat": "not needed" if params.qat else "off (quantize.qat=false): QAT was not run",
        }
        tried: list[tuple[Attempt, Path, dict]] = []

        def run(attempt: Attempt, on=None) -> dict:
            """Quantize with `attempt` (on the QAT model's backend if given) and score it against the fp32 source."""
            on = on or backend
            path = scratch / f"attempt{len(tried)}{backend_cls.suffix}"
            on.quantize(attempt, path)
            logits = on.predict(path)(X_val)
            acc = _accuracy(logits, y_val)
            result = {
                "remedy": attempt.remedy,
                "per_channel": attempt.per_channel,
                "calibration_method": attempt.calibration_method,
                "excluded": list(attempt.excluded),
                "int8_accuracy": acc,
                "accuracy_drop": fp32_acc - acc,
                "agreement_with_fp32": float((logits.argmax(1) == fp32_logits.argmax(1)).mean()),
                "logit_mse": float(np.mean((logits - fp32_logits) ** 2)),
                "within_budget": fp32_acc - acc <= budget + 1e-12,
            }
            tried.append((attempt, path, result))
            record["attempts"].append(result)
            return result

        def best() -> tuple[Attempt, Path, dict]:
            return min(tried, key=lambda t: (t[2]["accuracy_drop"], t[2]["logit_mse"]))

        winner = None
        first = run(Attempt("none", params.per_channel, params.calibration_method))
        if first["within_budget"]:
            winner, why = tried[-1], f"within budget as configured (drop {first['accuracy_drop']:.4f} ≤ {budget})"

        if winner is None:  # 1. per-channel weights, then the outlier-robust activation ranges
            for method in dict.fromkeys((params.calibration_method, "percentile", "entropy", "minmax")):
                if (True, method) == (params.per_channel, params.calibration_method):
                    continue  # that is the configured attempt that just failed
                if run(Attempt("calibration", True, method))["within_budget"]:
                    winner = tried[-1]
                    why = (
                        f"{params.calibration_method} calibration{'' if params.per_channel else ' (per-tensor)'} "
                        f"lost {first['accuracy_drop']:.4f} > {budget}; per-channel {method} ranges fixed it"
                    )
                    break

        if winner is None and params.exclude_sensitive_max > 0:  # 2. leave the most sensitive layers in fp32
            base = best()[0]
            names = backend.candidates()
            for name in names:
                r = run(Attempt("sensitivity_probe", base.per_channel, base.calibration_method, (name,)))
                record["sensitivity"].append(
                    {
                        "layer": name,
                        "accuracy_drop_when_fp32": r["accuracy_drop"],
                        "logit_mse_when_fp32": r["logit_mse"],
                    }
                )
            # most sensitive first: the budget is on accuracy; logit error breaks ties on a small val split
            by_harm = sorted(
                record["sensitivity"], key=lambda s: (s["accuracy_drop_when_fp32"], s["logit_mse_when_fp32"])
            )
            ranked = [s["layer"] for s in by_harm]
            # keep at least one layer quantized, or the "int8" model is just the fp32 one
            for k in range(1, min(params.exclude_sensitive_max, len(ranked) - 1) + 1):
                if run(Attempt("exclude_sensitive", base.per_channel, base.calibration_method, tuple(ranked[:k])))[
                    "within_budget"
                ]:
                    winner = tried[-1]
                    why = (
                        f"calibration alone stayed over budget; keeping the {k} most sensitive layer(s) "
                        f"{ranked[:k]} in fp32 brought the drop within {budget}"
                    )
                    break

        if winner is None and params.qat:  # 3. fake-quant fine-tune, then quantize again
            record["qat"] = "tried"
            qat_model = qat_finetune(model, X_train, y_train, params, seed)
            qat_dir = scratch / "qat"
            qat_dir.mkdir()
            qat_backend = backend_cls(qat_model, X_calib, qat_dir, threads)
            base = best()[0]
            excluded_options = [()] + ([base.excluded] if base.excluded else [])
            for excluded in excluded_options:
                qat_attempt = Attempt("qat", base.per_channel, base.calibration_method, excluded)
                if run(qat_attempt, on=qat_backend)["within_budget"]:
                    winner = tried[-1]
                    record["qat"] = "used"
                    why = (
                        f"post-training remedies stayed over budget; {params.qat_epochs} epoch(s) of fake-quant "
                        f"fine-tuning{' with ' + str(list(excluded)) + ' in fp32' if excluded else ''} fixed it"
                    )
                    break

        if winner is None:
            _, _, closest = best()
            ladder = [r for r in ("calibration", "exclude_sensitive", "qat") if any(a.remedy == r for a, _, _ in tried)]
            off = [
                key
                for key, enabled in (
                    ("quantize.exclude_sensitive_max=0", params.exclude_sensitive_max),
                    ("quantize.qat=false", params.qat),
                )
                if not enabled
            ]
            raise DistilflowError(
                f"int8 quantization ({params.backend}) lost {closest['accuracy_drop']:.4f} validation accuracy at best "
                f"(fp32 {fp32_acc:.4f} → int8 {closest['int8_accuracy']:.4f}), "
                f"over quantize.max_accuracy_drop={budget}, "
                f"after trying: {', '.join(ladder) or 'no remedy'}{'; off: ' + ', '.join(off) if off else ''}. "
                f"No int8 model was written. Fix: raise quantize.max_accuracy_drop, set quantize.qat=true, "
                f"raise quantize.exclude_sensitive_max, or ship the fp32 model."
            )

        attempt, path, result = winner
        with atomic_path(out_path) as tmp:
            shutil.copyfile(path, tmp)
        record.update(
            {
                "path": str(out_path),
                "remedy": attempt.remedy,
                "reason": why,
                "int8_accuracy": result["int8_accuracy"],
                "accuracy_drop": result["accuracy_drop"],
                "agreement_with_fp32": result["agreement_with_fp32"],
                "per_channel": attempt.per_channel,
                "calibration_method": attempt.calibration_method,
                "excluded_layers": list(attempt.excluded),
                "fp32_bytes": backend.fp32_bytes(),
                "int8_bytes": os.path.getsize(out_path),
                "seconds": time.perf_counter() - t_start,
            }
        )
        return out_path, record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------- stage (I/O at the edge)

RECORD_FILE = "quantization.json"  # the quantization config and its record, beside the model (as optimum does)


def export_ort_fp32(model: nn.Module, X_example: np.ndarray, out: Path) -> Path:
    """The model as an optimised fp32 ONNX file (exported, then ORT's graph optimisation: BatchNorm folded)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        exported = export_onnx(model, X_example, Path(tmp) / "exported.onnx")
        with quiet_output():
            quant_pre_process(str(exported), str(out))
    return out


def _int8_into(
    folder: Path, model: nn.Module, Xtr, ytr, Xva, yva, cfg: QuantizeParams, seed: int, threads: int, work: Path
) -> dict:
    """int8 of `model` into `folder` (model + record); over budget, the folder holds only the record."""
    suffix = BACKENDS[cfg.backend].suffix
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _, record = quantize_int8(
            model,
            Xtr,
            Xva,
            yva,
            cfg,
            work,
            out_path=folder / f"{MODEL_FILE}{suffix}",
            X_train=Xtr,
            y_train=ytr,
            seed=seed,
            threads=threads,
        )
    except DistilflowError as exc:
        record = {"error": str(exc)}
    # no timings in the folder: its content (hence every key and hash downstream) depends on the model alone
    write_json(
        {"config": cfg.model_dump(mode="json"), **{k: v for k, v in record.items() if k != "seconds"}},
        folder / RECORD_FILE,
    )
    return record


def quantize_stage(
    train: Path,
    val: Path,
    test: Path,
    preprocessor: Path,
    student: Path,
    student_nokd: Path,
    student_pruned: Path | None,
    teacher: Path,
    candidates: Path,
    teacher_int8: Path,
    quantize_report: Path,
    cfg: QuantizeParams,
    seed: int,
    threads: int,
) -> StageResult:
    """Every student as a product candidate: ONNX Runtime fp32 and (when `quantize.enabled`) int8 within budget.

    `candidates/<student>.<fp32|int8>/` each hold one runtime of one student
    (the KD student, its no-KD twin, the pruned student); the select stage
    chooses among them. A student whose int8 misses the accuracy budget
    after every remedy simply has no int8 candidate (its record says why).
    The teacher's int8 is written for reference, for the comparison table.
    """
    pre, data = load_splits(train, val, test, preprocessor)
    (Xtr, ytr), (Xva, yva) = data["train"], data["val"]
    n = len(pre["classes"])
    students = {"student": student, "student_nokd": student_nokd, "student_pruned": student_pruned}
    records: dict = {}
    with tempfile.TemporaryDirectory() as work, atomic_dir(candidates) as out:
        for name, folder in students.items():
            if folder is None:
                continue
            model = load_classifier(folder, n)[0]
            fp32 = out / f"{name}.fp32"
            fp32.mkdir()
            export_ort_fp32(model, Xtr[:2], fp32 / f"{MODEL_FILE}.onnx")
            records[f"{name}.fp32"] = {"source": str(folder), "runtime": "ORT fp32"}
            if cfg.enabled:
                int8 = _int8_into(
                    out / f"{name}.int8", model, Xtr, ytr, Xva, yva, cfg, seed, threads, Path(work) / name
                )
                records[f"{name}.int8"] = {"source": str(folder), "runtime": "int8", **int8}
        with atomic_dir(teacher_int8) as tmp:
            teacher_record = (
                _int8_into(
                    tmp, load_classifier(teacher, n)[0], Xtr, ytr, Xva, yva, cfg, seed, threads, Path(work) / "teacher"
                )
                if cfg.enabled and cfg.teacher
                else {"error": "quantize.enabled=false" if not cfg.enabled else "quantize.teacher=false"}
            )
    info = {"candidates": records, "teacher": teacher_record, "student": records.get("student.int8", {})}
    write_json(info, quantize_report)
    kd_int8 = records.get("student.int8", {})
    return StageResult(
        metrics={f"{name}.{k}": v for name, r in records.items() for k, v in _headline(r).items()}
        | {f"teacher.{k}": v for k, v in _headline(teacher_record).items()},
        params=cfg.model_dump(mode="json"),
        tags={"quantize.remedy": str(kd_int8.get("remedy")), "quantize.reason": str(kd_int8.get("reason", ""))[:500]},
        texts={"quantize_record.json": json.dumps(info, indent=2, default=str)},
        info={"candidates": sorted(records), "teacher_error": teacher_record.get("error")},
    )


def _headline(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
