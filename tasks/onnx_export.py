"""Export to ONNX: one self-contained file with a dynamic batch axis, and the optimised ORT form of it.

Every ONNX file the project writes comes from here: the candidates' fp32
runtime, the int8 backend's source (tasks/quantization/ort.py), the bench.
The optimised form is ORT's pre-processing plus one rewrite of our own: a
conv whose output map is 1×1 becomes a Gemm, exact, and several times faster
in ORT for fp32 and int8 alike (`pointwise_maps_as_gemm`).
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
    """ORT's pre-processing (shape inference, graph optimisation: BatchNorm folded), as ORT recommends, then
    every conv on a 1×1 map as a Gemm (`pointwise_maps_as_gemm`): what both the fp32 and the int8 runtime run."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with quiet_output():
        quant_pre_process(str(exported), str(out))
    model, rewritten = pointwise_maps_as_gemm(onnx.load(str(out)))
    if rewritten:
        onnx.save(model, str(out))
    return out


def export_ort_fp32(model: nn.Module, X_example: np.ndarray, out: Path) -> Path:
    """The model as an optimised fp32 ONNX file: the ORT fp32 runtime a candidate ships in."""
    with tempfile.TemporaryDirectory() as tmp:
        return optimise_for_ort(export_onnx(model, X_example, Path(tmp) / "exported.onnx"), out)


# ---------------------------------------------------------------------------- convs on 1×1 maps as Gemm


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _on_a_1x1_map(node, shapes: dict, weights: dict) -> bool:
    """A plain 2-D conv (no groups, dilation or auto-pad) with constant weights whose output map is 1×1."""
    from onnx import helper

    if node.op_type != "Conv" or node.input[1] not in weights:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
    return (
        x is not None
        and y is not None
        and len(x) == 4
        and None not in x[1:]
        and y[2:] == [1, 1]
        and attrs.get("group", 1) == 1
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        and all(d == 1 for d in attrs.get("dilations", [1, 1]))
    )


def _as_gemm(node, x_shape: list[int], weight, inits: list) -> list:
    """Nodes computing `node` as (Slice →) Flatten → Gemm → Unsqueeze; new initializers appended to `inits`.

    Exact: the one output pixel sees the input window starting at −pad, and taps outside the input are zero
    padding, so the conv is the product of the valid window (flattened C, h, w) with that slice of the weights.
    """
    from onnx import helper, numpy_helper

    pads = next((list(a.ints) for a in node.attribute if a.name == "pads"), [0, 0, 0, 0])
    (_, _, height, width), (kh, kw) = x_shape, weight.shape[2:]
    rows = [r for r in range(-pads[0], -pads[0] + kh) if 0 <= r < height]
    cols = [c for c in range(-pads[1], -pads[1] + kw) if 0 <= c < width]
    taps = weight[:, :, rows[0] + pads[0] : rows[-1] + pads[0] + 1, cols[0] + pads[1] : cols[-1] + pads[1] + 1]
    base, x, nodes = node.name or node.output[0], node.input[0], []
    if (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) != (0, height, 0, width):  # only part of the map is seen
        starts, ends = np.array([rows[0], cols[0]]), np.array([rows[-1] + 1, cols[-1] + 1])
        inits += [numpy_helper.from_array(a.astype(np.int64), f"{base}_{n}") for a, n in ((starts, "st"), (ends, "en"))]
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), f"{base}_ax"))
        nodes.append(helper.make_node("Slice", [x, f"{base}_st", f"{base}_en", f"{base}_ax"], [f"{base}_win"]))
        x = f"{base}_win"
    inits.append(numpy_helper.from_array(taps.reshape(weight.shape[0], -1).astype(weight.dtype), f"{base}_gemm_w"))
    inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), f"{base}_uaxes"))
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    return nodes + [
        helper.make_node("Flatten", [x], [f"{base}_flat"], axis=1),
        helper.make_node("Gemm", [f"{base}_flat", f"{base}_gemm_w", *bias], [f"{base}_gemm"], transB=1),
        helper.make_node("Unsqueeze", [f"{base}_gemm", f"{base}_uaxes"], [node.output[0]]),
    ]


def pointwise_maps_as_gemm(model):
    """(the model with every conv whose output map is 1×1 written as a Gemm, how many were rewritten).

    ONNX Runtime's convolutions run one image at a time with the output pixels as the GEMM's rows, so on a
    1×1 map each image is a matrix-vector product over every tap, padding included; as a Gemm the batch
    is the rows and the fast (int8 or fp32) GEMM kernels run at full width. On ResNet-18 at 8×8 input
    (15 of 20 convs on 1×1 maps) int8 went from 0.3× to 5.1× the speed of fp32 at batch 256 (bench/).
    Needs static C, H, W (after ORT's shape inference).
    """
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(model)
    graph = model.graph
    shapes = {vi.name: _dims(vi) for vi in [*graph.value_info, *graph.input, *graph.output]}
    weights = {i.name: i for i in graph.initializer}
    nodes, inits, rewritten = [], [], 0
    for node in graph.node:
        if not _on_a_1x1_map(node, shapes, weights):
            nodes.append(node)
            continue
        nodes += _as_gemm(node, shapes[node.input[0]], numpy_helper.to_array(weights[node.input[1]]), inits)
        rewritten += 1
    if not rewritten:
        return model, 0
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model, rewritten
