"""Fine-tuning: strategies, LRs, schedule, resume, determinism and an accuracy floor."""

import json
import signal
import subprocess
import sys
import time
from functools import lru_cache

import numpy as np
import pytest
import torch

from distilflow.params import AugmentParams, BackboneParams, TrainParams
from tasks.backbones import load_backbone
from tasks.finetuning import (
    augment_flat,
    block_params,
    fit,
    make_augmenter,
    param_groups,
    set_trainable,
    unfrozen_blocks,
)
from tasks.inference import TorchPredictor
from tasks.splits import label_budget_subset
from tests.conftest import REPO

SHAPE = (8, 8, 1)


@lru_cache(maxsize=1)
def digits_arrays():
    """Digits, split and normalised by the project's own data stages."""
    import pandas as pd
    from sklearn.datasets import load_digits

    from distilflow.params import SplitParams
    from tasks.preprocessing import apply_normalizer, fit_normalizer
    from tasks.splits import LABEL, stratified_split

    d = load_digits()
    frame = pd.DataFrame(d.data, columns=[f"px{i}" for i in range(64)])
    frame.insert(0, LABEL, d.target)
    parts = stratified_split(frame, SplitParams(train=0.7, val=0.15, test=0.15), seed=0)
    pre = fit_normalizer(parts["train"], "per_channel", SHAPE)
    X = {k: apply_normalizer(pre, v) for k, v in parts.items()}
    y = {k: v[LABEL].to_numpy() for k, v in parts.items()}
    return X, y


def cnn(width=8, depth=3):
    model, _ = load_backbone(BackboneParams(spec="builtin:cnn", width=width, depth=depth), SHAPE, 64, 10)
    return model


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_strategies_freeze_exactly_the_intended_blocks():
    model = cnn()
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    block = lambda i: {n for n, _ in model.named_parameters() if n.startswith(f"backbone.blocks.{i}.")}  # noqa: E731
    n = len(model.blocks)
    assert n == 3

    set_trainable(model, unfrozen_blocks("linear_probe", n, epoch=9, unfreeze_every=2))
    assert trainable_names(model) == head
    set_trainable(model, unfrozen_blocks("full", n, epoch=0, unfreeze_every=2))
    assert trainable_names(model) == {n_ for n_, _ in model.named_parameters()}
    expected = {
        0: head,
        1: head,
        2: head | block(2),
        3: head | block(2),
        4: head | block(2) | block(1),
        6: head | block(2) | block(1) | block(0),
        40: head | block(2) | block(1) | block(0),
    }
    for epoch, names in expected.items():
        set_trainable(model, unfrozen_blocks("progressive", n, epoch=epoch, unfreeze_every=2))
        assert trainable_names(model) == names, epoch


def test_linear_probe_leaves_the_backbone_bit_identical():
    X, y = digits_arrays()
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(
        model,
        X["train"][:200],
        y["train"][:200],
        X["val"],
        y["val"],
        TrainParams(strategy="linear_probe", epochs=2),
        seed=0,
        image_shape=SHAPE,
    )
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("head."):
            assert not torch.equal(v, after[k]), k
        else:  # weights and BatchNorm running statistics alike
            assert torch.equal(v, after[k]), k


def test_a_probe_then_progressive_unfreezing_trains_only_the_top_blocks_it_allows():
    """probe_epochs: the head on features computed once, then at most max_unfrozen top blocks; the better phase."""
    X, y = digits_arrays()
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainParams(strategy="progressive", epochs=4, probe_epochs=2, unfreeze_every=1, max_unfrozen=1)
    result = fit(model, X["train"][:300], y["train"][:300], X["val"], y["val"], cfg, seed=0, image_shape=SHAPE)
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3]
    assert [r["unfrozen_blocks"] for r in result.history] == [0, 0, 1, 1]
    assert result.best_val_accuracy == max(r["val_accuracy"] for r in result.history)
    assert result.history[result.best_epoch]["val_accuracy"] == result.best_val_accuracy
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith(("backbone.blocks.0.", "backbone.blocks.1.")):  # never unfrozen: weights and BN statistics
            assert torch.equal(v, after[k]), k
    top = [k for k in before if k.startswith("backbone.blocks.2.") and k.endswith("weight")]
    moved = any(not torch.equal(before[k], after[k]) for k in top)
    assert moved == (result.best_epoch >= 2)  # the top block moved only if an unfreezing epoch was kept
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("head."))


def test_discriminative_learning_rates_per_block():
    model = cnn()
    groups = param_groups(model, lr=1e-2, lr_decay=0.5, weight_decay=0.1)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    blocks = block_params(model)
    assert all(lr_of[id(p)] == 1e-2 for p in model.head.parameters())
    for i, params in enumerate(blocks):  # input block gets the smallest LR
        assert all(lr_of[id(p)] == pytest.approx(1e-2 * 0.5 ** (len(blocks) - i)) for p in params)
    assert len(lr_of) == sum(1 for _ in model.parameters())
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))


def test_warmup_then_cosine_over_the_epochs_fit_runs():
    """The learning rate fit() logs per epoch: a linear rise over the warmup epoch, then cosine decay to ~0."""
    X, y = digits_arrays()
    cfg = TrainParams(epochs=5, warmup_epochs=1, batch_size=64, lr=1e-2, lr_decay=1.0, patience=10)
    history = fit(cnn(), X["train"][:320], y["train"][:320], X["val"], y["val"], cfg, seed=0, image_shape=SHAPE).history
    lrs = [h["lr"] for h in history]  # after each epoch's last step: 5 steps per epoch
    assert lrs[0] == pytest.approx(1e-2, rel=1e-6)  # end of warmup: the full LR
    assert lrs[1] > lrs[2] > lrs[3] > lrs[4] and lrs[2] == pytest.approx(
        1e-2 * 0.5 * (1 + np.cos(np.pi * 10 / 20)), rel=1e-6
    )
    assert lrs[4] == pytest.approx(0.0, abs=1e-12)


def test_label_budget_subset_is_stratified_and_seeded():
    y = np.repeat(np.arange(3), [10, 4, 7])
    idx = label_budget_subset(y, 5, seed=1)
    assert np.bincount(y[idx]).tolist() == [5, 4, 5]
    assert (idx == label_budget_subset(y, 5, seed=1)).all() and not (idx == label_budget_subset(y, 5, seed=2)).all()


def test_augmentation_changes_train_batches_only_when_enabled():
    assert make_augmenter(AugmentParams(enabled=False), SHAPE) is None
    aug = make_augmenter(AugmentParams(enabled=True, rotation=30, shift=0.2, noise=0.1), SHAPE)
    x = torch.from_numpy(digits_arrays()[0]["train"][:16])
    out = augment_flat(aug, x, SHAPE)
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_short_finetune_on_digits_reaches_the_floor():
    X, y = digits_arrays()
    torch.manual_seed(3)
    model = cnn(width=16)
    fit(model, X["train"], y["train"], X["val"], y["val"], TrainParams(epochs=6), seed=3, image_shape=SHAPE)
    acc = (TorchPredictor(model)(X["test"]).argmax(1) == y["test"]).mean()
    assert acc >= 0.95, f"test accuracy {acc:.3f} below the 0.95 floor"


def test_same_data_params_and_seed_give_the_same_metrics():
    X, y = digits_arrays()
    cfg = TrainParams(epochs=2, augment=AugmentParams(enabled=True, rotation=5, shift=0.05, noise=0.05))
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        model = cnn(width=16)
        result = fit(model, X["train"], y["train"], X["val"], y["val"], cfg, seed=seed, image_shape=SHAPE)
        runs.append([(h["train_loss"], h["val_loss"], h["val_accuracy"]) for h in result.history])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6)
    assert not np.allclose(runs[0], runs[2])  # the seed matters, so the check above can fail


@pytest.mark.slow
def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path):
    epochs = "12"
    worker = [sys.executable, "-m", "tests.resume_worker"]
    ckpt, out = tmp_path / "killed.pt", tmp_path / "resumed.json"
    proc = subprocess.Popen([*worker, str(ckpt), str(out), epochs], cwd=REPO)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
    killed_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= killed_at < int(epochs)

    subprocess.run([*worker, str(ckpt), str(out), epochs], cwd=REPO, check=True)
    full_out = tmp_path / "full.json"
    subprocess.run([*worker, str(tmp_path / "full.pt"), str(full_out), epochs], cwd=REPO, check=True)
    resumed, full = json.loads(out.read_text()), json.loads(full_out.read_text())
    assert resumed["resumed_from_epoch"] >= killed_at and full["resumed_from_epoch"] == 0
    assert len(resumed["val_accuracy"]) == int(epochs)
    assert resumed["val_accuracy"] == full["val_accuracy"]
    np.testing.assert_allclose(resumed["train_loss"], full["train_loss"], rtol=1e-6)
    for k in full["weights"]:
        np.testing.assert_allclose(resumed["weights"][k], full["weights"][k], rtol=1e-6, atol=1e-7)
