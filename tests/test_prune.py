import copy

import pytest
import torch
from torch import nn

from distilflow.errors import DistilflowError
from distilflow.params import PruneParams, params_from_dict
from tasks.models import builtin_classifier, count_parameters
from tasks.prune import channel_prune, magnitude_prune, prune_model, sparsity

torch.set_num_threads(1)


def _cnn(width=8, depth=3, seed=0):
    torch.manual_seed(seed)
    model = builtin_classifier((8, 8, 1), 64, 10, width=width, depth=depth)
    with torch.no_grad():  # non-trivial BatchNorm state, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _conv_linear_weight_count(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize("amount", [0.3, 0.7, 0.9])
def test_magnitude_pruning_reaches_the_requested_sparsity_and_is_permanent(amount):
    model = _cnn()
    pruned, report = magnitude_prune(model, amount)
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert zeros / _conv_linear_weight_count(pruned) == pytest.approx(amount, abs=0.005)
    assert sparsity(pruned) == pytest.approx(amount, abs=0.005)
    assert sparsity(model) == 0.0  # the input model is untouched
    assert not any(k.endswith(("_orig", "_mask")) for k in pruned.state_dict())  # masks folded in
    # dense tensors: same parameter count, same file size, and the report says so plainly
    assert report["params_after"] == count_parameters(model)
    assert report["file_bytes_after"] == report["file_bytes_before"]
    assert report["gzip_bytes_after"] < report["gzip_bytes_before"]
    assert "stay dense" in report["note"] and "prune.method=channel" in report["note"]


def test_magnitude_pruning_is_global_not_per_layer():
    model = _cnn()
    with torch.no_grad():
        model.backbone.blocks[0][0].weight.mul_(100.0)  # the first conv's weights dwarf all others
    pruned, _ = magnitude_prune(model, 0.5)
    assert sparsity(nn.Sequential(pruned.backbone.blocks[0][0])) == 0.0


def test_finetune_hook_runs_while_masked_and_zeros_survive_it():
    model = _cnn()
    calls = []

    def finetune(m):
        calls.append(type(m).__name__)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            m.train()
            m(torch.randn(16, 64)).square().mean().backward()
            opt.step()

    pruned, report = magnitude_prune(model, 0.6, finetune=finetune)
    assert calls == ["Classifier"]
    assert sparsity(pruned) >= 0.6 - 0.005
    assert report["sparsity_after"] >= 0.6 - 0.005


def test_channel_pruning_with_nothing_removed_keeps_the_function():
    model = _cnn()
    pruned, _ = channel_prune(model, 0.0)
    x = torch.randn(9, 64)
    assert torch.allclose(pruned(x), model(x), atol=1e-5)


def test_channel_pruning_drops_the_lowest_l1_channels_and_shrinks_the_model():
    model = _cnn(width=8, depth=2)
    dead = {0: [1, 4, 6, 7], 1: [0, 2, 3, 5, 8, 9, 12, 15]}  # half of each block's channels
    with torch.no_grad():  # dead channels: zero filters, and BN bias −1 so ReLU outputs exactly 0
        for i, channels in dead.items():
            model.backbone.blocks[i][0].weight[channels] = 0.0
            model.backbone.blocks[i][1].bias[channels] = -1.0
    pruned, report = channel_prune(model, 0.5)
    assert report["channels_before"] == [8, 16] and report["channels_after"] == [4, 8]
    alive0, alive1 = [0, 2, 3, 5], [1, 4, 6, 7, 10, 11, 13, 14]
    # kept filters are the live ones, with the next conv's input channels and the head's columns sliced to match
    assert torch.equal(pruned.backbone.blocks[0][0].weight, model.backbone.blocks[0][0].weight[alive0])
    assert torch.equal(pruned.backbone.blocks[1][0].weight, model.backbone.blocks[1][0].weight[alive1][:, alive0])
    assert torch.equal(pruned.head.weight, model.head.weight[:, alive1])
    assert count_parameters(pruned) < count_parameters(model) / 2
    assert report["params_after"] == count_parameters(pruned)
    assert report["file_bytes_after"] < report["file_bytes_before"]
    # only dead channels went, so the smaller network computes the same function
    x = torch.randn(7, 64)
    assert torch.allclose(pruned(x), model(x), atol=1e-5)
    assert pruned.feature_dim == 8 and len(pruned.blocks) == 2


def test_channel_pruning_refuses_non_cnn_models():
    mlp = builtin_classifier(None, 20, 3, width=16, depth=2)
    with pytest.raises(DistilflowError, match="prune.method=channel.*l1_unstructured"):
        channel_prune(mlp, 0.5)


def test_prune_model_dispatches_on_method():
    model = _cnn()
    _, unstructured = prune_model(model, PruneParams(method="l1_unstructured", sparsity=0.4))
    _, structured = prune_model(copy.deepcopy(model), PruneParams(method="channel", sparsity=0.4))
    assert unstructured["method"] == "l1_unstructured" and structured["method"] == "channel"
    assert structured["params_after"] < structured["params_before"]


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1])
def test_bad_sparsity_names_the_key(value):
    with pytest.raises(DistilflowError, match=r"prune\.sparsity"):
        params_from_dict({"prune": {"sparsity": value}})


def test_bad_prune_method_lists_the_choices():
    with pytest.raises(DistilflowError, match=r"prune\.method.*'channel'"):
        params_from_dict({"prune": {"method": "random"}})
