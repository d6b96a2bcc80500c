"""torch.ao.quantization FX graph mode, x86 engine, saved as TorchScript (`.pt`): the second int8 backend.

`percentile` and `entropy` both map to torch's HistogramObserver, which
searches for the range minimising L2 quantization error; torch.ao has no
percentile or KL observer. Calibration runs once per observer kind: the
calibrated observers' state is kept by the graph node each one watches, and
an attempt that leaves layers in fp32 loads that state into its own
observers instead of running the calibration rows again. torch.ao.quantization
is deprecated upstream in favour of torchao's pt2e, which is why ONNX Runtime
is the default backend.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.inference import TorchPredictor, quiet_output
from tasks.quantization.attempt import Attempt


def _qconfig_mapping(attempt: Attempt):
    from torch.ao.quantization import (
        HistogramObserver,
        MinMaxObserver,
        QConfig,
        QConfigMapping,
        default_per_channel_weight_observer,
        default_weight_observer,
    )

    observer = MinMaxObserver if attempt.calibration_method == "minmax" else HistogramObserver
    # reduce_range: 7-bit activations avoid int16 overflow in x86 kernels without VNNI (torch's x86 default)
    weight = default_per_channel_weight_observer if attempt.per_channel else default_weight_observer
    mapping = QConfigMapping().set_global(
        QConfig(activation=observer.with_args(dtype=torch.quint8, reduce_range=True), weight=weight)
    )
    for name in attempt.excluded:
        mapping = mapping.set_module_name(name, None)
    return mapping


def _observers(prepared) -> dict[str, nn.Module]:
    """Each activation observer of a prepared graph, by the name of the graph node it watches (stable across
    attempts: the traced graph is the same, whichever layers an attempt leaves in fp32)."""
    out = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and "activation_post_process" in str(node.target) and node.args:
            out[str(node.args[0])] = prepared.get_submodule(str(node.target))
    return out


class TorchFxBackend:
    """FX graph mode int8 of a classifier (the adapter's reshapes stay outside the traced graph)."""

    suffix = ".pt"

    def __init__(self, model: nn.Module, X_calib: np.ndarray, workdir: Path, threads: int = 1, reduce_range=True):
        self.model = copy.deepcopy(model).cpu().eval()
        self.X_calib = torch.as_tensor(X_calib, dtype=torch.float32)
        self.workdir, self.threads, self.exporter = workdir, threads, "torch.ao.quantization.quantize_fx"
        self.reduce_range = True  # torch's x86 engine always uses 7-bit activations (see _qconfig_mapping)
        self._calibrated: dict[str, dict[str, dict]] = {}  # observer kind -> watched node -> observer state

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

    def _prepare(self, attempt: Attempt):
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
        from torch.ao.quantization.quantize_fx import prepare_fx

        # the adapter's reshape/permute would otherwise leave the first conv's input unobserved (fp32)
        custom = PrepareCustomConfig().set_non_traceable_module_names(
            ["adapter"] if hasattr(self.model, "adapter") else []
        )
        mapping = _qconfig_mapping(attempt)
        return prepare_fx(copy.deepcopy(self.model), mapping, (self.X_calib[:2],), prepare_custom_config=custom)

    def _calibrate(self, prepared, kind: str) -> None:
        """Observe the calibration rows once per observer kind; later attempts load what was observed."""
        observers = _observers(prepared)
        known = self._calibrated.get(kind, {})
        if known and set(observers) <= set(known):
            for node, obs in observers.items():
                obs.load_state_dict(known[node])
            return
        with torch.no_grad():  # the first attempt of this kind (or one that watches a tensor the first did not)
            for i in range(0, len(self.X_calib), 64):
                prepared(self.X_calib[i : i + 64])
        if not known:
            self._calibrated[kind] = {node: copy.deepcopy(obs.state_dict()) for node, obs in observers.items()}

    def quantize(self, attempt: Attempt, out: Path) -> Path:
        """Write the int8 model of `attempt` to `out`."""
        from torch.ao.quantization.quantize_fx import convert_fx

        with quiet_output():
            torch.backends.quantized.engine = "x86"
            prepared = self._prepare(attempt)
            self._calibrate(prepared, "minmax" if attempt.calibration_method == "minmax" else "histogram")
            scripted = torch.jit.trace(convert_fx(prepared), self.X_calib[:2])
            torch.jit.save(scripted, str(out))
        return out

    def predict(self, path: Path):
        """A predictor of logits for the int8 model at `path`."""
        with quiet_output():
            return TorchPredictor(torch.jit.load(str(path)), 1024)
