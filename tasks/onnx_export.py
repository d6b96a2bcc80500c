"""Export to ONNX: one self-contained file with a dynamic batch axis, and the optimised ORT fp32 form of it.

Every ONNX file the project writes comes from here: the candidates' fp32
runtime, the int8 backend's source (tasks/quantization/ort.py), the bench.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilflow.errors import DistilflowError
from tasks.inference import quiet_output

ONNX_INPUT, ONNX_OUTPUT = "input", "logits"


def _export(model: nn.Module, example: torch.Tensor, path: Path, use_dynamo: bool) -> None:
    if use_dynamo:
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=True,
            external_data=False,  # otherwise the weights go to a separate `<name>.data` file next to the model
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


def export_with(model: nn.Module, example, path, dynamo: bool | None = None) -> tuple[Path, str]:
    """(the ONNX file, the exporter that wrote it: "dynamo" or "torchscript").

    dynamo=None tries the torch.export-based exporter (the default since torch
    2.9; needs onnxscript) and falls back to the legacy TorchScript one if it fails.
    """
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
                _export(model, example, path, use_dynamo)
            return path, "dynamo" if use_dynamo else "torchscript"
        except Exception as exc:  # exporter failures come in many types; keep the first line of each
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'}: {str(exc).strip().splitlines()[0][:300]}")
    raise DistilflowError(f"ONNX export of {type(model).__name__} failed ({'; '.join(errors)})")


def export_onnx(model: nn.Module, example, path, dynamo: bool | None = None) -> Path:
    """Export `model` to a single self-contained ONNX file with a dynamic batch axis (see `export_with`)."""
    return export_with(model, example, path, dynamo)[0]


def optimise_for_ort(exported: Path, out: Path) -> Path:
    """ORT's pre-processing: shape inference and graph optimisation (BatchNorm folded), as ORT recommends."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with quiet_output():
        quant_pre_process(str(exported), str(out))
    return out


def export_ort_fp32(model: nn.Module, X_example: np.ndarray, out: Path) -> Path:
    """The model as an optimised fp32 ONNX file: the ORT fp32 runtime a candidate ships in."""
    with tempfile.TemporaryDirectory() as tmp:
        return optimise_for_ort(export_onnx(model, X_example, Path(tmp) / "exported.onnx"), out)
