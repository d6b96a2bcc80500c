"""Batched inference: one torch predictor and one ONNX predictor, for every stage and the served model.

`TorchPredictor` runs a torch module (eval mode, no grad, batches on the
module's device); `OnnxPredictor` runs an ONNX file with ONNX Runtime on the
CPU with a fixed thread count. `load_predictor` turns any saved variant (a
model folder, an ONNX file, a TorchScript file) into one of them.

torch is imported lazily: the served model of an ONNX product, and the
`score` command, start without it.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path

import numpy as np

from distilflow.errors import DistilflowError

BATCH = 512
MODEL_FILE = "model"  # + the backend's suffix inside an int8 folder (artifacts/student_int8/model.onnx)


def int8_file(folder: Path) -> Path | None:
    """The model inside an int8 folder (model.onnx or TorchScript model.pt), or None (its quantization failed)."""
    found = [p for p in sorted(Path(folder).glob(f"{MODEL_FILE}.*")) if p.suffix in (".onnx", ".pt")]
    return found[0] if found else None


# torch's ONNX exporter logs one warning per torchvision op it cannot register ("torchvision is not installed");
# this project never uses torchvision
NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core")


@contextlib.contextmanager
def quiet_output():
    """Silence exporters', calibrators' and TorchScript loaders' prints, warnings and deprecation chatter."""
    import logging

    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}

    def below_error(record: logging.LogRecord) -> bool:  # ORT's quantizer warns on the root logger itself
        return record.levelno >= logging.ERROR

    root = logging.getLogger()
    root.addFilter(below_error)
    try:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(below_error)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class TorchPredictor:
    """A torch module as a predictor: eval mode, no grad, `batch_size` rows at a time on the module's device."""

    kind = "torch"

    def __init__(self, model, batch_size: int = BATCH):
        self.model, self.batch_size = model, batch_size

    def outputs(self, X, features: bool = False):
        """Logits (or `forward_features`) of every row as one float32 CPU tensor."""
        import torch

        model = self.model
        model.eval()
        params = next(model.parameters(), None)
        device = params.device if params is not None else torch.device("cpu")
        X = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X, dtype=torch.float32)
        forward = model.forward_features if features else model
        with torch.no_grad():  # not inference_mode: cached teacher outputs feed losses that are differentiated
            if len(X) <= self.batch_size:
                return forward(X.to(device)).float().cpu()
            return torch.cat(
                [
                    forward(X[i : i + self.batch_size].to(device)).float().cpu()
                    for i in range(0, len(X), self.batch_size)
                ]
            )

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Logits as a numpy array."""
        return self.outputs(X).numpy()


class OnnxPredictor:
    """An ONNX classifier run by ONNX Runtime on the CPU, thread count fixed; returns logits."""

    kind = "onnx"

    def __init__(self, path: str | Path, threads: int = 1, batch_size: int = 1024):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.path, self.threads, self.batch_size = Path(path), threads, batch_size
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, X: np.ndarray) -> np.ndarray:
        """One session call on all of `X` (what the latency harness times)."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(X, dtype=np.float32)})[0]

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Logits of every row, `batch_size` rows per session call."""
        if len(X) <= self.batch_size:
            return self.run(X)
        return np.concatenate([self.run(X[i : i + self.batch_size]) for i in range(0, len(X), self.batch_size)])


def load_predictor(variant, threads: int = 1):
    """A predictor for any variant: a torch module, a model folder, an int8 folder, an ONNX or a TorchScript file."""
    if not isinstance(variant, (str, Path)):  # a torch module (checked without importing torch)
        return TorchPredictor(variant)
    path = Path(variant)
    if path.is_dir() and int8_file(path) is not None:
        path = int8_file(path)
    elif path.is_dir():
        from tasks.backbones import load_classifier

        return TorchPredictor(load_classifier(path)[0])
    if not path.is_file():
        raise DistilflowError(f"model variant not found: {path}")
    if path.suffix == ".onnx":
        return OnnxPredictor(path, threads)
    if path.suffix in (".pt", ".pth", ".ts"):
        import torch

        with quiet_output():
            return TorchPredictor(torch.jit.load(str(path)))
    raise DistilflowError(
        f"model variant {path}: unsupported file type '{path.suffix}' (use a model folder, .onnx or a TorchScript .pt)"
    )


def measure_latency(predict, X: np.ndarray, batch_size: int, repeats: int = 30, warmup: int = 5) -> dict:
    """Median / min / max wall time (ms) of one `predict` call on `batch_size` rows, after warm-up.

    The median, not the mean: a single scheduler hiccup on a shared CPU
    would otherwise dominate. Rows are tiled when the test split is smaller
    than the batch.
    """
    reps = int(np.ceil(batch_size / len(X)))
    batch = np.ascontiguousarray(np.tile(X, (reps, 1))[:batch_size], dtype=np.float32)
    for _ in range(warmup):
        predict(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "max_ms": float(np.max(times))}
