"""QAT: BatchNorm folded, then a short fake-quant fine-tune through the project's one training loop.

int8 weights and uint8 activations are simulated with straight-through
gradients (Jacob et al. 2018, "Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference"); the weights come back
snapped to the int8 grid, so the backend's own quantization of them is (near)
lossless. The third and last remedy of tasks/quantization/policy.py.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from distilflow.params import QuantizeParams
from tasks.engine import LoopConfig, train


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
