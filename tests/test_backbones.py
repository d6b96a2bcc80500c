"""Backbone sources: hf (a tiny model saved with save_pretrained, loaded by path), mlflow, file, built-in."""

import pytest
import torch
from safetensors.torch import save_file

from distilflow.errors import DistilflowError
from distilflow.params import BackboneParams, params_from_dict
from tasks.backbones import build_classifier, load_backbone, load_classifier, save_classifier

SHAPE = (8, 8, 1)


def backbone_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def assert_same_backbone(a, b):
    sa, sb = backbone_state(a), backbone_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def tiny_resnet_dir(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    model = ResNetModel(
        ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    )
    model.save_pretrained(tmp_path / "tiny-resnet")
    return tmp_path / "tiny-resnet", model


def test_hf_backbone_from_a_saved_directory(tiny_resnet_dir):
    path, source = tiny_resnet_dir
    model, arch = load_backbone(BackboneParams(spec=f"hf:{path}", input_size=(16, 16)), SHAPE, 64, 5)
    assert model(torch.randn(4, 64)).shape == (4, 5)
    assert model.adapter.in_channels == 3 and model.adapter.size == (16, 16)  # 1 → 3 channels, 8×8 → 16×16
    src = source.state_dict()
    assert all(torch.equal(v, src[k.removeprefix("backbone.model.")]) for k, v in backbone_state(model).items())
    assert len(model.blocks) == 3  # stem + 2 stages, for unfreezing and discriminative LRs
    fresh = build_classifier(arch)  # the from-scratch twin: same architecture, new weights
    assert backbone_state(fresh).keys() == backbone_state(model).keys()
    assert not torch.equal(
        fresh.backbone.model.embedder.embedder.convolution.weight,
        model.backbone.model.embedder.embedder.convolution.weight,
    )


def test_hf_vit_gets_its_fixed_input_size(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(tmp_path / "vit")
    model, _ = load_backbone(BackboneParams(spec=f"hf:{tmp_path / 'vit'}"), SHAPE, 64, 3)
    assert model.adapter.size == (16, 16) and model(torch.randn(2, 64)).shape == (2, 3)
    assert len(model.blocks) == 3  # embeddings + 2 encoder layers


def test_file_backbone_safetensors_and_state_dict(tmp_path):
    spec = BackboneParams(spec="builtin:cnn", width=8, depth=2)
    torch.manual_seed(1)
    source, _ = load_backbone(spec, SHAPE, 64, 10)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        model, arch = load_backbone(
            BackboneParams(spec=f"file:{tmp_path / name}", arch="builtin:cnn", width=8, depth=2), SHAPE, 64, 4
        )
        assert_same_backbone(model, source)
        assert model.head.out_features == 4 and arch["source"].startswith("file:")


def test_mlflow_backbone_from_the_registry(tmp_path):
    """A registered model's backbone: the alias resolved once into a local folder, then transferred."""
    import json

    import pandas as pd

    from distilflow.io import write_json
    from distilflow.layout import Layout
    from distilflow.params import PretrainParams
    from distilflow.tracking import Tracker
    from tasks.backbone_source import backbone_stage
    from tasks.registry.registration import Variant, register_variants

    torch.manual_seed(2)
    source, arch = load_backbone(BackboneParams(spec="builtin:cnn", width=8, depth=2), (28, 28, 1), 784, 10)
    save_classifier(source, arch, tmp_path / "model")
    pre = {
        "feature_columns": [f"px{i}" for i in range(784)],
        "classes": list(range(10)),
        "impute": [0.0] * 784,
        "shift": [0.0] * 784,
        "scale": [1.0] * 784,
    }
    write_json(pre, tmp_path / "pre.json")
    tracker = Tracker(Layout(tmp_path).tracking_uri(), tmp_path)
    with tracker.run("pretrain", "p") as run:
        register_variants(
            tracker,
            run,
            [Variant("bb", tmp_path / "model", {"variant": "backbone"}, "product")],
            tmp_path / "pre.json",
            pd.DataFrame([[0.0] * 784], columns=pre["feature_columns"]),
            {},
            "# bb\n",
            alias="pretrained",
        )
    spec = BackboneParams(spec="mlflow:models:/bb@pretrained")
    backbone_stage(tmp_path / "backbone", spec, PretrainParams(), 0, tracker)
    assert json.loads((tmp_path / "backbone/source.json").read_text())["resolved"] == "models:/bb/1"
    model, arch = load_backbone(spec, SHAPE, 64, 3, tmp_path / "backbone")
    assert_same_backbone(model, source)
    assert model.head.out_features == 3 and model.adapter.size == (28, 28)  # digits resized to what it learned on
    with pytest.raises(DistilflowError, match="models:/bb@nope"):
        backbone_stage(tmp_path / "other", BackboneParams(spec="mlflow:models:/bb@nope"), PretrainParams(), 0, tracker)
    with pytest.raises(DistilflowError, match="not resolved to a local copy"):
        load_backbone(spec, SHAPE, 64, 3, tmp_path / "nowhere")


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DistilflowError, match="hf:no-such-org/no-such-model could not be loaded"):
        load_backbone(BackboneParams(spec="hf:no-such-org/no-such-model"), SHAPE, 64, 3)


def test_weights_that_do_not_fit_the_named_architecture(tmp_path):
    torch.manual_seed(0)
    wide, _ = load_backbone(BackboneParams(spec="builtin:cnn", width=16, depth=2), SHAPE, 64, 10)
    save_file(wide.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(DistilflowError, match="does not match backbone.arch builtin:cnn"):
        load_backbone(
            BackboneParams(spec=f"file:{tmp_path / 'w.safetensors'}", arch="builtin:cnn", width=16, depth=3),
            SHAPE,
            64,
            10,
        )


def test_weights_of_another_width_are_a_clear_error(tmp_path):
    wide, _ = load_backbone(BackboneParams(spec="builtin:cnn", width=16, depth=2), SHAPE, 64, 10)
    save_file(wide.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    spec = lambda name, width: BackboneParams(spec=f"file:{tmp_path / name}", arch="builtin:cnn", width=width, depth=2)  # noqa: E731
    with pytest.raises(DistilflowError, match="does not match backbone.arch builtin:cnn: .*size mismatch"):
        load_backbone(spec("w.safetensors", 8), SHAPE, 64, 10)
    with pytest.raises(DistilflowError, match="not a readable safetensors file"):
        load_backbone(spec("bad.safetensors", 16), SHAPE, 64, 10)


def test_pickled_whole_model_is_refused(tmp_path):
    model, _ = load_backbone(BackboneParams(spec="builtin:cnn", width=4, depth=1), SHAPE, 64, 10)
    torch.save(model, tmp_path / "model.pt")  # a full pickle, not a state_dict
    with pytest.raises(DistilflowError, match="not a weights-only state_dict"):
        load_backbone(BackboneParams(spec=f"file:{tmp_path / 'model.pt'}", arch="builtin:cnn"), SHAPE, 64, 10)


def test_class_count_mismatch_and_other_bad_specs(tmp_path):
    model, arch = load_backbone(BackboneParams(spec="builtin:cnn", width=4, depth=1), SHAPE, 64, 10)
    save_classifier(model, arch, tmp_path / "m")
    assert load_classifier(tmp_path / "m", num_classes=10)[0].head.out_features == 10
    with pytest.raises(DistilflowError, match="predicts 10 classes, but the data has 5"):
        load_classifier(tmp_path / "m", num_classes=5)
    with pytest.raises(DistilflowError, match="unknown built-in architecture"):
        load_backbone(BackboneParams(spec="builtin:vgg99"), SHAPE, 64, 10)
    with pytest.raises(DistilflowError, match="file:/nope.pt: no such file"):
        load_backbone(BackboneParams(spec="file:/nope.pt", arch="builtin:cnn"), SHAPE, 64, 10)
    with pytest.raises(DistilflowError, match="must start with one of"):
        params_from_dict({"backbone": {"spec": "torchvision:resnet18"}})
    with pytest.raises(DistilflowError, match="needs backbone.arch"):
        params_from_dict({"backbone": {"spec": "file:w.pt"}})


@pytest.mark.parametrize("family", ["mobilenet_v2", "convnext"])
def test_other_hf_vision_families(tmp_path, family):
    from transformers import AutoConfig, AutoModel

    kwargs = {
        "mobilenet_v2": dict(num_channels=3, image_size=32, depth_multiplier=0.35),
        "convnext": dict(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    }[family]
    AutoModel.from_config(AutoConfig.for_model(family, **kwargs)).save_pretrained(tmp_path / family)
    model, _ = load_backbone(BackboneParams(spec=f"hf:{tmp_path / family}", input_size=(32, 32)), SHAPE, 64, 4)
    assert model(torch.randn(2, 64)).shape == (2, 4)
    assert len(model.blocks) >= 3  # a stem and at least two stages/layers to unfreeze


def test_hub_ids_are_pinned_by_revision_and_an_unpinned_one_says_so(tmp_path):
    from distilflow.params import PretrainParams
    from tasks.backbone_source import backbone_stage
    from tasks.backbones import split_hf_ref

    assert split_hf_ref("microsoft/resnet-18@a1b2c3") == ("microsoft/resnet-18", "a1b2c3")
    assert split_hf_ref("microsoft/resnet-18") == ("microsoft/resnet-18", None)
    local = tmp_path / "weights@v2"
    local.mkdir()
    assert split_hf_ref(str(local)) == (str(local), None)  # a local directory is its own identity
    pinned = backbone_stage(tmp_path / "bb1", BackboneParams(spec="hf:org/model@rev7"), PretrainParams(), 0).info
    assert pinned == {"spec": "hf:org/model@rev7", "repo": "org/model", "revision": "rev7"}
    loose = backbone_stage(tmp_path / "bb2", BackboneParams(spec="hf:org/model"), PretrainParams(), 0).info
    assert loose["revision"].startswith("unpinned")
