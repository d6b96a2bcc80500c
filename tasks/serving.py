"""The served model: raw feature columns in, class and class probabilities out.

An MLflow pyfunc that bundles one classifier with the preprocessing fitted on
the train split, so `models:/<name>@<alias>` takes the raw input the user has.
The classifier is any variant the evaluation harness measures: a torch model
folder (`model.safetensors` + `arch.json`), an ONNX file (the int8 product,
run with onnxruntime) or a TorchScript file (the torch_fx int8 backend).

Imports stay light (no Prefect), because this module travels with the
registered model as code.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from distilflow.io import read_json


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def load_logits_fn(path: str | Path, threads: int | None = None):
    """A function from normalised float32 rows to logits, for any saved variant."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda X: session.run(None, {name: X})[0]

    import torch

    if path.suffix in (".pt", ".ts"):
        model = torch.jit.load(str(path))
    else:
        from tasks.backbones import load_classifier

        model, _ = load_classifier(path)
    model.eval()

    def logits(X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(X)).float().numpy()

    return logits


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Raw DataFrame → DataFrame with `prediction` and one `prob_<class>` column per class."""

    def load_context(self, context) -> None:
        self.logits = load_logits_fn(context.artifacts["classifier"])
        self.pre = read_json(context.artifacts["preprocessor"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from tasks.preprocessing import apply_normalizer

        X = np.ascontiguousarray(apply_normalizer(self.pre, model_input))
        probs = np.concatenate([_softmax(self.logits(X[i : i + 1024])) for i in range(0, len(X), 1024)]) \
            if len(X) else np.zeros((0, len(self.pre["classes"])), dtype=np.float32)
        classes = self.pre["classes"]
        out = pd.DataFrame({"prediction": np.asarray(classes)[probs.argmax(1)]})
        for i, c in enumerate(classes):
            out[f"prob_{c}"] = probs[:, i].astype(np.float64)
        return out
