"""Run by tests/test_finetune.py in a child process: a fine-tune that can be killed and resumed."""

import json
import sys
from pathlib import Path

import torch

from distilflow.params import BackboneParams, TrainParams
from tasks.backbones import load_backbone
from tasks.finetuning import fit
from tests.test_finetune import digits_arrays

if __name__ == "__main__":
    checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    X, y = digits_arrays()
    torch.manual_seed(7)
    model, _ = load_backbone(BackboneParams(spec="builtin:cnn", width=16, depth=3), (8, 8, 1), 64, 10)
    cfg = TrainParams(epochs=int(sys.argv[3]), batch_size=32, patience=100, threads=1)
    result = fit(
        model, X["train"], y["train"], X["val"], y["val"], cfg, seed=7, image_shape=(8, 8, 1), checkpoint=checkpoint
    )
    out.write_text(
        json.dumps(
            {
                "resumed_from_epoch": result.resumed_from_epoch,
                "val_accuracy": [h["val_accuracy"] for h in result.history],
                "train_loss": [h["train_loss"] for h in result.history],
                "weights": {
                    k: v.flatten()[:50].tolist() for k, v in model.state_dict().items() if v.is_floating_point()
                },
            }
        )
    )
