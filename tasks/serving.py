"""The served model: raw feature columns in, class and class probabilities out.

An MLflow pyfunc that bundles one classifier with the preprocessing fitted on
the train split, so `models:/<name>@<alias>` takes the raw input the user has.
The classifier is any variant the evaluation harness measures, loaded by the
one predictor of its kind (tasks/inference.py): a torch model folder
(`model.safetensors` + `arch.json`), an int8 folder or an ONNX file (run with
onnxruntime), or a TorchScript file (the torch_fx int8 backend).

Imports stay light (no Prefect), because this module travels with the
registered model as code.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd

from distilflow.io import read_json
from tasks.inference import load_predictor
from tasks.preprocessing import apply_normalizer


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Raw DataFrame → DataFrame with `prediction` and one `prob_<class>` column per class."""

    def load_context(self, context) -> None:
        """Load the classifier (by its kind's one predictor) and the preprocessing record."""
        self.logits = load_predictor(context.artifacts["classifier"])
        self.pre = read_json(context.artifacts["preprocessor"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Raw rows → `prediction` and `prob_<class>` columns (bad input: an MLflow error, HTTP 400 when served)."""
        from mlflow.exceptions import MlflowException

        from distilflow.errors import DistilflowError

        try:
            X = np.ascontiguousarray(apply_normalizer(self.pre, model_input))
        except DistilflowError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        probs = _softmax(self.logits(X)) if len(X) else np.zeros((0, len(self.pre["classes"])), dtype=np.float32)
        classes = self.pre["classes"]
        out = pd.DataFrame({"prediction": np.asarray(classes)[probs.argmax(1)]})
        for i, c in enumerate(classes):
            out[f"prob_{c}"] = probs[:, i].astype(np.float64)
        return out
