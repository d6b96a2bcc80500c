"""The served model: raw feature columns in, class and class probabilities out.

An MLflow pyfunc that bundles the classifier (`model.safetensors` +
`arch.json`) with the preprocessing fitted on the train split, so
`models:/<name>@<alias>` takes the raw input the user has.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from distilflow.io import read_json


class ClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from tasks.backbones import load_classifier

        self.model, self.arch = load_classifier(context.artifacts["classifier"])
        self.model.eval()
        self.pre = read_json(context.artifacts["preprocessor"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from tasks.data import apply_normalizer

        X = torch.from_numpy(apply_normalizer(self.pre, model_input))
        with torch.no_grad():
            probs = torch.softmax(self.model(X), dim=1).numpy()
        classes = self.pre["classes"]
        out = pd.DataFrame({"prediction": np.asarray(classes, dtype=object)[probs.argmax(1)]})
        for i, c in enumerate(classes):
            out[f"prob_{c}"] = probs[:, i]
        return out
