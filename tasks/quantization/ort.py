"""ONNX Runtime static int8: the exported fp32 ONNX (after ORT's pre-processing) → an int8 ONNX.

uint8 activations, int8 (per-channel) weights: the pair ORT's VNNI kernels
run fastest (u8×s8 GEMMs at 3.8× fp32 here; int8 activations fused only 9 of
ResNet-18's 20 convs, uint8 weights lost the fast path: bench/results), in
the QOperator or QDQ format (the same fused kernels; QOperator's file is
smaller). Calibration runs once per calibration method: the first attempt
with a method writes its ranges to a JSON cache beside the model (ORT's
`calibration_cache_path`), and every later attempt, format and sensitivity
probe with that method quantizes from the cache. ORT checks only the method
against the cache, so the cache lives in this backend's own scratch folder:
one model, one set of calibration rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import nn

from tasks.inference import OnnxPredictor, quiet_output
from tasks.onnx_export import ONNX_INPUT, export_with, optimise_for_ort
from tasks.quantization.attempt import QUANTIZABLE_ONNX_OPS, Attempt


class Batches:
    """ORT's CalibrationDataReader protocol over rows of `X`, `batch_size` at a time."""

    def __init__(self, X: np.ndarray, batch_size: int = 64):
        self._it = iter([{ONNX_INPUT: X[i : i + batch_size]} for i in range(0, len(X), batch_size)])

    def get_next(self):
        """The next batch's feed, or None when the rows are used up."""
        return next(self._it, None)


class OrtBackend:
    """fp32 ONNX (exported, then ORT's pre-processing) → static QDQ int8 ONNX."""

    suffix = ".onnx"

    def __init__(self, model: nn.Module, X_calib: np.ndarray, workdir: Path, threads: int = 1, reduce_range=False):
        self.X_calib, self.workdir, self.threads, self.reduce_range = X_calib, workdir, threads, reduce_range
        exported, self.exporter = export_with(model, X_calib, workdir / "fp32.onnx")
        self.fp32_path = optimise_for_ort(exported, workdir / "fp32_pre.onnx")

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

    def ranges(self, method: str) -> Path:
        """Where the ranges of `method` are cached (written by the first attempt that calibrates with it)."""
        return self.workdir / f"ranges-{method}.json"

    def quantize(self, attempt: Attempt, out: Path) -> Path:
        """Write the int8 model of `attempt`, in its format, to `out` (calibrating only if its method has none yet)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[attempt.calibration_method]
        cache = self.ranges(attempt.calibration_method)
        with quiet_output():
            quantize_static(
                str(self.fp32_path),
                str(out),
                None if cache.is_file() else Batches(self.X_calib),
                quant_format=QuantFormat.QOperator if attempt.format == "qoperator" else QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=attempt.per_channel,
                reduce_range=self.reduce_range,
                calibrate_method=method,
                nodes_to_exclude=list(attempt.excluded),
                calibration_cache_path=str(cache),
            )
        return out

    def predict(self, path: Path):
        """A predictor of logits for the int8 model at `path`."""
        return OnnxPredictor(path, self.threads)
