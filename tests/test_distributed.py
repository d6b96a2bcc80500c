"""Data-parallel training: the one loop in 2 real CPU processes (gloo) ends where one process does."""

import copy

import numpy as np
import pytest
import torch

from distilflow.params import TrainParams
from tasks.finetuning import fit
from tasks.models import builtin_classifier
from tests.test_finetune import digits_arrays

pytestmark = pytest.mark.slow


def test_two_process_ddp_matches_one_process_with_the_same_global_batch():
    """Same seed, same global batch (2 × 32 = 64): each step's gradient is the same mean, so the weights match.

    An MLP (no BatchNorm): with BatchNorm, each rank normalises its own half-batch, the standard DDP behaviour,
    so only the MLP can be compared weight for weight.
    """
    X, y = digits_arrays()
    n = len(y["train"]) // 64 * 64  # whole global batches: a last, smaller batch would be shared unevenly
    X, y = {**X, "train": X["train"][:n]}, {**y, "train": y["train"][:n]}
    torch.manual_seed(0)
    model = builtin_classifier(None, 64, 10, width=32, depth=2)
    cfg = TrainParams(
        epochs=3, batch_size=64, lr=1e-2, lr_decay=1.0, patience=10, threads=1, device="cpu", warmup_epochs=1
    )
    single = fit(copy.deepcopy(model), X["train"], y["train"], X["val"], y["val"], cfg, seed=5)
    ddp_model = copy.deepcopy(model)
    ddp = fit(ddp_model, X["train"], y["train"], X["val"], y["val"], cfg.model_copy(update={"devices": 2}), seed=5)
    assert ddp.model is ddp_model  # rank 0's weights are loaded into the caller's model
    for (name, a), b in zip(single.model.state_dict().items(), ddp.model.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert [h["val_accuracy"] for h in ddp.history] == pytest.approx(
        [h["val_accuracy"] for h in single.history], abs=1 / len(y["val"])
    )
    assert ddp.history[-1]["val_accuracy"] > 0.9  # and it learned: this MLP reaches ~95% on digits in 3 epochs
