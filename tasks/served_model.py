"""The served model's entry point for MLflow's models-from-code: loading it runs this file, unpickling nothing.

`mlflow.pyfunc.save_model(python_model=<this file>)` records the file instead
of a cloudpickled object, so a model loaded from a shared registry executes
only this project's code (shipped beside it) and reads only safetensors,
ONNX and JSON files.
"""

import mlflow

from tasks.serving import ClassifierModel

mlflow.models.set_model(ClassifierModel())
