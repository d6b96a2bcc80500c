"""The one model contract: input adapter → backbone (features) → head.

Whatever the source (`hf:`, `mlflow:`, `file:`, built-in), a model is a
`Classifier`: it takes the *normalised flat* feature rows the data stages
produce, shape (N, H*W*C) in H, W, C order, and returns class logits.
`blocks` lists the backbone's blocks from input to output, which is what
progressive unfreezing and discriminative learning rates walk over
(Lightning's BackboneFinetuning idea: the schedule is data, not a subclass).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class InputAdapter(nn.Module):
    """Flat rows → NCHW images at the backbone's channels, size and pixel scale.

    For a backbone trained on pixels of a known scale (ImageNet's), two
    optional per-channel affine maps put that scale inside the model, so the
    exported and served model applies it too (no train/serve skew):
    `to_unit` = (scale, offset) per *data* channel maps a normalised row back
    to pixels in [0, 1] before the channels and size are adapted; `normalize`
    = (mean, std) per *backbone* channel is applied after resizing. Both are
    linear, so resizing (bilinear) and gray → RGB commute with them.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] | None,
        in_channels: int | None = None,
        size: tuple[int, int] | None = None,
        to_unit: tuple[list[float], list[float]] | None = None,
        normalize: tuple[list[float], list[float]] | None = None,
    ):
        super().__init__()
        self.image_shape = tuple(image_shape) if image_shape else None
        self.in_channels = in_channels
        self.size = tuple(size) if size else None
        self.to_unit = to_unit is not None
        self.normalize = normalize is not None
        # non-persistent: rebuilt from arch.json, so state_dicts keep the same keys with or without them
        for name, pair in (("unit", to_unit), ("norm", normalize)):
            if pair is not None:
                a, b = (torch.tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1) for v in pair)
                self.register_buffer(f"{name}_a", a, persistent=False)
                self.register_buffer(f"{name}_b", b, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flat rows → images at the backbone's channels, size and pixel scale."""
        if self.image_shape is None:
            return x
        h, w, c = self.image_shape
        x = x.reshape(x.shape[0], h, w, c).permute(0, 3, 1, 2)
        if self.to_unit:
            x = x * self.unit_a + self.unit_b
        if self.in_channels and c != self.in_channels:
            if c == 1:
                x = x.expand(-1, self.in_channels, -1, -1)
            else:
                x = x.mean(dim=1, keepdim=True).expand(-1, self.in_channels, -1, -1)
        if self.size and (h, w) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        if self.normalize:
            x = (x - self.norm_a) / self.norm_b
        return x.contiguous()

    def extra_repr(self) -> str:
        """What the adapter does, in the module's printout."""
        extra = "".join(f", {name}=True" for name in ("to_unit", "normalize") if getattr(self, name))
        return f"image_shape={self.image_shape}, in_channels={self.in_channels}, size={self.size}{extra}"


class Classifier(nn.Module):
    """adapter → backbone → (N, feature_dim) features → linear head."""

    def __init__(
        self,
        adapter: InputAdapter,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        blocks: list[nn.Module] | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.adapter = adapter
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(feature_dim, num_classes)
        self._blocks = blocks

    @property
    def blocks(self) -> list[nn.Module]:
        """The backbone's blocks, input to output (what unfreezing walks over)."""
        return list(self._blocks) if self._blocks is not None else [self.backbone]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Rows → backbone features (N, feature_dim)."""
        return self.backbone(self.adapter(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Features → class logits."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rows → class logits."""
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for `num_classes`."""
        self.head = nn.Linear(self.feature_dim, num_classes)


# ---------------------------------------------------------------------------- built-in family


class ConvBlock(nn.Sequential):
    """conv 3×3 → BatchNorm → ReLU (→ 2×2 max-pool): one block of the built-in CNN."""

    def __init__(self, c_in: int, c_out: int, pool: bool):
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """A compact CNN: `depth` conv blocks, widths doubling from `width`, then global pooling.

    Pools after a block while the feature map is at least 4 pixels wide, so
    the same family fits 8×8 digits and 28×28 MNIST.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        width: int = 16,
        depth: int = 3,
        widths: list[int] | None = None,
    ):
        super().__init__()
        # explicit `widths` describe a channel-pruned member of the family
        widths = list(widths) if widths else [width * 2 ** min(i, 3) for i in range(depth)]
        depth = len(widths)
        n_pool = max(0, min(depth, int(math.log2(min(image_size))) - 1))
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, pool=i < n_pool)
            for i, (c_in, c_out) in enumerate(zip([in_channels] + widths, widths))
        )
        self.feature_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images → globally pooled features (N, feature_dim)."""
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))


class MLP(nn.Module):
    """For tabular features (no image_shape): `depth` hidden layers of `width`."""

    def __init__(self, n_features: int, width: int = 128, depth: int = 2):
        super().__init__()
        dims = [n_features] + [width] * depth
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(dims, dims[1:]))
        self.feature_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rows → the last hidden layer's activations."""
        for block in self.blocks:
            x = block(x)
        return x


def builtin_classifier(
    image_shape: tuple[int, int, int] | None, n_features: int, num_classes: int, width: int = 16, depth: int = 3
) -> Classifier:
    """A from-scratch model of the built-in family: CNN for images, MLP for tables."""
    if image_shape is None:
        body = MLP(n_features, width=width, depth=depth)
    else:
        h, w, c = image_shape
        body = SmallCNN(c, (h, w), width=width, depth=depth)
    return Classifier(InputAdapter(image_shape), body, body.feature_dim, num_classes, blocks=list(body.blocks))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (elements) of a module."""
    return sum(p.numel() for p in model.parameters())
