"""One quantizer configuration, and the rows it calibrates on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTIZABLE_ONNX_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Attempt:
    """How ranges are calibrated and which layers stay fp32; `remedy` names the rung of the ladder it belongs to."""

    remedy: str
    per_channel: bool
    calibration_method: str
    excluded: tuple[str, ...] = ()
    format: str = "qoperator"  # ONNX Runtime's QOperator or QDQ (the ONNX backend only)

    def as_format(self, fmt: str) -> Attempt:
        """The same quantizer in another ONNX Runtime format (the speed sweep of policy.py)."""
        return Attempt(self.remedy, self.per_channel, self.calibration_method, self.excluded, fmt)


def calibration_subset(X: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` rows drawn without replacement with `seed` (all rows if fewer)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(X))[: min(size, len(X))])
    return np.ascontiguousarray(X[idx], dtype=np.float32)
